"""``kernels.gemm_gelu``: the MLP's fc1 GEMM with bias and exact GELU in its epilogue."""
import pytest
import torch
from utils import DEVICE, INTERPRETER_DTYPES, TOLERANCE, assert_three_way, relative_error

from crossfuse_fast import kernels
from crossfuse_fast.kernels.gemm_gelu import GemmTiles, linear_gelu_fwd


@pytest.mark.parametrize("rows,depth,cols", [(1, 16, 8), (37, 80, 96), (300, 100, 200)])
def test_linear_gelu_launcher_fp32(poisoned_allocations, rows, depth, cols):
    """The GEMM with bias + GELU epilogue, and its saved pre-activation, against fp64; tails in every
    dimension, several row and column blocks."""
    torch.manual_seed(rows + cols)
    x, weight, bias = (torch.randn(*shape, device=DEVICE) for shape in ((2, rows, depth), (cols, depth), (cols,)))
    tiles = GemmTiles(block_m=64, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=2)
    y, pre = linear_gelu_fwd(x, weight, bias, save_pre=True, tiles=tiles)
    pre_expected = x.double() @ weight.double().t()
    assert relative_error(pre, pre_expected) < TOLERANCE[torch.float32]
    assert relative_error(y, torch.nn.functional.gelu(pre_expected + bias.double())) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="do not make x @ weight.T"):
        linear_gelu_fwd(x, weight.t(), bias, save_pre=False)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_linear_gelu_forward_and_gradients(poisoned_allocations, dtype):
    """The public op (fused GEMM in 16 bits, cuBLAS + bias_gelu in fp32): output and the gradients of
    x, weight and bias, three-way against fp64 and PyTorch in the same dtype."""
    torch.manual_seed(21)
    inputs = [(torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()
              for shape, scale in (((3, 45, 64), 1.0), ((136, 64), 0.125), ((136,), 1.0))]
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    got, want, low = (kernels.linear_gelu(*inputs), kernels.linear_gelu_torch(*doubled),
                      kernels.linear_gelu_torch(*inputs))
    with torch.no_grad():
        assert torch.equal(kernels.linear_gelu(*inputs), got)
    assert_three_way(got, want, low, dtype)
    upstream = torch.randn(got.shape, device=DEVICE)
    grads = [torch.autograd.grad(out, wrt, upstream.to(out.dtype))
             for out, wrt in ((got, inputs), (want, doubled), (low, inputs))]
    for name, g, w, lp in zip(("x", "weight", "bias"), *grads):
        assert_three_way(g, w, lp, dtype, floor_factor=5, name=name)


def test_linear_gelu_op_pre_activation_output_has_gradients():
    """The registered op also returns ``x W^T`` (saved for the backward): using it downstream adds
    its gradient to x's and W's."""
    torch.manual_seed(4)
    inputs = [torch.randn(*shape, device=DEVICE).half().requires_grad_() for shape in ((5, 16), (8, 16), (8,))]
    y, pre = torch.ops.crossfuse.linear_gelu(*inputs, True)
    got = torch.autograd.grad(y.float().sum() + (pre.float() ** 2).sum(), inputs)
    x, weight, bias = (t.detach().double().requires_grad_() for t in inputs)
    pre64 = x @ weight.t()
    want = torch.autograd.grad(torch.nn.functional.gelu(pre64 + bias).sum() + (pre64 ** 2).sum(), (x, weight, bias))
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert relative_error(g, w) < TOLERANCE[torch.float16], name


def test_opcheck():
    torch.manual_seed(11)
    x = torch.randn(2, 5, 16, device=DEVICE, dtype=torch.half, requires_grad=True)
    weight, bias = (torch.randn(*shape, device=DEVICE, dtype=torch.half, requires_grad=True) for shape in ((24, 16), (24,)))
    torch.library.opcheck(torch.ops.crossfuse.linear_gelu, (x, weight, bias, True))


def test_compile_fullgraph_fused_fc1_in_16_bits():
    """The fused GEMM + GELU op (16-bit only) under ``torch.compile(fullgraph=True)``, with its backward."""
    torch.manual_seed(6)
    x = torch.randn(2, 9, 64, device=DEVICE).half().requires_grad_()
    weight = (torch.randn(96, 64, device=DEVICE) * 0.125).half().requires_grad_()
    bias = torch.randn(96, device=DEVICE).half().requires_grad_()
    compiled = torch.compile(kernels.linear_gelu, fullgraph=True)
    got, want = compiled(x, weight, bias), kernels.linear_gelu(x, weight, bias)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    inputs = (x, weight, bias)
    for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w)
