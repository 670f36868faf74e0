"""Provenance of an image the model edited from inputs (image-to-image, inpainting): IPTC
compositeWithTrainedAlgorithmicMedia, each input's SHA-256 in the XMP, and a C2PA
manifest with the init image as parent ingredient and the mask as an input to the model."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace

from PIL import Image

from tests.c2pa_test_certs import SigningChain
from tests.unit.test_provenance_derived import INFO, chain, encode, signing  # noqa: F401
from zimage_pipeline.provenance import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    C2paSigningConfig,
    Input,
    mark_image,
    read_provenance,
)


def test_an_edited_image_names_its_inputs(
    signing: C2paSigningConfig,  # noqa: F811
    chain: SigningChain,  # noqa: F811
) -> None:
    photo = encode("jpeg", (64, 64))
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (0, 0, 64, 32))
    buffer = io.BytesIO()
    mask_image.save(buffer, "PNG")
    mask = buffer.getvalue()
    inputs = (
        Input("init_image", photo, "jpeg", "s3://inputs/cms/packshot.jpg"),
        Input("mask", mask, "png", "s3://inputs/cms/mask.png"),
    )
    marked = mark_image(encode("png", (64, 64)), "png", replace(INFO, inputs=inputs), c2pa=signing)

    report = read_provenance(marked, trust_anchors_pem=chain.root_pem)
    assert report.c2pa.trusted, report.c2pa
    assert report.marked_as_ai
    assert report.xmp["Iptc4xmpExt:DigitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert report.xmp["zimage:Input_init_image_Sha256"] == hashlib.sha256(photo).hexdigest()
    assert report.xmp["zimage:Input_mask_Sha256"] == hashlib.sha256(mask).hexdigest()
    assert report.c2pa.actions == ("c2pa.opened", "c2pa.edited")
    assert report.c2pa.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    relationships = {i["title"]: i["relationship"] for i in report.c2pa.ingredients}
    assert relationships == {
        "s3://inputs/cms/packshot.jpg": "parentOf",
        "s3://inputs/cms/mask.png": "inputTo",
    }


def test_a_generated_image_stays_trained_algorithmic_media() -> None:
    report = read_provenance(mark_image(encode("png"), "png", INFO))
    assert report.xmp["Iptc4xmpExt:DigitalSourceType"].endswith("/trainedAlgorithmicMedia")
    assert not any(key.startswith("zimage:Input_") for key in report.xmp)
