"""Input images by reference (image_to_image, inpaint): where they may be read from
(`grants`), how they are read (`fetch`) and how hostile files are refused (`decode`)."""
