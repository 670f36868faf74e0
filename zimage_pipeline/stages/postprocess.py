"""Post-process: each post-processor plugin's derived images (renditions, ...), made on
the I/O pool, off the GPU thread, checked, and marked with the provenance of the image
they come from."""

from __future__ import annotations

import asyncio
import hashlib

from zimage_pipeline.errors import PluginFailedError
from zimage_pipeline.plugins.api import DERIVED_FORMATS, DERIVED_NAME, DerivedImage, SourceImage
from zimage_pipeline.plugins.registry import LoadedPlugins
from zimage_pipeline.ports import EncodedDerived, EncodedImage, Encoder, ModelIdentity, RawImage
from zimage_pipeline.stages.job import Job
from zimage_pipeline.stages.runtime import Runtime


async def postprocess(
    runtime: Runtime,
    plugins: LoadedPlugins,
    encoder: Encoder,
    job: Job,
    raw_images: list[RawImage],
    encoded: list[EncodedImage],
    model: ModelIdentity,
) -> list[EncodedDerived]:
    if not plugins.postprocessors:
        return []
    request = job.request
    sources = [
        SourceImage(
            index=index,
            pixels=raw.pixels,
            data=image.data,
            format=image.format.value,
            width=image.width,
            height=image.height,
            seed=image.seed,
            sha256=hashlib.sha256(image.data).hexdigest(),
        )
        for index, (raw, image) in enumerate(zip(raw_images, encoded, strict=True))
    ]
    marked: list[EncodedDerived] = []
    for name, processor in plugins.postprocessors:
        made = await runtime.plugin_call(name, "postprocessor", processor.process, request, sources)
        checked = checked_derived(name, made, len(sources))
        marked += await asyncio.gather(
            *(
                runtime.io(
                    encoder.mark_derived,
                    image,
                    source=encoded[image.source_index],
                    request=request,
                    model=model,
                    created_at=job.created_at,
                    plugin=name,
                )
                for image in checked
            )
        )
    job.record(
        "postprocessed",
        {"renditions": [[d.plugin, d.source_index, d.name, d.format] for d in marked]},
    )
    return marked


def checked_derived(plugin: str, made: object, sources: int) -> list[DerivedImage]:
    """A post-processor's output, refused as PLUGIN_FAILED unless every item is a
    DerivedImage of a real source, with a name that can be a key segment (unique per
    source) and a known format: nothing a plugin returns reaches a key unchecked."""
    if not isinstance(made, list) or not all(isinstance(d, DerivedImage) for d in made):
        raise PluginFailedError(
            plugin, "postprocessor", "process() did not return a list of DerivedImage"
        )
    seen: set[tuple[int, str]] = set()
    for image in made:
        problem = None
        if not 0 <= image.source_index < sources:
            problem = f"source_index {image.source_index} out of range"
        elif ".." in image.name or not DERIVED_NAME.fullmatch(image.name):
            problem = f"name {image.name!r:.80} is not a key segment"
        elif image.format not in DERIVED_FORMATS:
            problem = f"format {image.format!r:.20} is not one of {sorted(DERIVED_FORMATS)}"
        elif (image.source_index, image.name) in seen:
            problem = f"two images named {image.name!r} for image {image.source_index}"
        if problem is not None:
            raise PluginFailedError(plugin, "postprocessor", problem)
        seen.add((image.source_index, image.name))
    return made
