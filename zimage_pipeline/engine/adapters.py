"""LoRA style adapters on the resident transformer, switched without recompiling.

diffusers' Z-Image LoRA support (``ZImageLoraLoaderMixin``) injects peft LoRA layers
named after the adapter; ``set_adapters`` then changes Python state (the active names,
float scalings) that torch.compile guards on, so every new combination of adapters or
weights would recompile the transformer's blocks. Here the transformer instead carries
``adapter_slots`` fixed LoRA layers (``slot0``, ``slot1``, ...) of rank
``adapter_rank`` on every linear layer of its blocks, created once before compiling
(zeros: they add nothing), their scalings turned into tensors by peft's
``prepare_model_for_compiled_hotswap``. Running a request's adapters copies each one's
weights into a slot in place (diffusers' ``load_lora_weights(..., hotswap=True)``; the
request's weight folded into ``lora_B``) and zeroes the unused slots: the same tensors,
the same graph, no recompilation. A request without adapters runs with the LoRA layers
disabled (peft's ``disable_adapters``: one more graph variant, compiled at warmup).

The catalogue's files are read on demand: the bytes are hashed and compared with the
catalogue's SHA-256 before anything is loaded from them (the same bytes are then
parsed, so the file cannot change in between), and at most ``max_loaded_adapters``
state dicts stay in device memory, least recently used dropped first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_pipeline.adapters import AdapterEntry
from zimage_pipeline.engine.errors import GenerationFailed
from zimage_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

SLOT_PREFIX = "slot"
_BLOCK_CLASS = "ZImageTransformerBlock"
_PREFIX = "transformer."


class AdapterRefused(GenerationFailed):
    """A catalogue adapter that cannot be used: its file is missing, its bytes do not
    have the catalogue's SHA-256, or its layers do not fit the engine's slots. The
    request fails (an operator must fix the catalogue); nothing of it was loaded."""


# -- the catalogue's files ------------------------------------------------------------


def weights_file(path: str | Path) -> Path:
    """The weights file of a catalogue path: the file itself, or the one .safetensors
    file of a directory. Raises ConfigError naming the problem."""
    location = Path(path)
    if location.is_dir():
        found = sorted(location.glob("*.safetensors"))
        if len(found) != 1:
            raise ConfigError(
                f"{location}: a directory must hold exactly one .safetensors file, "
                f"found {len(found)}"
            )
        return found[0]
    if not location.is_file():
        raise ConfigError(f"{location}: no such adapter file")
    if location.suffix != ".safetensors":
        raise ConfigError(f"{location}: adapters are read from .safetensors files only")
    return location


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_entry(entry: AdapterEntry) -> str | None:
    """Why `entry` cannot be used (missing file, hash mismatch), or None: `check`'s probe."""
    try:
        found = file_sha256(weights_file(entry.path))
    except (ConfigError, OSError) as exc:
        return str(exc)
    if found != entry.sha256:
        return f"file sha256 {found} is not the catalogue's {entry.sha256}"
    return None


def read_adapter(entry: AdapterEntry) -> dict[str, Any]:
    """The adapter's LoRA state dict (diffusers keys, ``transformer.`` prefix), read from
    bytes whose SHA-256 was checked first; alphas folded into ``lora_B`` so every slot
    runs at scale 1. Raises AdapterRefused."""
    from safetensors.torch import load

    try:
        data = weights_file(entry.path).read_bytes()
    except (ConfigError, OSError) as exc:
        raise AdapterRefused(f"adapter {entry.name!r}: {exc}") from exc
    found = hashlib.sha256(data).hexdigest()
    if found != entry.sha256:
        raise AdapterRefused(
            f"adapter {entry.name!r} refused: its file's sha256 {found} is not the "
            f"catalogue's {entry.sha256}"
        )
    try:
        tensors = load(data)
        state = _to_diffusers(tensors)
    except AdapterRefused:
        raise
    except Exception as exc:
        raise AdapterRefused(f"adapter {entry.name!r}: not a LoRA file: {exc}") from exc
    scale = _metadata_scale(entry, data)
    if scale != 1.0:
        state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
    return state


def _to_diffusers(tensors: dict[str, Any]) -> dict[str, Any]:
    """diffusers' own conversion (kohya / ai-toolkit layouts, their alphas folded in)."""
    from diffusers import ZImagePipeline

    state = ZImagePipeline.lora_state_dict(dict(tensors))
    if not state or not all(".lora_A." in k or ".lora_B." in k for k in state):
        raise AdapterRefused("only LoRA (lora_A / lora_B) layers are supported")
    return {k if k.startswith(_PREFIX) else _PREFIX + k: v for k, v in state.items()}


def _metadata_scale(entry: AdapterEntry, data: bytes) -> float:
    """alpha / r from a peft-style file's metadata (diffusers' save_lora_weights writes
    ``transformer.lora_alpha`` and ``transformer.r``); 1 without it (diffusers' rule)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    if not raw:
        return 1.0
    meta = json.loads(raw)
    if meta.get(f"{_PREFIX}alpha_pattern") or meta.get(f"{_PREFIX}rank_pattern"):
        raise AdapterRefused(
            f"adapter {entry.name!r}: per-module alpha or rank patterns are not supported"
        )
    rank = meta.get(f"{_PREFIX}r")
    alpha = meta.get(f"{_PREFIX}lora_alpha", rank)
    if not rank:
        return 1.0
    divisor: float = float(rank) ** 0.5 if meta.get(f"{_PREFIX}use_rslora") else float(rank)
    return float(alpha) / divisor


# -- the slots ------------------------------------------------------------------------


def slot_names(count: int) -> list[str]:
    return [f"{SLOT_PREFIX}{i}" for i in range(count)]


def slot_targets(transformer: Any) -> dict[str, tuple[int, int]]:
    """Every linear layer of the transformer's blocks (attention, feed-forward,
    modulation): module name -> (in, out) features."""
    from torch import nn

    targets: dict[str, tuple[int, int]] = {}
    for name, module in transformer.named_modules():
        if type(module).__name__ != _BLOCK_CLASS:
            continue
        for inner, layer in module.named_modules():
            if isinstance(layer, nn.Linear) and inner:
                targets[f"{name}.{inner}"] = (layer.in_features, layer.out_features)
    return targets


def install_slots(pipe: Any, *, slots: int, rank: int) -> int:
    """Give the transformer `slots` zero LoRA layers of `rank` on every block's linear
    layers, their scalings as tensors, disabled until a request names adapters. Before
    compiling: the graphs then include them. Returns how many layers each slot covers."""
    import torch

    transformer = pipe.transformer
    if any(type(m).__name__ == "Fp8Linear" for m in transformer.modules()):
        raise ConfigError("LoRA adapters cannot run on FP8 layers: turn engine.linear_fp8 off")
    if getattr(transformer.layers[0].attention, "to_qkv", None) is not None:
        raise ConfigError("LoRA adapters need unfused projections (fusion is skipped for them)")
    targets = slot_targets(transformer)
    param = next(transformer.parameters())
    for name in slot_names(slots):
        zeros: dict[str, Any] = {}
        for module, (fan_in, fan_out) in targets.items():
            zeros[f"{_PREFIX}{module}.lora_A.weight"] = torch.zeros(
                rank, fan_in, dtype=param.dtype, device=param.device
            )
            zeros[f"{_PREFIX}{module}.lora_B.weight"] = torch.zeros(
                fan_out, rank, dtype=param.dtype, device=param.device
            )
        with warnings.catch_warnings():
            # peft warns that a model with one adapter gets another: that is the design.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(zeros, adapter_name=name)
    pipe.set_adapters(slot_names(slots), [1.0] * slots)  # scale 1: weights are folded in
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    # Scalings become tensors (a hotswap fills them in place instead of replacing a
    # float dynamo guards on); the rank stays `rank`, the slots' own.
    prepare_model_for_compiled_hotswap(transformer, target_rank=rank, check_compiled="error")
    pipe.disable_lora()
    log.info("%d LoRA slots of rank %d on %d layers", slots, rank, len(targets))
    return len(targets)


@dataclass(frozen=True, slots=True)
class SwitchTimings:
    """Seconds of the last switch: reading and hashing files (cache misses), filling
    the slots."""

    load_s: float
    set_s: float


class AdapterSlots:
    """The catalogue's adapters on one pipeline whose slots are installed. Called from
    the engine's GPU thread only."""

    def __init__(
        self,
        pipe: Any,
        catalogue: Iterable[AdapterEntry],
        *,
        slots: int,
        rank: int,
        max_loaded: int,
    ) -> None:
        if max_loaded < slots:
            raise ConfigError("max_loaded_adapters must be at least adapter_slots")
        self._pipe = pipe
        self._catalogue = {entry.name: entry for entry in catalogue}
        self._slots = slot_names(slots)
        self._rank = rank
        self._max_loaded = max_loaded
        self._targets = {  # the layers the slots wrap (peft's LoRA layers)
            f"{_PREFIX}{name}"
            for name, module in pipe.transformer.named_modules()
            if self._slots[0] in (getattr(module, "lora_A", None) or {})
        }
        self._loaded: OrderedDict[str, dict[str, Any]] = OrderedDict()  # LRU, newest last
        self._active: tuple[tuple[str, float], ...] = ()
        self._dirty = [False] * slots  # a slot holding weights (zeroed when unused)
        self.last_switch = SwitchTimings(0.0, 0.0)
        self.reads = 0  # adapter files read (cache misses)

    @property
    def loaded(self) -> list[str]:
        """Adapters in device memory, least recently used first."""
        return list(self._loaded)

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        return self._active

    def activate(self, adapters: Sequence[tuple[str, float]]) -> None:
        """Run the next batch with these (name, weight) pairs; none: LoRA disabled."""
        selection = tuple((name, float(weight)) for name, weight in adapters)
        if selection == self._active:
            for name, _ in selection:
                self._loaded.move_to_end(name)
            return
        if len(selection) > len(self._slots):
            raise AdapterRefused(
                f"{len(selection)} adapters at once; this engine has {len(self._slots)} slots"
            )
        started = time.perf_counter()
        states = [self._state(name, keep={n for n, _ in selection}) for name, _ in selection]
        loaded = time.perf_counter()
        for index, slot in enumerate(self._slots):
            if index < len(selection):
                self._fill(slot, states[index], selection[index][1])
                self._dirty[index] = True
            elif self._dirty[index]:
                self._zero(slot)
                self._dirty[index] = False
        if selection:
            self._pipe.enable_lora()
        else:
            self._pipe.disable_lora()
        self._active = selection
        self.last_switch = SwitchTimings(loaded - started, time.perf_counter() - loaded)

    def unload_all(self) -> None:
        """Drop every loaded adapter and empty the slots (LoRA disabled)."""
        self.activate(())
        for index, slot in enumerate(self._slots):
            self._zero(slot)
            self._dirty[index] = False
        self._loaded.clear()

    # -- internals -------------------------------------------------------------------

    def _state(self, name: str, *, keep: set[str]) -> dict[str, Any]:
        state = self._loaded.get(name)
        if state is not None:
            self._loaded.move_to_end(name)
            return state
        entry = self._catalogue.get(name)
        if entry is None:
            raise AdapterRefused(f"adapter {name!r} is not in this engine's catalogue")
        self.reads += 1
        state = self._checked(entry, read_adapter(entry))
        self._loaded[name] = state
        while len(self._loaded) > self._max_loaded:
            oldest = next(n for n in self._loaded if n not in keep)
            del self._loaded[oldest]  # its tensors are freed with the last reference
            log.info("adapter %s unloaded (least recently used)", oldest)
        log.info("adapter %s loaded (sha256 %s)", name, entry.sha256[:16])
        return state

    def _checked(self, entry: AdapterEntry, state: dict[str, Any]) -> dict[str, Any]:
        """Fit to the slots (layers they cover, rank at most theirs), on the device."""
        param = next(self._pipe.transformer.parameters())
        checked = {}
        for key, tensor in state.items():
            module = key.rsplit(".lora_", 1)[0]
            if module not in self._targets:
                raise AdapterRefused(
                    f"adapter {entry.name!r}: layer {module.removeprefix(_PREFIX)} is not "
                    "one the engine's slots cover (the blocks' linear layers)"
                )
            rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[1]
            if rank > self._rank:
                raise AdapterRefused(
                    f"adapter {entry.name!r}: rank {rank} is over engine.adapter_rank "
                    f"({self._rank})"
                )
            checked[key] = tensor.to(device=param.device, dtype=param.dtype)
        return checked

    def _fill(self, slot: str, state: dict[str, Any], weight: float) -> None:
        """Copy an adapter into `slot` in place, its weight folded into lora_B (the
        slot's scaling stays 1: changing it would be a new float for dynamo)."""
        scaled = {k: v * weight if ".lora_B." in k else v for k, v in state.items()}
        self._pipe.load_lora_weights(scaled, adapter_name=slot, hotswap=True)

    def _zero(self, slot: str) -> None:
        for module in self._pipe.transformer.modules():
            lora_b = getattr(module, "lora_B", None)
            if lora_b is not None and slot in lora_b:
                lora_b[slot].weight.data.zero_()
