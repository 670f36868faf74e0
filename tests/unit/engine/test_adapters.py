"""LoRA adapters on the tiny model: loaded after their hash is checked, applied in fixed
slots (several at once, with weights), kept in an LRU, unloaded cleanly, and batched only
with the same adapters."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_pipeline.adapters import AdapterEntry
from zimage_pipeline.engine import EngineConfig, TurboEngine, load_engine
from zimage_pipeline.engine.adapters import AdapterRefused, verify_entry
from zimage_pipeline.engine.batching import plan_batches
from zimage_pipeline.engine.types import GenerationSpec
from zimage_pipeline.errors import ConfigError

SIZE = 64
RANK = 4


def make_lora(model_dir: Path, out: Path, *, seed: int, rank: int = RANK, alpha: int = 0) -> Path:
    """A random LoRA for the tiny transformer, made as a trainer would (peft on the
    transformer's attention and feed-forward layers), saved by diffusers."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = ZImageTransformer2DModel.from_pretrained(model_dir / "transformer")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"],
        init_lora_weights=False,  # random A and B: a visible effect
    )
    torch.manual_seed(seed)
    inject_adapter_in_model(config, transformer, adapter_name="default")
    state = get_peft_model_state_dict(transformer, adapter_name="default")
    state = {k: v * 3 for k, v in state.items()}  # strong enough to change every image
    metadata = {"r": rank, "lora_alpha": alpha} if alpha else None
    ZImagePipeline.save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return out / "pytorch_lora_weights.safetensors"


def entry(name: str, path: Path, **fields: object) -> AdapterEntry:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    options: dict[str, object] = {"sha256": digest}
    options.update(fields)
    return AdapterEntry(name=name, path=str(path), **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(tiny_model_dir, root / name, seed=i) for i, name in enumerate("abc")}


@pytest.fixture
def lora_engine(tiny_model_dir: Path, loras: dict[str, Path]) -> Callable[..., TurboEngine]:
    def make(**overrides: object) -> TurboEngine:
        options: dict[str, object] = {
            "model_path": str(tiny_model_dir),
            "device": "cpu",
            "adapters": tuple(entry(name, path) for name, path in loras.items()),
            "adapter_rank": 8,
        }
        options.update(overrides)
        return load_engine(EngineConfig(**options))  # type: ignore[arg-type]

    return make


def pixels(engine: TurboEngine, *adapters: tuple[str, float], seed: int = 5) -> np.ndarray:
    spec = GenerationSpec(
        "a teapot", seed=seed, width=SIZE, height=SIZE, steps=2, adapters=tuple(adapters)
    )
    return np.asarray(engine.generate([spec])[0].image, dtype=np.int16)


def test_an_adapter_changes_the_image_deterministically_and_unloads_cleanly(
    lora_engine: Callable[..., TurboEngine], make_engine: Callable[..., TurboEngine]
) -> None:
    engine = lora_engine()
    plain = pixels(make_engine())  # no catalogue at all: no LoRA layers
    assert np.array_equal(pixels(engine), plain)  # empty slots, disabled: the model's own
    styled = pixels(engine, ("a", 1.0))
    assert np.abs(styled - plain).mean() > 1.0
    assert np.array_equal(pixels(engine, ("a", 1.0)), styled)  # same seed + adapter
    assert np.array_equal(pixels(engine), plain)  # none again: disabled
    engine.adapters.unload_all()  # type: ignore[union-attr]
    assert engine.adapters.loaded == []  # type: ignore[union-attr]
    assert np.array_equal(pixels(engine), plain)
    assert np.array_equal(pixels(engine, ("a", 1.0)), styled)  # reloaded from the file


def test_two_adapters_at_once_with_weights(lora_engine: Callable[..., TurboEngine]) -> None:
    engine = lora_engine()
    a = pixels(engine, ("a", 1.0))
    both = pixels(engine, ("a", 1.0), ("b", 0.7))
    lighter = pixels(engine, ("a", 1.0), ("b", 0.2))
    assert not np.array_equal(both, a)
    assert not np.array_equal(both, lighter)  # the weight counts
    assert np.array_equal(pixels(engine, ("a", 1.0), ("b", 0.7)), both)
    assert np.array_equal(pixels(engine, ("a", 1.0)), a)  # slot b emptied again


def test_weight_zero_is_the_plain_model_and_order_of_slots_does_not_matter(
    lora_engine: Callable[..., TurboEngine],
) -> None:
    engine = lora_engine()
    plain = pixels(engine)
    assert np.abs(pixels(engine, ("a", 0.0)) - plain).max() <= 1  # LoRA path, zero delta
    ab = pixels(engine, ("a", 0.5), ("b", 0.5)).astype(np.int32)
    ba = pixels(engine, ("b", 0.5), ("a", 0.5)).astype(np.int32)
    assert np.abs(ab - ba).max() <= 1  # a sum: only float rounding differs


def test_the_lru_keeps_at_most_n_and_drops_the_least_recently_used(
    lora_engine: Callable[..., TurboEngine],
) -> None:
    engine = lora_engine(max_loaded_adapters=2, adapter_slots=1)
    slots = engine.adapters
    assert slots is not None
    first = pixels(engine, ("a", 1.0))
    pixels(engine, ("b", 1.0))
    pixels(engine, ("a", 1.0))  # a is now the most recent
    assert slots.loaded == ["b", "a"]
    pixels(engine, ("c", 1.0))
    assert slots.loaded == ["a", "c"]  # b, least recently used, dropped
    reads = slots.reads
    assert np.array_equal(pixels(engine, ("a", 1.0)), first)  # still warm: no file read
    assert slots.reads == reads
    pixels(engine, ("b", 1.0))
    assert slots.reads == reads + 1  # b was gone: read again


def test_more_adapters_than_slots_is_refused(lora_engine: Callable[..., TurboEngine]) -> None:
    engine = lora_engine(adapter_slots=1, max_loaded_adapters=2)
    with pytest.raises(AdapterRefused, match="1 slots"):
        pixels(engine, ("a", 1.0), ("b", 1.0))


def test_a_file_whose_hash_does_not_match_is_refused_and_reported(
    lora_engine: Callable[..., TurboEngine], loras: dict[str, Path]
) -> None:
    wrong = entry("a", loras["a"], sha256="0" * 64)
    engine = lora_engine(adapters=(wrong,))
    plain = pixels(engine)
    with pytest.raises(
        AdapterRefused, match=r"adapter 'a' refused: its file's sha256 [0-9a-f]{64}"
    ):
        pixels(engine, ("a", 1.0))
    assert engine.adapters.loaded == []  # type: ignore[union-attr]
    assert np.array_equal(pixels(engine), plain)  # nothing of it was loaded
    assert "is not the catalogue's" in (verify_entry(wrong) or "")
    assert verify_entry(entry("a", loras["a"])) is None


def test_an_adapter_of_a_larger_rank_than_the_slots_is_refused(
    lora_engine: Callable[..., TurboEngine], tiny_model_dir: Path, tmp_path: Path
) -> None:
    big = make_lora(tiny_model_dir, tmp_path / "big", seed=9, rank=16)
    engine = lora_engine(adapters=(entry("big", big),), adapter_rank=8)
    with pytest.raises(AdapterRefused, match=r"rank 16 is over engine\.adapter_rank"):
        pixels(engine, ("big", 1.0))


def test_alpha_in_the_files_metadata_scales_the_adapter(
    lora_engine: Callable[..., TurboEngine], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Same weights, alpha = 2 x rank: the same as weight 2 of the alpha-less file.
    plain_file = make_lora(tiny_model_dir, tmp_path / "p", seed=3)
    alpha_file = make_lora(tiny_model_dir, tmp_path / "q", seed=3, alpha=2 * RANK)
    engine = lora_engine(adapters=(entry("p", plain_file), entry("q", alpha_file)))
    doubled = pixels(engine, ("p", 2.0)).astype(np.int32)
    assert np.abs(pixels(engine, ("q", 1.0)).astype(np.int32) - doubled).max() <= 1


def test_an_adapter_without_a_catalogue_is_an_invalid_spec(
    make_engine: Callable[..., TurboEngine],
) -> None:
    from zimage_pipeline.engine.errors import InvalidGenerationSpec

    with pytest.raises(InvalidGenerationSpec, match="no LoRA adapters"):
        pixels(make_engine(), ("a", 1.0))


def test_adapters_and_fp8_are_exclusive(tiny_model_dir: Path, loras: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        EngineConfig(
            model_path=str(tiny_model_dir), adapters=(entry("a", loras["a"]),), linear_fp8=True
        )


def test_batches_group_only_the_same_adapters_and_weights() -> None:
    def spec(*adapters: tuple[str, float]) -> GenerationSpec:
        return GenerationSpec("x", seed=1, width=SIZE, height=SIZE, adapters=tuple(adapters))

    specs = [
        spec(),
        spec(("a", 1.0)),
        spec(("a", 0.5)),
        spec(("a", 1.0)),
        spec(("a", 1.0), ("b", 1.0)),
        spec(),
    ]
    assert plan_batches(specs, lambda _: 8) == [[0, 5], [1, 3], [2], [4]]


def test_a_batch_of_mixed_adapters_gives_each_image_its_own(
    lora_engine: Callable[..., TurboEngine],
) -> None:
    engine = lora_engine()
    alone = [pixels(engine, ("a", 1.0), seed=1), pixels(engine, seed=2)]
    specs = [
        GenerationSpec(
            "a teapot", seed=1, width=SIZE, height=SIZE, steps=2, adapters=(("a", 1.0),)
        ),
        GenerationSpec("a teapot", seed=2, width=SIZE, height=SIZE, steps=2),
    ]
    together = [np.asarray(g.image, dtype=np.int16) for g in engine.generate(specs)]
    for mine, reference in zip(together, alone, strict=True):
        assert np.array_equal(mine, reference)


def test_switching_adapters_does_not_recompile_the_blocks(
    lora_engine: Callable[..., TurboEngine],
) -> None:
    """The blocks compiled (dynamo with the eager backend: the guards are what matter)
    see the same tensors whatever the adapters: a switch recompiles nothing."""
    from torch._dynamo.utils import counters

    engine = lora_engine()
    engine.pipeline.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    pixels(engine)  # compiles: LoRA disabled
    pixels(engine, ("a", 1.0))  # compiles: LoRA enabled
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the blocks really were compiled
    recompiles = sum(counters["recompiles"].values())
    for adapters in ([("b", 0.3)], [("a", 1.0), ("b", 0.5)], [("c", 0.8)], [], [("a", 0.1)]):
        pixels(engine, *adapters)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) == recompiles
