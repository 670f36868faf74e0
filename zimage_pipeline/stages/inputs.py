"""Inputs: the images an image_to_image or inpaint request names, read by reference
through the Objects port and checked (inputs/): only from the places the policy grants
the publisher (NOT_AUTHORIZED otherwise, nothing read), with the SHA-256 the client
stated, and decoded safely (INVALID_REQUEST naming the problem, nothing charged). Part
of identify: made once per delivery, before the ledger is touched."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from zimage_pipeline.errors import RequestRejectedError
from zimage_pipeline.inputs.decode import DecodedImage, InputLimits, check_mask_matches
from zimage_pipeline.inputs.fetch import check_readable, read_input
from zimage_pipeline.inputs.model import InputGrant
from zimage_pipeline.messages import GenerationRequest, ImageRef, Task
from zimage_pipeline.ports import InputImage, Objects
from zimage_pipeline.stages.runtime import Runtime


@dataclass(frozen=True, slots=True)
class InputSource:
    """Where inputs are read from, and how large they may be."""

    objects: Objects
    limits: InputLimits


async def read_inputs(
    runtime: Runtime,
    source: InputSource | None,
    request: GenerationRequest,
    grants: tuple[InputGrant, ...],
) -> tuple[GenerationRequest, tuple[InputImage, ...]]:
    """The request with its size (the init image's, unless the request set one) and its
    input images at that size; a text_to_image request as it is, with none."""
    if request.task is Task.TEXT_TO_IMAGE:
        return request, ()
    assert request.init_image is not None  # the contract's validator: image tasks have one
    if source is None:
        raise RequestRejectedError(
            "init_image: this worker reads no input images (no object store)",
            reason="NOT_AUTHORIZED",
        )
    refs = [("init_image", request.init_image)]
    if request.mask_image is not None:
        refs.append(("mask_image", request.mask_image))
    # Every reference judged before any is read: a mask outside the grants is refused
    # NOT_AUTHORIZED whatever is wrong with the init image, and nothing is read.
    for what, ref in refs:
        check_readable(ref, grants=grants, what=what)
    read = {
        what: await runtime.io(
            read_input, source.objects, ref, grants=grants, limits=source.limits, what=what
        )
        for what, ref in refs
    }
    init = read["init_image"]
    if "mask_image" in read:
        check_mask_matches(init, read["mask_image"])
    if not request.model_fields_set & {"width", "height"}:
        request = request.model_copy(update={"width": init.width, "height": init.height})
    size = (request.width, request.height)
    images = [await runtime.io(_at_size, what, ref, read[what], size) for what, ref in refs]
    return request, tuple(images)


def _at_size(what: str, ref: ImageRef, decoded: DecodedImage, size: tuple[int, int]) -> InputImage:
    image = decoded.image
    if image.size != size:
        # A mask stays binary: nearest neighbour, never blended edges.
        method = Image.Resampling.NEAREST if what == "mask_image" else Image.Resampling.LANCZOS
        image = image.resize(size, method)
    return InputImage(
        role="mask" if what == "mask_image" else "init_image",
        uri=ref.uri(),
        data=decoded.data,
        format=decoded.format,
        sha256=decoded.sha256,
        pixels=image,
    )
