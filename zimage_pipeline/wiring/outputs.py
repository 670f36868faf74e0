"""Engine, Encoder and Store ports on the Turbo engine, provenance and the object store."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from zimage_pipeline import __version__
from zimage_pipeline.adapters import adapters_label
from zimage_pipeline.engine import GenerationSpec, TurboEngine, encode_image
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins.api import DerivedImage
from zimage_pipeline.ports import (
    EncodedDerived,
    EncodedImage,
    ImageSpec,
    InputImage,
    ModelIdentity,
    RawImage,
    StoredObjectRef,
    StoredOutputs,
)
from zimage_pipeline.provenance import (
    C2paSigningConfig,
    Input,
    ProvenanceInfo,
    edit_actions,
    mark_image,
)
from zimage_pipeline.provenance import mark_derived as mark_derived_image
from zimage_pipeline.results import template_record
from zimage_pipeline.storage import (
    ObjectConflictError,
    ObjectStore,
    StoredObject,
    audit_record_key,
    image_key,
    request_prefix,
    wire,
)
from zimage_pipeline.storage.keys import rendition_key

CONTENT_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
    "avif": "image/avif",
}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg", "avif": "avif"}
TAGS = {"generator": "zimage-pipeline", "ai-generated": "true"}


def generation_spec(spec: ImageSpec) -> GenerationSpec:
    """The engine's spec for the core's ImageSpec (the same fields, the engine's type)."""
    return GenerationSpec(
        prompt=spec.prompt,
        seed=spec.seed,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        task=spec.task,
        init_image=spec.init_image,
        mask_image=spec.mask_image,
        strength=spec.strength,
        adapters=spec.adapters,
    )


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
        generated = self._engine.generate([generation_spec(s) for s in specs])
        return [
            RawImage(pixels=g.image, seed=g.seed, width=g.width, height=g.height, index=i)
            for i, g in enumerate(generated)
        ]


def model_label(model: ModelIdentity) -> str:
    """The model as the image's XMP/C2PA names it: with its LoRA adapters, if any
    (`...+lora:name@sha256-prefix*weight`)."""
    base = f"{model.name}@{model.revision}" if model.revision else model.name
    return base + adapters_label(model.adapters)


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
        inputs: Sequence[InputImage] = (),
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
                template=template_record(request),
                inputs=tuple(Input(i.role, i.data, i.format, i.uri) for i in inputs),
            ),
            c2pa=self._c2pa,
        )
        return EncodedImage(marked, request.format, image.width, image.height, image.seed)

    def mark_derived(
        self,
        derived: Any,
        *,
        source: EncodedImage,
        request: GenerationRequest,
        model: ModelIdentity,
        created_at: datetime,
        plugin: str,
    ) -> EncodedDerived:
        image: DerivedImage = derived
        edits = edit_actions(
            source_size=(source.width, source.height),
            crop=_crop_box(image.details),
            size=(image.width, image.height),
            source_format=source.format.value,
            format=image.format,
        )
        marked = mark_derived_image(
            image.data,
            image.format,  # type: ignore[arg-type]  # checked by the service
            ProvenanceInfo(
                request_id=request.request_id,
                model_identity=model_label(model),
                creator_tool=self._creator_tool,
                image_index=image.source_index,
                seed=source.seed,
                created_at=created_at,  # as for the original: a retry, the same XMP
                template=template_record(request),
            ),
            parent=source.data,
            parent_format=source.format.value,
            name=image.name,
            edits=edits,
            c2pa=self._c2pa,
        )
        return EncodedDerived(
            source_index=image.source_index,
            name=image.name,
            data=marked,
            format=image.format,
            width=image.width,
            height=image.height,
            plugin=plugin,
            details=dict(image.details),
        )


def _crop_box(details: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """The crop box a plugin reported (left, top, right, bottom), if it reported one in
    that shape: the details are the plugin's, so nothing else is assumed of them."""
    box = details.get("crop")
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
        return None
    return (box[0], box[1], box[2], box[3])


@dataclass(frozen=True, slots=True)
class _Upload:
    """One object of a request's outputs: an image or an image derived from one."""

    key: str
    data: bytes
    content_type: str
    metadata: dict[str, str]
    seed: int  # the (source) image's seed, which an adopted object's metadata must show
    digests: tuple[str, str] = field(init=False)
    # What the audit record says of the object besides its key, digest and size.
    listing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digests", wire.sha256_digests(self.data))


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
        derived: Sequence[EncodedDerived] = (),
    ) -> StoredOutputs:
        model = str(audit_record.get("model", {}).get("name", ""))
        uploads = [
            self._image_upload(request, created_at, index, image, model)
            for index, image in enumerate(images)
        ]
        uploads += [
            self._derived_upload(request, created_at, d, images[d.source_index], model)
            for d in derived
        ]
        record_key = audit_record_key(self._prefix, created_at, request.request_id)
        request_id = request.request_id
        puts = [self._uploads.submit(self._put, upload, request_id) for upload in uploads]
        if first_attempt:
            # No earlier attempt can have stored anything, so no object is adopted: each
            # keeps the digest computed here, and the record naming them goes up beside
            # them. On a retry the record waits for the objects (one may be adopted).
            planned = [StoredObjectRef("", u.key, None, u.digests[0], len(u.data)) for u in uploads]
            record = self._uploads.submit(
                self._put_record, record_key, request_id, audit_record, uploads, planned
            )
            refs = _results([*puts, record])[: len(uploads)]
            if [(r.sha256, r.size) for r in refs] != [(r.sha256, r.size) for r in planned]:
                # An object was adopted after all (an earlier attempt the ledger does not
                # know of, e.g. a ledger restored from a backup): the record just written
                # names other bytes. It is this request's own: replace it.
                self._store.delete_object(record_key)
                self._put_record(record_key, request_id, audit_record, uploads, refs)
        else:
            refs = _results(puts)
            self._put_record(record_key, request_id, audit_record, uploads, refs)
        count = len(images)
        return StoredOutputs(images=refs[:count], audit_record_key=record_key, derived=refs[count:])

    def _image_upload(
        self,
        request: GenerationRequest,
        created_at: datetime,
        index: int,
        image: EncodedImage,
        model: str,
    ) -> _Upload:
        fmt = image.format.value
        return _Upload(
            key=image_key(self._prefix, created_at, request.request_id, index, EXTENSIONS[fmt]),
            data=image.data,
            content_type=CONTENT_TYPES[fmt],
            metadata={
                "request-id": request.request_id,
                "user": request.on_behalf_of,
                "model": model,
                "seed": str(image.seed),
            },
            seed=image.seed,
        )

    def _derived_upload(
        self,
        request: GenerationRequest,
        created_at: datetime,
        image: EncodedDerived,
        source: EncodedImage,
        model: str,
    ) -> _Upload:
        key = rendition_key(
            self._prefix,
            created_at,
            request.request_id,
            image.source_index,
            image.name,
            EXTENSIONS[image.format],
        )
        return _Upload(
            key=key,
            data=image.data,
            content_type=CONTENT_TYPES[image.format],
            metadata={
                "request-id": request.request_id,
                "user": request.on_behalf_of,
                "model": model,
                "seed": str(source.seed),
                "plugin": image.plugin,
                "source-index": str(image.source_index),
                "rendition": image.name,
            },
            seed=source.seed,
            listing={
                "source_index": image.source_index,
                "rendition": image.name,
                "plugin": image.plugin,
            },
        )

    def _put(self, upload: _Upload, request_id: str) -> StoredObjectRef:
        try:
            stored = self._store.put_object(
                upload.key,
                upload.data,
                digests=upload.digests,
                content_type=upload.content_type,
                metadata=upload.metadata,
                tags=TAGS,
            )
        except ObjectConflictError:
            stored = self._adopt(upload.key, request_id=request_id, seed=upload.seed)
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
        uploads: Sequence[_Upload],
        refs: Sequence[StoredObjectRef],
    ) -> StoredObjectRef:
        objects = [
            {"key": r.key, "sha256": r.sha256, "bytes": r.size, **u.listing}
            for u, r in zip(uploads, refs, strict=True)
        ]
        record = {**audit_record, "objects": objects}
        try:
            stored = self._put_record_once(key, request_id, record)
        except ObjectConflictError:
            stored = self._adopt(key, request_id=request_id, seed=None)
            if self._recorded_objects(key) != objects:
                # An earlier attempt wrote its record beside its uploads and died before
                # all of them landed; this attempt stored (or adopted) other bytes for
                # some. A record must name the objects that are there: replace it.
                self._store.delete_object(key)
                stored = self._put_record_once(key, request_id, record)
        return StoredObjectRef(
            stored.bucket, stored.key, stored.version_id, stored.sha256, stored.size
        )

    def _put_record_once(
        self, key: str, request_id: str, record: Mapping[str, Any]
    ) -> StoredObject:
        return self._store.put_json(
            key, record, metadata={"request-id": request_id}, tags={"kind": "audit-record"}
        )

    def _recorded_objects(self, key: str) -> Any:
        """The objects an existing audit record names (None if it is not a record)."""
        try:
            return json.loads(self._store.get_object(key)).get("objects")
        except (ValueError, AttributeError):
            return None

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
