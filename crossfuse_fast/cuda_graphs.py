"""CUDA graphs for repeated shapes: a fast network captured once per input shape, then replayed.

Fusing a folder of one camera's frames, or a video, calls the network on one shape over and over;
on a GPU each call then launches the same few hundred kernels, and at small batches the launches,
not the arithmetic, take the time. :class:`GraphedNetwork` runs a shape's first call as it is
(which also compiles the Triton kernels and derives the folded weights), captures the second into
a CUDA graph, and replays that graph from the third on: one launch instead of hundreds.

Limits, by design:

- CUDA only: on another device the network runs as it is, and nothing is captured.
- Memory: a captured shape keeps its own inputs, output and the memory pool of one inference of
  that shape (all its intermediate maps) for as long as it is kept; at most ``max_graphs`` shapes
  are kept (default 2), the least recently used dropped first.
- Weights: a replay reads the weights where they were at capture. A weight written since (in
  place or replaced) is noticed by its version counter and every graph is dropped, so the next
  calls capture again; weights made under ``torch.inference_mode`` keep no version counter, so
  their network is never captured.
- One call at a time per network (a lock), since a graph's inputs and output are fixed buffers.
- A network that synchronises with the host inside its call cannot be captured; the fast
  networks do not (the box filters' values are read when the network is made).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .tensor_versions import versions

DEFAULT_MAX_GRAPHS = 2
Outputs = Tensor | tuple[Tensor, ...]


def _cloned(outputs: Outputs) -> Outputs:
    return outputs.clone() if isinstance(outputs, Tensor) else tuple(t.clone() for t in outputs)


def _capture(function: Callable[..., Outputs], *inputs: Tensor) -> tuple[Callable[[], None], Outputs]:
    """Capture ``function(*inputs)`` into a CUDA graph (after one warm-up call on a side stream, as
    PyTorch asks): ``(replay, output)``, where ``replay()`` recomputes ``output`` (a tensor or a tuple
    of them) in place from what ``inputs`` hold then."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function(*inputs)
    return graph.replay, output


def _capturable(x: Tensor) -> bool:
    """Whether calls on ``x`` are captured: CUDA tensors only."""
    return x.device.type == "cuda"


class GraphedNetwork:
    """``network(ir, vis)`` (or ``function(ir, vis)``, a method of it), replayed from a CUDA graph per
    ``(shape, dtype, device)`` of ``ir`` and ``vis`` once that shape has been seen twice (see the
    module's note for the limits). The result (a tensor or a tuple of them) is fresh, equal to the
    network's own result."""

    def __init__(self, network: nn.Module, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 function: Callable[[Tensor, Tensor], Outputs] | None = None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.network = network
        self.function = network if function is None else function
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[Callable[[], None], tuple[Tensor, Tensor], Outputs]] = OrderedDict()
        self._seen: set[tuple] = set()
        self._weights: tuple | None = None
        self._lock = threading.Lock()

    @property
    def captured_shapes(self) -> list[tuple]:
        """The keys ``(shape, dtype, device)`` whose graphs are kept, least recently used first."""
        return list(self._graphs)

    def __call__(self, ir: Tensor, vis: Tensor) -> Outputs:
        if not _capturable(ir) or torch.is_grad_enabled() and any(p.requires_grad for p in
                                                                   self.network.parameters()):
            return self.function(ir, vis)
        weights = versions([*self.network.parameters(), *self.network.buffers()])
        if weights is None:  # weights made under inference mode: a change could not be noticed
            return self.function(ir, vis)
        key = (tuple(ir.shape), tuple(vis.shape), ir.dtype, ir.device)
        with self._lock:
            if weights != self._weights:
                self._graphs.clear()
                self._seen.clear()
                self._weights = weights
            if key in self._graphs:
                self._graphs.move_to_end(key)
                replay, (static_ir, static_vis), output = self._graphs[key]
                static_ir.copy_(ir)
                static_vis.copy_(vis)
                replay()
                return _cloned(output)
            if key not in self._seen:
                self._seen.add(key)
                return self.function(ir, vis)
            static = (ir.clone(), vis.clone())
            replay, output = _capture(self.function, *static)
            self._graphs[key] = (replay, static, output)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            return _cloned(output)


def graphed(network: nn.Module, method: str = "forward") -> GraphedNetwork:
    """The :class:`GraphedNetwork` of ``network``'s ``method``, made on first use and kept with the
    network (so that it goes when the network goes)."""
    kept = network.__dict__.setdefault("_graphed_networks", {})
    if method not in kept:
        kept[method] = GraphedNetwork(network, function=getattr(network, method))
    return kept[method]
