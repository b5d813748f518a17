"""``crossfuse_fast.fast.cross_encoder``: the transformer half on the fused ops, against the
reference cross encoder, forward and every gradient, on windows and on whole deep maps."""
import copy

import pytest
import torch
from utils import DEVICE, assert_three_way, relative_error

from crossfuse_fast.fast import FastCrossEncoder
from crossfuse_fast.fast import cross_encoder as cross_encoder_module
from crossfuse_fast.reference.fusion import FusionNet
from crossfuse_fast.reference.transformer import CrossEncoder


def test_compile_fullgraph_matches_eager():
    """The whole fast encoder on maps (every registered op, both map ends) under one graph."""
    torch.manual_seed(5)
    fast = FastCrossEncoder(CrossEncoder().to(DEVICE), "triton")
    ir, vis = (torch.randn(1, 128, 3, 5, device=DEVICE) for _ in range(2))

    def encode(ir, vis):
        return fast._run(ir, vis, (4, 4))

    compiled = torch.compile(encode, fullgraph=True)
    torch.testing.assert_close(compiled(ir, vis), encode(ir, vis), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,window", [("torch", (32, 32)), ("triton", (10, 6))])
def test_fast_cross_encoder_equals_reference(backend, window):
    """Self blocks, shift, cross blocks: the fused path against the reference, forward and gradients."""
    torch.manual_seed(13)
    reference = CrossEncoder().to(DEVICE)
    fast = FastCrossEncoder(reference, backend)
    ir, vis = (torch.randn(2, 128, *window, device=DEVICE, requires_grad=True) for _ in range(2))
    expected = reference(ir, vis, shift=True)
    got = fast(ir, vis, shift=True)
    assert relative_error(got, expected) < 2e-6
    names, parameters = zip(*[(n, p) for n, p in reference.named_parameters()])
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (ir, vis, *parameters), grad, allow_unused=True)
    have = torch.autograd.grad(got, (ir, vis, *parameters), grad, allow_unused=True)
    # k_linear's bias shifts every score of a row equally, so softmax makes its true gradient
    # zero: compare against the scale of all gradients, not each tensor's own.
    scale = max(w.abs().max().item() for w in want if w is not None)
    for name, h, w in zip(("ir", "vis", *names), have, want):
        assert (h is None) == (w is None), name
        if w is not None:
            assert (h - w).abs().max().item() / scale < 2e-5, name


def test_fast_fuse_deep_equals_fusion_net_windows():
    """Whole deep maps (docs/model.md#windows-and-tokens: padded 32 x 32 windows, put back, cropped)
    through the fast encoder's map ends against ``FusionNet.fuse_deep``, forward and input gradients
    (PyTorch twins; the Triton ends equal the twins by tests/kernels/test_window_layer_norm.py)."""
    torch.manual_seed(17)
    net = FusionNet().to(DEVICE)
    fast = FastCrossEncoder(net.cross_atten_block, "torch")
    ir, vis = (torch.randn(1, 128, 33, 20, device=DEVICE, requires_grad=True) for _ in range(2))
    expected = net.fuse_deep(ir, vis)
    got = fast.fuse_deep(ir, vis)
    assert got.shape == expected.shape == (1, 128, 33, 20)
    assert relative_error(got, expected) < 2e-6
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (ir, vis), grad)
    have = torch.autograd.grad(got, (ir, vis), grad)
    for name, h, w in zip(("ir", "vis"), have, want):
        assert relative_error(h, w) < 2e-5, name


def test_fast_encoder_merges_k_and_v_weights_once_in_inference(monkeypatch):
    """The cross blocks' merged k | v weights are concatenated once while no gradient is recorded
    (and again when a weight changes), on every call while one is (so it reaches the weights)."""
    merges = []
    merged_kv_weights = cross_encoder_module.merged_kv_weights
    monkeypatch.setattr(cross_encoder_module, "merged_kv_weights",
                        lambda attn: merges.append(attn) or merged_kv_weights(attn))
    torch.manual_seed(19)
    reference = CrossEncoder().to(DEVICE)
    fast = FastCrossEncoder(reference, "torch")
    ir, vis = (torch.randn(1, 128, 8, 8, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        for _ in range(3):
            fast(ir, vis)
        assert len(merges) == 2  # one cross block in each of the two cross modules
        reference.cross_atten_block.cross_atten2.blocks[0].attn.v_linear.weight.mul_(-1)
        got = fast(ir, vis)
        assert len(merges) == 3
        assert relative_error(got, reference(ir, vis)) < 2e-6
    fast(ir, vis)
    fast(ir, vis)
    assert len(merges) == 7


def test_fast_encoder_names_bad_input():
    fast = FastCrossEncoder(CrossEncoder())
    with pytest.raises(ValueError, match=r"deep features \[batch, 128"):
        fast(torch.randn(1, 64, 32, 32), torch.randn(1, 64, 32, 32))
    with pytest.raises(ValueError, match="differ in shape"):
        fast.fuse_deep(torch.randn(1, 128, 32, 32), torch.randn(1, 128, 32, 30))
    with pytest.raises(ValueError, match="multiples of 2"):
        fast(torch.randn(1, 128, 5, 4), torch.randn(1, 128, 5, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        FastCrossEncoder(CrossEncoder(), "cuda")


def test_fast_cross_encoder_fp16_three_way():
    """In fp16 the MLP's fc1 runs as the fused GEMM + GELU kernel: the whole encoder's output and
    input gradients stay within twice the reference's own fp16 error (against fp64), plus the floor."""
    torch.manual_seed(19)
    reference = CrossEncoder().to(DEVICE)
    ir, vis = (torch.randn(2, 128, 6, 4, device=DEVICE) for _ in range(2))
    grad = torch.randn(2, 128, 6, 4, device=DEVICE)

    def run(encoder, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (ir, vis)]
        out = encoder(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad.to(dtype)))

    want = run(copy.deepcopy(reference).double(), torch.float64)
    half = copy.deepcopy(reference).half()
    low, got = run(half, torch.float16), run(FastCrossEncoder(half, "triton"), torch.float16)
    for name, g, w, lp in zip(("output", "ir", "vis"), got, want, low):
        assert_three_way(g, w, lp, torch.float16, name=name)
