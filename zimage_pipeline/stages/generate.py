"""Generate and encode: the engine on the GPU thread, each image encoded (with its
provenance) on the I/O pool."""

from __future__ import annotations

import asyncio

from zimage_pipeline.ports import EncodedImage, Encoder, Engine, ModelIdentity, RawImage
from zimage_pipeline.results import image_specs
from zimage_pipeline.stages.job import Job, effective_seed
from zimage_pipeline.stages.runtime import Runtime


async def generate(runtime: Runtime, engine: Engine, job: Job) -> list[RawImage]:
    seed = effective_seed(job.request, job.payload_sha256)
    specs = image_specs(job.request, seed, job.inputs)
    return await runtime.generate(engine.generate, specs)


async def encode(
    runtime: Runtime, encoder: Encoder, job: Job, raw_images: list[RawImage], model: ModelIdentity
) -> list[EncodedImage]:
    return list(
        await asyncio.gather(
            *(
                runtime.io(
                    encoder.encode,
                    raw,
                    request=job.request,
                    model=model,
                    created_at=job.created_at,
                    inputs=job.inputs,
                )
                for raw in raw_images
            )
        )
    )
