"""``kernels.size_adjust``: the decoders' size adjust (with the upsampling before it and the map added
after it) by address, forward and both gradients, against ``match_size`` in fp64."""
import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, INTERPRETER_DTYPES, assert_three_way

from crossfuse_fast import kernels
from crossfuse_fast.reference.functional import match_size

# (source shape, output height, output width, upsample): margins of 0 to 4 on each side, odd and even
# differences, one- and two-pixel sources (a one-pixel map cannot be reflected: 2 x 2 when upsampled).
CASES = [((2, 5, 8, 8), 13, 15, False), ((1, 3, 9, 13), 13, 20, False), ((1, 70, 2, 3), 3, 5, False),
         ((1, 4, 8, 8), 8, 8, False), ((2, 5, 5, 7), 13, 17, True), ((1, 32, 8, 8), 23, 18, True),
         ((1, 3, 1, 1), 2, 2, True), ((1, 6, 1, 2), 3, 7, True), ((1, 64, 4, 4), 8, 8, True),
         ((1, 5, 9, 6), 6, 9, False), ((1, 5, 3, 4), 3, 9, True)]  # and crops (match_size's negative pads)


def _adjusted(x, height, width, upsample, extra):
    """What the model computes: ``F.interpolate``, then ``match_size``, then the addition."""
    y = match_size(F.interpolate(x, scale_factor=2, mode="nearest") if upsample else x, height, width)
    return y if extra is None else y + extra


def _ids(case):
    shape, height, width, upsample = case
    return f"{'x'.join(map(str, shape))}-to-{height}x{width}{'-up' if upsample else ''}"


@pytest.mark.parametrize("with_extra", [False, True], ids=["alone", "plus-extra"])
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_size_adjust_forward_and_gradients(poisoned_allocations, case, dtype, with_extra):
    """Output, ``x``'s gradient (every reflected reader gathered) and ``extra``'s, three-way against
    fp64 and PyTorch in the same dtype; every element written (NaN-poisoned buffers)."""
    shape, height, width, upsample = case
    torch.manual_seed(sum(shape) + height + width)
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    extra = (torch.randn(*shape[:2], height, width, device=DEVICE).to(dtype).requires_grad_()
             if with_extra else None)
    inputs = [x] + ([extra] if with_extra else [])
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    got = kernels.size_adjust(x, height, width, upsample=upsample, extra=extra)
    want = _adjusted(doubled[0], height, width, upsample, doubled[1] if with_extra else None)
    low = _adjusted(x, height, width, upsample, extra)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert_three_way(got, want, low, dtype)
    twin = kernels.size_adjust_torch(doubled[0], height, width, upsample=upsample,
                                     extra=doubled[1] if with_extra else None)
    assert torch.equal(twin, want)
    upstream = torch.randn(got.shape, device=DEVICE)
    grads = [torch.autograd.grad(out, wrt, upstream.to(out.dtype))
             for out, wrt in ((got, inputs), (want, doubled), (low, inputs))]
    for name, g, w, lp in zip(("x", "extra"), *grads):
        assert g.shape == w.shape, name
        assert_three_way(g, w, lp, dtype, name=name)


def test_reads_and_gathers_channel_slices():
    """``x`` a channel slice of a wider NHWC buffer and the output gradient a slice of another: the
    strides are followed both ways."""
    torch.manual_seed(4)
    buffer = torch.randn(2, 96, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x = buffer[:, 32:64].requires_grad_()
    got = kernels.size_adjust(x, 13, 15, upsample=True)
    assert torch.equal(got, _adjusted(x.detach(), 13, 15, True, None))
    wide = torch.randn(2, 80, 13, 15, device=DEVICE)
    (grad,) = torch.autograd.grad(got, x, wide[:, 16:48])
    (want,) = torch.autograd.grad(_adjusted(x.double(), 13, 15, True, None), x, wide[:, 16:48].double())
    assert (grad.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("source,size,widest,upsample", [(4, 12, 10, False), (2, 11, 10, True), (1, 5, 4, True)])
def test_refuses_what_reflection_cannot_pad(source, size, widest, upsample):
    """A padding as wide as the map is refused by name, where ``match_size`` fails too; the widest
    allowed is taken."""
    x = torch.randn(1, 2, source, 4, device=DEVICE)
    width = 8 if upsample else 4
    with pytest.raises(ValueError, match="cannot reflect-pad a height"):
        kernels.size_adjust(x, size, width, upsample=upsample)
    with pytest.raises(RuntimeError):
        _adjusted(x, size, width, upsample, None)
    assert torch.equal(kernels.size_adjust(x, widest, width, upsample=upsample),
                       _adjusted(x, widest, width, upsample, None))


def test_names_a_mismatched_extra():
    x = torch.randn(1, 2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="extra must be"):
        kernels.size_adjust(x, 9, 8, upsample=True, extra=torch.randn(1, 2, 8, 8, device=DEVICE))


def test_opcheck():
    x = torch.randn(1, 3, 3, 4, device=DEVICE).requires_grad_()
    extra = torch.randn(1, 3, 7, 9, device=DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.crossfuse.size_adjust, (x, 7, 9, True, extra))
    torch.library.opcheck(torch.ops.crossfuse.size_adjust, (x, 5, 6, False, None))
