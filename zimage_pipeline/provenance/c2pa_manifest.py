"""C2PA manifests through c2pa-python: sign on the way out, verify in `provenance show`.

The manifest holds one `c2pa.created` action with the IPTC digital source type
`trainedAlgorithmicMedia`, and a small `org.zimage-pipeline.request` assertion tying the
image to its request and model. A derived image's manifest (a rendition) has the image it
was made from as its parent ingredient (relationship `parentOf`; the parent's own
manifest is embedded with it), a `c2pa.opened` action naming that ingredient, and the
edits made (`c2pa.cropped`, `c2pa.resized`, ...). Signing needs an end-entity certificate (not
self-signed, key usage digitalSignature, an EKU C2PA accepts such as emailProtection or
documentSigning) followed by its intermediates, and the matching private key.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import c2pa
from pydantic import SecretStr

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.provenance.containers import PNG_SIGNATURE, png_chunk
from zimage_pipeline.provenance.errors import ProvenanceError
from zimage_pipeline.provenance.xmp import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
)
from zimage_pipeline.settings import ProvenanceSettings

MIME_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
}
REQUEST_ASSERTION = "org.zimage-pipeline.request"
_PARENT_LABEL = "parent"  # how the c2pa.opened action names the parent ingredient
_TINY_PNG = (
    PNG_SIGNATURE
    + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    + png_chunk(b"IDAT", zlib.compress(b"\x00\x00"))
    + png_chunk(b"IEND", b"")
)
# Failure codes about whom to trust, not about whether the file is intact.
TRUST_FAILURES = ("signingCredential.untrusted",)


@dataclass(frozen=True, slots=True)
class C2paSigningConfig:
    algorithm: str
    cert_chain_pem: str
    private_key_pem: SecretStr = field(repr=False)
    timestamp_url: str | None = None
    thumbnail: bool = False


@dataclass(frozen=True, slots=True)
class C2paReport:
    present: bool
    validation_state: str | None = None  # "Valid", "Trusted" or "Invalid" (c2pa-rs)
    failures: tuple[str, ...] = ()
    digital_source_type: str | None = None
    actions: tuple[str, ...] = ()
    signer: str | None = None
    claim_generator: str | None = None
    request: dict[str, Any] | None = None
    error: str | None = None
    # Each ingredient: title, relationship ("parentOf" for a derived image's source),
    # format, and whether it brought a manifest of its own.
    ingredients: tuple[dict[str, Any], ...] = ()

    @property
    def verified(self) -> bool:
        """The signature and every hash check out (the signer may still be untrusted)."""
        integrity = [f for f in self.failures if not f.startswith(TRUST_FAILURES)]
        return self.validation_state in ("Valid", "Trusted") and not integrity and not self.error

    @property
    def trusted(self) -> bool:
        return self.verified and self.validation_state == "Trusted"


@dataclass(frozen=True, slots=True)
class Parent:
    """The image a derived one was made from: its parent ingredient."""

    data: bytes  # as stored, with its own manifest (embedded in the ingredient)
    format: str  # png | webp | jpeg | avif
    title: str


@dataclass(frozen=True, slots=True)
class Input:
    """An image the model was given (image-to-image, inpainting): an ingredient."""

    role: str  # init_image | mask
    data: bytes  # as read from the store
    format: str  # png | webp | jpeg
    title: str


def load_signing_config(settings: ProvenanceSettings) -> C2paSigningConfig | None:
    """The signing material from settings, tried once; None when signing is off."""
    if not settings.c2pa_enabled:
        return None
    assert settings.c2pa_cert_chain_file is not None  # enforced by the settings validator
    try:
        chain = settings.c2pa_cert_chain_file.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"provenance.c2pa_cert_chain_file: cannot read: {exc}") from exc
    key = settings.resolved_private_key()
    assert key is not None
    config = C2paSigningConfig(
        algorithm=settings.c2pa_algorithm.value,
        cert_chain_pem=chain,
        private_key_pem=key,
        timestamp_url=settings.c2pa_timestamp_url,
        thumbnail=settings.c2pa_thumbnail,
    )
    try:
        # Signing is where c2pa-rs checks the certificate profile: sign a 1x1 PNG now so a
        # bad certificate stops the worker at startup, not at its first request.
        sign_sample(config)
    except ProvenanceError as exc:
        # c2pa-rs checks the certificate profile here: say so without echoing the key.
        raise ConfigError(
            f"provenance: C2PA certificate chain or key not usable ({exc}); "
            "the signer must be an end-entity certificate with digitalSignature and an "
            "emailProtection or documentSigning EKU, issued by a CA"
        ) from None
    return config


def sign_sample(config: C2paSigningConfig) -> bytes:
    """A 1x1 PNG signed with `config`: the startup self-test, and what `check` verifies."""
    return sign(
        _TINY_PNG,
        "png",
        title="self-test.png",
        creator_tool="self-test",
        model_identity="self-test",
        request={},
        config=config,
    )


def _signer(config: C2paSigningConfig) -> Any:
    info = c2pa.C2paSignerInfo(
        config.algorithm,
        config.cert_chain_pem.encode("ascii"),
        config.private_key_pem.get_secret_value().encode("ascii"),
        config.timestamp_url,
    )
    return c2pa.Signer.from_info(info)


def sign(
    data: bytes,
    fmt: str,
    *,
    title: str,
    creator_tool: str,
    model_identity: str,
    request: dict[str, Any],
    config: C2paSigningConfig,
    parent: Parent | None = None,
    edits: Sequence[str] = (),
    inputs: Sequence[Input] = (),
) -> bytes:
    """Embed a signed manifest; the returned bytes are the complete new file. With a
    `parent`, the image is derived from it by `edits` (C2PA action names). With `inputs`,
    the model edited them (the init image is the parent ingredient, a mask an input to
    the model), and the image is a composite with trained algorithmic media."""
    if inputs:
        actions = _edited_actions(model_identity, inputs)
    elif parent is None:
        actions = [
            {
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": model_identity},
            }
        ]
    else:
        actions = _derived_actions(creator_tool, edits)
    manifest = {
        "claim_generator_info": [{"name": creator_tool}],
        "title": title,
        "format": MIME_TYPES[fmt],
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": actions}},
            {"label": REQUEST_ASSERTION, "data": request},
        ],
    }
    # A fresh context and signer per call: the worker signs from several threads.
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": config.thumbnail}}})
    out = io.BytesIO()
    try:
        with _signer(config) as signer, c2pa.Builder.from_json(manifest, context) as builder:
            if parent is not None:
                _add_parent(builder, parent)
            for item in inputs:
                _add_input(builder, item)
            builder.sign(signer, MIME_TYPES[fmt], io.BytesIO(data), out)
    except c2pa.C2paError as exc:
        raise ProvenanceError(f"C2PA signing failed: {type(exc).__name__}") from exc
    return out.getvalue()


def _derived_actions(creator_tool: str, edits: Sequence[str]) -> list[dict[str, Any]]:
    """`c2pa.opened` on the parent (a C2PA 2 manifest must start with created or opened,
    and opened must name its ingredient), then the edits."""
    agent = {"name": creator_tool}
    opened = {
        "action": "c2pa.opened",
        # What the parent is, so the derived manifest says it too without a reader
        # having to walk into the ingredient: the parent is always generated here.
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
        "parameters": {"ingredientIds": [_PARENT_LABEL]},
    }
    return [opened, *({"action": edit, "softwareAgent": agent} for edit in edits)]


def _edited_actions(model_identity: str, inputs: Sequence[Input]) -> list[dict[str, Any]]:
    """`c2pa.opened` on the init image, then `c2pa.edited` by the model, naming every
    input it was given (the mask too)."""
    agent = {"name": model_identity}
    return [
        {"action": "c2pa.opened", "parameters": {"ingredientIds": [inputs[0].role]}},
        {
            "action": "c2pa.edited",
            "digitalSourceType": COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": agent,
            "parameters": {"ingredientIds": [item.role for item in inputs]},
        },
    ]


def _add_input(builder: Any, item: Input) -> None:
    relationship = "parentOf" if item.role == "init_image" else "inputTo"
    ingredient = {"title": item.title, "relationship": relationship, "label": item.role}
    builder.add_ingredient(ingredient, MIME_TYPES[item.format], io.BytesIO(item.data))


def _add_parent(builder: Any, parent: Parent) -> None:
    # c2pa-rs reads the parent's manifest store from its bytes and embeds it in the
    # ingredient, so the derived image's provenance reaches back to the generation.
    ingredient = {"title": parent.title, "relationship": "parentOf", "label": _PARENT_LABEL}
    builder.add_ingredient(ingredient, MIME_TYPES[parent.format], io.BytesIO(parent.data))


def verify(data: bytes, fmt: str | None, *, trust_anchors_pem: str | None = None) -> C2paReport:
    """Read and validate the embedded manifest; never raises for a bad or missing one."""
    # Offline by design: no remote manifests, no OCSP. Trust is judged only when anchors
    # are given; without them "Valid" means intact and correctly signed.
    verify_settings = {
        "remote_manifest_fetch": False,
        "ocsp_fetch": False,
        "verify_trust": bool(trust_anchors_pem),
    }
    settings: dict[str, Any] = {"verify": verify_settings}
    if trust_anchors_pem:
        settings["trust"] = {"trust_anchors": trust_anchors_pem}
    try:
        context = c2pa.Context.from_dict(settings)
        with c2pa.Reader(MIME_TYPES.get(fmt or "", ""), io.BytesIO(data), None, context) as reader:
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
            manifest = reader.get_active_manifest() or {}
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__ or "JumbfNotFound" in str(exc):
            return C2paReport(present=False)
        return C2paReport(present=True, validation_state="Invalid", error=str(exc)[:200])
    return _report(state, results, manifest)


def _failures(results: dict[str, Any]) -> tuple[str, ...]:
    """The active manifest's failures and its ingredients' (a derived image is only as
    sound as the provenance of what it was made from)."""
    found = list((results.get("activeManifest") or {}).get("failure", []))
    for delta in results.get("ingredientDeltas") or []:
        found += (delta.get("validationDeltas") or {}).get("failure", [])
    return tuple(f"{item.get('code')}: {item.get('explanation', '')}" for item in found)


def _ingredients(manifest: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "title": item.get("title"),
            "relationship": item.get("relationship"),
            "format": item.get("format"),
            "has_manifest": bool(item.get("active_manifest")),
        }
        for item in manifest.get("ingredients") or []
    )


def _report(state: str | None, results: dict[str, Any], manifest: dict[str, Any]) -> C2paReport:
    failures = _failures(results)
    actions: list[str] = []
    source_type = None
    request = None
    for assertion in manifest.get("assertions", []):
        label = str(assertion.get("label", ""))
        if label.startswith("c2pa.actions"):
            for action in assertion.get("data", {}).get("actions", []):
                actions.append(str(action.get("action")))
                source_type = source_type or action.get("digitalSourceType")
        elif label == REQUEST_ASSERTION:
            request = assertion.get("data")
    info = manifest.get("signature_info") or {}
    generators = manifest.get("claim_generator_info") or [{}]
    return C2paReport(
        present=True,
        validation_state=state,
        failures=failures,
        digital_source_type=source_type,
        actions=tuple(actions),
        signer=", ".join(str(info[k]) for k in ("common_name", "issuer") if info.get(k)) or None,
        claim_generator=generators[0].get("name"),
        request=request,
        ingredients=_ingredients(manifest),
    )


def manifest_json(data: bytes, fmt: str | None) -> str | None:
    """The raw manifest store as JSON, for `provenance show --json`."""
    try:
        with c2pa.Reader(MIME_TYPES.get(fmt or "", ""), io.BytesIO(data)) as reader:
            return json.dumps(json.loads(reader.json()), indent=2)
    except c2pa.C2paError:
        return None
