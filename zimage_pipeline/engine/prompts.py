"""Prompt encoding with bucketed lengths and CUDA graphs (``engine.text_encoder_graphs``).

What diffusers' ``ZImagePipeline._encode_prompt`` computes for a prompt is the second-last
hidden state of the Qwen3 encoder at the prompt's real tokens (chat template applied,
at most 512 tokens). The encoder is causal, so a real token sees only the tokens before
it; with the prompt's tokens first and padding after them, the padding changes nothing
a real token sees, with or without an attention mask. This module computes exactly that:

- prompts padded on the right to a bucketed length (a multiple of ``bucket`` tokens), so
  a handful of shapes serve every prompt;
- no attention mask: pure causal attention (SDPA's ``is_causal``), which needs no mask
  tensor and no host-side check of it (sliding-window encoders keep transformers' masks);
- each distinct text encoded once per call (a request's images share their prompt);
- on a CUDA device, one CUDA graph per (distinct prompts, bucket), captured on first use
  and replayed after: the 36-layer encoder is about 900 small kernels whose launches,
  not their arithmetic, took ~45 ms per prompt; a replay launches them all at once.

If a capture fails (an operation that cannot be captured in some library version), the
encoder logs why and runs eagerly from then on, with the same results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # diffusers' limit for Z-Image prompts, in tokens


def bucketed(length: int, bucket: int) -> int:
    """The padded length for a prompt of ``length`` tokens: the next multiple of
    ``bucket``, at most 512 (the longest a prompt is truncated to)."""
    if bucket <= 1:
        return length
    return min(-(-length // bucket) * bucket, max(MAX_SEQUENCE_LENGTH, length))


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids diffusers' ``_encode_prompt`` gives this prompt (its chat template, then the
    tokenizer truncating at 512), without its padding."""
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    return list(tokenizer(templated, truncation=True, max_length=MAX_SEQUENCE_LENGTH).input_ids)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    ids: Any  # static input [n, L]
    hidden: Any  # static output [n, L, hidden]


class PromptEncoder:
    """Not thread-safe: called from the engine's one GPU thread."""

    def __init__(self, pipeline: Any, device: Any, *, bucket: int, graphs: bool) -> None:
        self.pipeline = pipeline
        self.device = device
        self.bucket = bucket
        self.use_graphs = graphs and device.type == "cuda"
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self.graph_error: str | None = None  # why graphs were given up, if they were

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def encode(self, texts: list[str]) -> list[Any]:
        """One ``[tokens, hidden]`` embedding per text, in order (equal texts share one)."""
        import torch

        distinct = list(dict.fromkeys(texts))
        ids = [token_ids(self.pipeline.tokenizer, text) for text in distinct]
        length = bucketed(max(len(i) for i in ids), self.bucket)
        pad = self.pipeline.tokenizer.pad_token_id or 0
        rows = [i + [pad] * (length - len(i)) for i in ids]
        batch = torch.tensor(rows, dtype=torch.long).to(self.device)
        hidden = self._hidden(batch)
        # Host-side lengths: no boolean-mask indexing, so no device sync here.
        by_text = {
            text: hidden[row, : len(i)].clone()
            for row, (text, i) in enumerate(zip(distinct, ids, strict=True))
        }
        return [by_text[text] for text in texts]

    # -- running the encoder -----------------------------------------------------

    def _forward(self, ids: Any) -> Any:
        encoder = self.pipeline.text_encoder
        # No mask: causal attention only. Passed as transformers' prepared mask mapping
        # (None per attention type) so that SDPA runs in its causal mode both eagerly and
        # while a graph is captured; given no mapping, transformers builds an explicit
        # causal mask during capture, which selects another attention kernel (measured:
        # 2.6e-2 relative difference on random weights, bf16 rounding only).
        layer_types = set(getattr(encoder.config, "layer_types", None) or ["full_attention"])
        masks = {kind: None for kind in layer_types} if layer_types == {"full_attention"} else None
        out = encoder(input_ids=ids, attention_mask=masks, output_hidden_states=True)
        return out.hidden_states[-2]  # as diffusers takes it

    def _hidden(self, ids: Any) -> Any:
        if not self.use_graphs:
            return self._forward(ids)
        key = (int(ids.shape[0]), int(ids.shape[1]))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(ids)
            if entry is None:
                return self._forward(ids)
            self._graphs[key] = entry
        entry.ids.copy_(ids)
        entry.graph.replay()
        return entry.hidden

    def _capture(self, ids: Any) -> _Graph | None:
        import torch

        try:
            if self._pool is None:
                # One memory pool for all graphs: they never run concurrently, and each
                # replay's output is copied out (encode clones) before the next replay.
                self._pool = torch.cuda.graph_pool_handle()
            static_ids = ids.clone()
            cuda: Any = torch.cuda  # partly unannotated
            side = cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, handles
                for _ in range(2):
                    self._forward(static_ids)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden = self._forward(static_ids)
        except Exception as exc:  # not capturable here: eager from now on, same results
            self.graph_error = f"{type(exc).__name__}: {exc}"[:300]
            self.use_graphs = False
            log.warning("text encoder CUDA graph capture failed, running eagerly: %s", exc)
            return None
        log.info("text encoder CUDA graph captured for %d prompt(s) x %d tokens", *ids.shape)
        return _Graph(graph=graph, ids=static_ids, hidden=hidden)
