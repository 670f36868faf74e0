"""The whole transformer forward replayed from a CUDA graph (``engine.transformer_graphs``).

With the blocks compiled, one forward is still ~600 kernel launches, 34 compiled-region
calls (each with its guard checks) and diffusers' eager glue (patchify, padding, RoPE
table, unpatchify): host work that the GPU waits for whenever the host falls behind. A
CUDA graph of the forward launches all of it at once. The graph replays the very kernels
the eager call ran, so its output is the same bit for bit.

A graph is specific to its input shapes (batch size, caption lengths, image size), so one
is kept per shape, least recently used first out. A new shape costs nothing extra: its
first forward runs eagerly (that is its own output), the second is captured and replayed.
A shape that fails to capture (an operation that cannot be captured) switches the graphs
off for good, with a warning: every later forward runs eagerly, with the same results.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # shapes kept; each holds only its inputs and outputs (a few MB)


@dataclass
class _Forward:
    graph: Any  # torch.cuda.CUDAGraph
    x: list[Any]
    t: Any
    caps: list[Any]
    out: list[Any]


def _key(x: list[Any], t: Any, caps: list[Any]) -> tuple[Any, ...]:
    def sig(v: Any) -> tuple[Any, ...]:
        return (tuple(v.shape), tuple(v.stride()), v.dtype, v.device)

    return (tuple(sig(v) for v in x), sig(t), tuple(sig(c) for c in caps))


class TransformerGraphs:
    """Installed as the transformer's ``forward``; not thread-safe (one GPU thread)."""

    def __init__(self, transformer: Any, *, max_graphs: int = MAX_GRAPHS) -> None:
        self.transformer = transformer
        self.eager = transformer.forward  # diffusers' bound forward
        self.max_graphs = max_graphs
        self.enabled = True
        self.error: str | None = None  # why graphs were switched off, if they were
        self.captures = 0
        self.replays = 0
        self._graphs: OrderedDict[tuple[Any, ...], _Forward] = OrderedDict()
        self._seen: set[tuple[Any, ...]] = set()
        self._pool: Any = None
        self._warmed = False

    def install(self) -> TransformerGraphs:
        self.transformer.forward = self  # an instance attribute: nn.Module.__call__ uses it
        return self

    def uninstall(self) -> None:
        if self.transformer.__dict__.get("forward") is self:
            del self.transformer.forward
        self._graphs.clear()

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def __call__(
        self,
        x: list[Any],
        t: Any,
        cap_feats: list[Any],
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        import torch

        eager_only = (
            not self.enabled
            or any(v is not None for v in kwargs.values())  # controlnet, omni, LoRA scale
            or torch.is_grad_enabled()
            or not all(isinstance(v, torch.Tensor) and v.is_cuda for v in [*x, t, *cap_feats])
        )
        if eager_only:
            return self.eager(x, t, cap_feats, return_dict=return_dict, **kwargs)
        key = _key(x, t, cap_feats)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first time: eager (warms up this shape)
                if len(self._seen) > 16 * self.max_graphs:
                    self._seen.clear()
                self._seen.add(key)
                return self.eager(x, t, cap_feats, return_dict=return_dict, **kwargs)
            entry = self._capture(key, x, t, cap_feats)
            if entry is None:
                return self.eager(x, t, cap_feats, return_dict=return_dict, **kwargs)
        self._graphs.move_to_end(key)
        for dst, src in zip(entry.x, x, strict=True):
            dst.copy_(src)
        entry.t.copy_(t)
        for dst, src in zip(entry.caps, cap_feats, strict=True):
            dst.copy_(src)
        entry.graph.replay()
        self.replays += 1
        out = [o.clone() for o in entry.out]  # the next replay overwrites the graph's own
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _capture(
        self, key: tuple[Any, ...], x: list[Any], t: Any, caps: list[Any]
    ) -> _Forward | None:
        import torch

        try:
            if self._pool is None:
                # One pool for all shapes: replays never overlap, and outputs are cloned.
                self._pool = torch.cuda.graph_pool_handle()
            static_x = [v.clone() for v in x]
            static_t = t.clone()
            static_caps = [c.clone() for c in caps]
            if not self._warmed:  # once: lazy initialisations off the capture stream
                cuda: Any = torch.cuda  # Stream is unannotated
                side = cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.eager(static_x, static_t, static_caps, return_dict=False)
                torch.cuda.current_stream().wait_stream(side)
                self._warmed = True
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.eager(static_x, static_t, static_caps, return_dict=False)[0]
        except torch.OutOfMemoryError:
            raise  # the engine halves the batch; graphs stay on
        except Exception as exc:
            self.enabled = False
            self.error = f"{type(exc).__name__}: {exc}"[:300]
            self._graphs.clear()
            log.warning("transformer CUDA graph capture failed, running eagerly: %s", exc)
            return None
        entry = _Forward(graph=graph, x=static_x, t=static_t, caps=static_caps, out=list(out))
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        log.info("transformer CUDA graph captured (%d kept)", len(self._graphs))
        return entry
