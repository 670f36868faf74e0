"""Which specs run together: equal size, steps, guidance, task, strength and adapters
(names and weights), at most ``limit`` at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zimage_pipeline.engine.types import BatchKey, GenerationSpec


def plan_batches(
    specs: Sequence[GenerationSpec], limit: Callable[[GenerationSpec], int]
) -> list[list[int]]:
    """Indices of specs grouped into batches, groups in order of first appearance.

    ``limit(spec)`` is the largest batch for that spec's shape (max_batch, lowered after an
    out-of-memory at that size).
    """
    groups: dict[BatchKey, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(spec.batch_key, []).append(index)
    batches: list[list[int]] = []
    for indices in groups.values():
        size = max(1, limit(specs[indices[0]]))
        batches.extend(indices[start : start + size] for start in range(0, len(indices), size))
    return batches
