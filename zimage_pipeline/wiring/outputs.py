"""Engine, Encoder and Store ports on the Turbo engine, provenance and the object store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    wire,
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
        # Uploads of one request run side by side: a request's upload time is its
        # slowest object's, not their sum (the PUT is most of the control plane's
        # latency, bench/NOTES.md). boto3 clients are thread-safe.
        self._uploads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="zimage-s3")

    def store(
        self,
        *,
        request: GenerationRequest,
        created_at: datetime,
        images: Sequence[EncodedImage],
        audit_record: Mapping[str, Any],
        first_attempt: bool = False,
    ) -> StoredOutputs:
        keys = [
            image_key(
                self._prefix, created_at, request.request_id, i, EXTENSIONS[image.format.value]
            )
            for i, image in enumerate(images)
        ]
        record_key = audit_record_key(self._prefix, created_at, request.request_id)
        digests = [wire.sha256_digests(image.data) for image in images]
        uploads = [
            self._uploads.submit(self._put_image, key, image, digest, request, audit_record)
            for key, image, digest in zip(keys, images, digests, strict=True)
        ]
        if first_attempt:
            # No earlier attempt can have stored anything, so no image is adopted: each
            # keeps the digest computed here, and the record naming them goes up beside
            # them. On a retry the record waits for the images (one may be adopted).
            planned = [
                StoredObjectRef("", key, None, digest[0], len(image.data))
                for key, image, digest in zip(keys, images, digests, strict=True)
            ]
            record = self._uploads.submit(
                self._put_record, record_key, request.request_id, audit_record, planned
            )
            refs = _results([*uploads, record])[: len(images)]
            if [(r.sha256, r.size) for r in refs] != [(r.sha256, r.size) for r in planned]:
                # An image was adopted after all (an earlier attempt the ledger does not
                # know of, e.g. a ledger restored from a backup): the record just written
                # names other bytes. It is this request's own: replace it.
                self._store.delete_object(record_key)
                self._put_record(record_key, request.request_id, audit_record, refs)
        else:
            refs = _results(uploads)
            self._put_record(record_key, request.request_id, audit_record, refs)
        return StoredOutputs(images=refs, audit_record_key=record_key)

    def _put_image(
        self,
        key: str,
        image: EncodedImage,
        digests: tuple[str, str],
        request: GenerationRequest,
        audit_record: Mapping[str, Any],
    ) -> StoredObjectRef:
        fmt = image.format.value
        try:
            stored = self._store.put_object(
                key,
                image.data,
                digests=digests,
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
        return StoredObjectRef(
            stored.bucket, stored.key, stored.version_id, stored.sha256, stored.size, url
        )

    def _put_record(
        self,
        key: str,
        request_id: str,
        audit_record: Mapping[str, Any],
        refs: Sequence[StoredObjectRef],
    ) -> StoredObjectRef:
        record = {
            **audit_record,
            "objects": [{"key": r.key, "sha256": r.sha256, "bytes": r.size} for r in refs],
        }
        try:
            stored = self._store.put_json(
                key, record, metadata={"request-id": request_id}, tags={"kind": "audit-record"}
            )
        except ObjectConflictError:
            stored = self._adopt(key, request_id=request_id, seed=None)
        return StoredObjectRef(
            stored.bucket, stored.key, stored.version_id, stored.sha256, stored.size
        )

    def discard(self, *, request_id: str, created_at: datetime) -> list[str]:
        """Delete what a failed request stored: everything under its own prefix (built,
        like its keys, from the encoded id and the ledger's creation time; an id that
        has no key raises InvalidKeyError, which no retry changes). On a versioned
        bucket the deletes leave delete markers; older versions are the bucket's
        lifecycle policy's to expire."""
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


def _results(futures: Sequence[Future[StoredObjectRef]]) -> list[StoredObjectRef]:
    """Every upload's result, in order; the first failure is raised only after all have
    finished, so none is still writing when the request is failed (and discarded)."""
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
