"""``crossfuse_fast.cuda_graphs``: which calls are captured, replayed, kept and dropped (on the CPU,
with the capture emulated), and real graphs on CUDA (the device run)."""
import copy

import pytest
import torch
from utils import GPU

from crossfuse_fast import cuda_graphs, fuse
from crossfuse_fast.cuda_graphs import GraphedNetwork


class Counting(torch.nn.Module):
    """``ir * w + vis``, counting its calls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.calls = 0

    def forward(self, ir, vis):
        self.calls += 1
        return ir * self.w + vis


@pytest.fixture
def emulated(monkeypatch):
    """Every tensor counts as capturable, and a "graph" replays by calling the function again on the
    static inputs into the captured output (what a CUDA graph's replay amounts to)."""
    captures = []

    def capture(function, *inputs):
        captures.append(tuple(x.shape for x in inputs))
        output = function(*inputs)

        def replay():
            fresh = function(*inputs)
            for kept, new in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (output, fresh))):
                kept.copy_(new)

        return replay, output

    monkeypatch.setattr(cuda_graphs, "_capturable", lambda x: True)
    monkeypatch.setattr(cuda_graphs, "_capture", capture)
    return captures


def _inputs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)


def test_first_call_runs_second_captures_then_replays(emulated):
    network = Counting()
    graphed = GraphedNetwork(network)
    with torch.no_grad():
        for seed in range(4):
            ir, vis = _inputs((1, 1, 4, 5), seed)
            got = graphed(ir, vis)
            assert torch.equal(got, ir * 2 + vis)
        assert emulated == [((1, 1, 4, 5), (1, 1, 4, 5))]
        assert graphed.captured_shapes == [((1, 1, 4, 5), (1, 1, 4, 5), torch.float32, torch.device("cpu"))]
        first = graphed(*_inputs((1, 1, 4, 5), 9))
        second = graphed(*_inputs((1, 1, 4, 5), 10))
        assert not torch.equal(first, second)  # each result is its own tensor, not the graph's buffer


def test_at_most_max_graphs_least_recently_used_dropped(emulated):
    graphed = GraphedNetwork(Counting(), max_graphs=2)
    with torch.no_grad():
        for shape in ((1, 1, 2, 2), (1, 1, 3, 3), (1, 1, 2, 2), (1, 1, 4, 4)):
            for seed in range(2):
                graphed(*_inputs(shape, seed))
    assert [key[0] for key in graphed.captured_shapes] == [(1, 1, 2, 2), (1, 1, 4, 4)]


def test_a_changed_weight_drops_the_graphs(emulated):
    network = Counting()
    graphed = GraphedNetwork(network)
    ir, vis = _inputs((1, 1, 3, 3), 0)
    with torch.no_grad():
        graphed(ir, vis), graphed(ir, vis)
        assert graphed.captured_shapes
        network.w.add_(1.0)
        assert torch.equal(graphed(ir, vis), ir * 3 + vis)
        assert graphed.captured_shapes == []


def test_nothing_is_captured_on_a_cpu(model, monkeypatch):
    """``fuse`` on a CPU, a shape many times: the fast network runs as it is."""
    monkeypatch.setattr(cuda_graphs, "_capture", lambda *args: pytest.fail("captured on a CPU"))
    ir, vis = _inputs((1, 1, 16, 16), 0)
    for _ in range(3):
        fuse(ir * 255, vis * 255, model=model, backend="fast")
    graphed = GraphedNetwork(Counting())
    for _ in range(3):
        graphed(ir, vis)
    assert graphed.captured_shapes == []


@GPU
def test_replays_give_the_networks_results_on_cuda(model):
    """Real CUDA graphs of the fast network: replays with new inputs equal eager calls, bit for bit."""
    network = copy.deepcopy(model).cuda().fast()
    graphed = GraphedNetwork(network)
    with_conditioning = cuda_graphs.graphed(network, "forward_with_conditioning")
    with torch.inference_mode():
        for seed in range(4):
            ir, vis = (x.cuda() * 255 for x in _inputs((2, 1, 64, 96), seed))
            assert torch.equal(graphed(ir, vis), network(ir, vis))
            for got, want in zip(with_conditioning(ir, vis), network.forward_with_conditioning(ir, vis)):
                assert torch.equal(got, want)
    assert len(graphed.captured_shapes) == 1 and len(with_conditioning.captured_shapes) == 1


def test_a_method_with_several_outputs(emulated):
    """``graphed(network, method)``: a method returning a tuple is captured and replayed whole, each
    output a fresh tensor; one graphed function per method, kept with the network."""
    network = Counting()
    network.both = lambda ir, vis: (network(ir, vis), ir.sum((1, 2, 3)))
    graphed = cuda_graphs.graphed(network, "both")
    assert cuda_graphs.graphed(network, "both") is graphed and cuda_graphs.graphed(network) is not graphed
    with torch.no_grad():
        for seed in range(3):
            ir, vis = _inputs((2, 1, 3, 3), seed)
            fused, sums = graphed(ir, vis)
            assert torch.equal(fused, ir * 2 + vis) and torch.equal(sums, ir.sum((1, 2, 3)))
    assert len(emulated) == 1


def test_weights_made_in_inference_mode_are_never_captured(emulated):
    """Such weights keep no version counter, so a write into them could not drop a stale graph."""
    with torch.inference_mode():
        network = Counting()
    graphed = GraphedNetwork(network)
    with torch.inference_mode():
        for seed in range(3):
            graphed(*_inputs((1, 1, 3, 3), seed))
    assert emulated == [] and graphed.captured_shapes == []
