"""``kernels.source_weighting``: the fusion decoder's deep and shallow weighted sums, fused, against
the twins (the decoder's algebra) in fp64."""
import pytest
import torch
from utils import DEVICE, INTERPRETER_DTYPES, assert_three_way

from crossfuse_fast import kernels
from crossfuse_fast.reference.functional import match_size
from crossfuse_fast.reference.fusion import SourceWeights

OPS = {"deep": (kernels.deep_weighted_sum, kernels.deep_weighted_sum_torch),
       "shallow": (kernels.shallow_weighted_sum, kernels.shallow_weighted_sum_torch)}
SHAPES = [(2, 128, 5, 7), (1, 32, 9, 13), (1, 3, 1, 1), (2, 70, 2, 3)]


def _maps(shape, dtype, channels_last):
    torch.manual_seed(sum(shape))
    base = torch.randn(shape, device=DEVICE)
    ir, vis = (torch.rand(shape, device=DEVICE) for _ in range(2))  # activities of one sign: no cancellation
    format_ = torch.channels_last if channels_last else torch.contiguous_format
    return [x.to(dtype).contiguous(memory_format=format_) for x in (base, ir, vis)]


def test_twins_are_the_reference_weights():
    """With the released box filters (every weight 1/9 in fp32; scale is nine times that), the twins
    compute what the reference decoder's ``SourceWeights`` does (fp64: only the order of the sums
    differs)."""
    weights = SourceWeights().double()
    torch.manual_seed(3)
    for op, channels in (("deep", 128), ("shallow", 32)):
        base, ir, vis = (torch.randn(2, channels, 6, 5, dtype=torch.float64) for _ in range(3))
        w_ir, w_vis = getattr(weights, op)(ir, vis)
        want = base + (w_ir * ir + w_vis * vis if op == "deep" else 0.5 * w_ir * ir + w_vis * vis)
        conv = weights.conv_de if op == "deep" else weights.conv_sh
        got = OPS[op][1](base, ir, vis, 9 * conv.weight.flatten()[0].item())
        assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item(), op


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS)
def test_weighted_sums(poisoned_allocations, op, shape, dtype, channels_last):
    """Three-way against fp64 and the twin in the same dtype (the kernel divides in fp32, so in 16
    bits it is the more exact of the two); one-pixel maps, channel counts off the block size."""
    triton_fn, torch_fn = OPS[op]
    base, ir, vis = _maps(shape, dtype, channels_last)
    got = triton_fn(base, ir, vis, 0.75)
    assert got.shape == base.shape and got.is_contiguous(memory_format=torch.channels_last)
    exact = torch_fn(base.double(), ir.double(), vis.double(), 0.75)
    assert_three_way(got, exact, torch_fn(base, ir, vis, 0.75), dtype)


@pytest.mark.parametrize("op", OPS)
def test_gradient_reaches_the_base_only(op):
    """As in the model, the weights pass no gradient: the base map's gradient is the upstream one,
    and sources that need a gradient are refused (the twin gives them theirs)."""
    triton_fn, torch_fn = OPS[op]
    base, ir, vis = _maps((1, 8, 4, 5), torch.float32, True)
    base.requires_grad_()
    upstream = torch.randn(base.shape, device=DEVICE)
    (grad,) = torch.autograd.grad(triton_fn(base, ir, vis, 1.0), base, upstream)
    assert torch.equal(grad, upstream)
    ir.requires_grad_()
    with pytest.raises(RuntimeError, match="no gradient to their sources"):
        triton_fn(base, ir, vis, 1.0)
    assert torch.autograd.grad(torch_fn(base, ir, vis, 1.0).sum(), ir)[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("y_size,size", [((8, 8), (13, 15)), ((8, 16), (8, 19)), ((2, 3), (3, 5))],
                         ids=["13x15", "8x19", "3x5"])
def test_shallow_sum_reads_y_through_the_size_adjust(poisoned_allocations, y_size, size, dtype):
    """A smaller ``y`` is size-adjusted as the decoder does (``match_size``) inside the shallow sum:
    output and ``y``'s gradient three-way against fp64 and the twin in the same dtype."""
    torch.manual_seed(sum(y_size) + sum(size))
    y = torch.randn(2, 32, *y_size, device=DEVICE).to(dtype).requires_grad_()
    ir, vis = (torch.rand(2, 32, *size, device=DEVICE).to(dtype) for _ in range(2))
    exact_y = y.detach().double().requires_grad_()
    got = kernels.shallow_weighted_sum(y, ir, vis, 0.75)
    want = kernels.shallow_weighted_sum_torch(exact_y, ir.double(), vis.double(), 0.75)
    low = kernels.shallow_weighted_sum_torch(y, ir, vis, 0.75)
    reference = SourceWeights().double()
    reference.conv_sh.weight.data.fill_(0.75 / 9)
    w_ir, w_vis = reference.shallow(ir.double(), vis.double())
    adjusted = match_size(exact_y, *size)
    assert (want - (adjusted + 0.5 * w_ir * ir.double() + w_vis * vis.double())).abs().max().item() < 1e-12
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert_three_way(got, want, low, dtype)
    upstream = torch.randn(got.shape, device=DEVICE)
    grads = [torch.autograd.grad(out, wrt, upstream.to(out.dtype)) for out, wrt in
             ((got, y), (want, exact_y), (low, y))]
    assert_three_way(*(g[0] for g in grads[:2]), grads[2][0], dtype, name="y")


def test_names_mismatched_maps():
    base, ir, vis = _maps((1, 8, 4, 5), torch.float32, False)
    with pytest.raises(ValueError, match="vis must match ir"):
        kernels.deep_weighted_sum(base, ir, vis[:, :4], 1.0)
    with pytest.raises(ValueError, match=r"fused must be \(1, 8, 4, 5\)"):
        kernels.deep_weighted_sum(base[..., :4], ir, vis, 1.0)
    with pytest.raises(ValueError, match="cannot reflect-pad a y height of 1 to 4"):
        kernels.shallow_weighted_sum(base[..., :1, :], ir, vis, 1.0)


def test_opcheck():
    base, ir, vis = _maps((2, 6, 3, 5), torch.float32, True)
    for name in ("deep_weighted_sum", "shallow_weighted_sum"):
        torch.library.opcheck(getattr(torch.ops.crossfuse, name), (base.requires_grad_(), ir, vis, 0.5))
