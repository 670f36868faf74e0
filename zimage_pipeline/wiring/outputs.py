"""Engine, Encoder and Store ports on the Turbo engine, provenance and the object store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from zimage_pipeline import __version__
from zimage_pipeline.engine import GenerationSpec, TurboEngine, encode_image
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.ports import (
    EncodedImage,
    ImageSpec,
    ModelIdentity,
    RawImage,
    StoredObjectRef,
    StoredOutputs,
)
from zimage_pipeline.provenance import C2paSigningConfig, ProvenanceInfo, mark_image
from zimage_pipeline.storage import (
    ObjectConflictError,
    ObjectStore,
    StoredObject,
    audit_record_key,
    image_key,
    request_prefix,
)

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


class EngineAdapter:
    def __init__(self, engine: TurboEngine) -> None:
        self._engine = engine
        found = engine.identity
        self._identity = ModelIdentity(
            name=found.name, revision=found.revision, weights_sha256=found.weights_sha256
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        generated = self._engine.generate(
            [
                GenerationSpec(
                    prompt=s.prompt,
                    seed=s.seed,
                    negative_prompt=s.negative_prompt,
                    width=s.width,
                    height=s.height,
                    steps=s.steps,
                    guidance_scale=s.guidance_scale,
                )
                for s in specs
            ]
        )
        return [
            RawImage(pixels=g.image, seed=g.seed, width=g.width, height=g.height, index=i)
            for i, g in enumerate(generated)
        ]


def model_label(model: ModelIdentity) -> str:
    return f"{model.name}@{model.revision}" if model.revision else model.name


class ProvenanceEncoder:
    """Encode, then mark: XMP/IPTC always, a signed C2PA manifest when configured."""

    def __init__(self, *, creator_tool: str, c2pa: C2paSigningConfig | None) -> None:
        self._creator_tool = f"{creator_tool} {__version__}"
        self._c2pa = c2pa

    def encode(
        self,
        image: RawImage,
        *,
        request: GenerationRequest,
        model: ModelIdentity,
        created_at: datetime,
    ) -> EncodedImage:
        fmt = request.format.value
        data = encode_image(image.pixels, format=fmt, quality=request.quality)
        marked = mark_image(
            data,
            fmt,  # type: ignore[arg-type]
            ProvenanceInfo(
                request_id=request.request_id,
                model_identity=model_label(model),
                creator_tool=self._creator_tool,
                image_index=image.index,
                seed=image.seed,
                # The job's creation time, not now: a retry must produce the same bytes.
                created_at=created_at,
            ),
            c2pa=self._c2pa,
        )
        return EncodedImage(marked, request.format, image.width, image.height, image.seed)


class S3Store:
    def __init__(self, store: ObjectStore, *, prefix: str, presign_ttl_s: int) -> None:
        self._store = store
        self._prefix = prefix
        self._presign_ttl_s = presign_ttl_s

    def store(
        self,
        *,
        request: GenerationRequest,
        created_at: datetime,
        images: Sequence[EncodedImage],
        audit_record: Mapping[str, Any],
    ) -> StoredOutputs:
        refs: list[StoredObjectRef] = []
        for index, image in enumerate(images):
            fmt = image.format.value
            key = image_key(self._prefix, created_at, request.request_id, index, EXTENSIONS[fmt])
            try:
                stored = self._store.put_object(
                    key,
                    image.data,
                    content_type=CONTENT_TYPES[fmt],
                    metadata={
                        "request-id": request.request_id,
                        "user": request.on_behalf_of,
                        "model": str(audit_record.get("model", {}).get("name", "")),
                        "seed": str(image.seed),
                    },
                    tags={"generator": "zimage-pipeline", "ai-generated": "true"},
                )
            except ObjectConflictError:
                stored = self._adopt(key, request_id=request.request_id, seed=image.seed)
            url = (
                self._store.presign_get(stored.key, self._presign_ttl_s)
                if self._presign_ttl_s
                else None
            )
            refs.append(
                StoredObjectRef(
                    stored.bucket, stored.key, stored.version_id, stored.sha256, stored.size, url
                )
            )
        record_key = audit_record_key(self._prefix, created_at, request.request_id)
        record = {
            **audit_record,
            "objects": [{"key": r.key, "sha256": r.sha256, "bytes": r.size} for r in refs],
        }
        try:
            self._store.put_json(
                record_key,
                record,
                metadata={"request-id": request.request_id},
                tags={"kind": "audit-record"},
            )
        except ObjectConflictError:
            self._adopt(record_key, request_id=request.request_id, seed=None)
        return StoredOutputs(images=refs, audit_record_key=record_key)

    def discard(self, *, request_id: str, created_at: datetime) -> list[str]:
        """Delete what a failed request stored: everything under its own prefix (built,
        like its keys, from the sanitized id and the ledger's creation time). On a
        versioned bucket the deletes leave delete markers; older versions are the
        bucket's lifecycle policy's to expire."""
        prefix = request_prefix(self._prefix, created_at, request_id) + "/"
        keys = list(self._store.list_keys(prefix))
        for key in keys:
            self._store.delete_object(key)
        return keys

    def _adopt(self, key: str, *, request_id: str, seed: int | None) -> StoredObject:
        """A previous attempt of this same request (which crashed before its ledger
        commit) stored this object with other bytes (a C2PA signature embeds its signing
        time, a GPU may differ in the last bit). It is this request's output: keep it.
        Anything else under our key is a real conflict."""
        bucket = self._store.settings.bucket
        head = self._store.client.head_object(Bucket=bucket, Key=key)
        meta = {k.lower(): unquote(v) for k, v in head.get("Metadata", {}).items()}
        same_request = meta.get("request-id") == request_id
        same_seed = seed is None or meta.get("seed") == str(seed)
        if not (same_request and same_seed and meta.get("sha256")):
            raise ObjectConflictError(f"s3://{bucket}/{key} holds another request's object")
        return StoredObject(
            bucket, key, head.get("VersionId"), meta["sha256"], int(head["ContentLength"])
        )
