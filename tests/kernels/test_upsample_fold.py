"""``kernels.upsample_fold``: a nearest 2x upsampling folded into the 3 x 3 convolution after it,
four phase convolutions in one launch, against upsample + reflection pad + conv."""
import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, INTERPRETER_DTYPES, assert_three_way

from crossfuse_fast import kernels
from crossfuse_fast.kernels.upsample_fold import phase_kernels, upsampled_conv_torch
from crossfuse_fast.reference.autoencoder import ReflectionPad


def upsample_pad_conv(x, weight, bias):
    return F.conv2d(ReflectionPad(1)(F.interpolate(x, scale_factor=2, mode="nearest")), weight, bias)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (1, 4, 1, 6), (1, 3, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_twin_is_upsample_pad_conv(shape, channels_last):
    """The four 2 x 2 phase convolutions equal the 3 x 3 convolution of the reflection-padded nearest
    2x upsampling (fp64: only the order of the sums differs), maps of one pixel included, in the
    input's layout; with and without a bias."""
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.float64)
    for bias in (torch.randn(6, dtype=torch.float64), None):
        upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        want = torch.nn.functional.conv2d(ReflectionPad(1)(upsampled), weight, bias)
        got = upsampled_conv_torch(x, phase_kernels(weight), bias)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
        if not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):  # one pixel: both
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("shape,out_channels", [((2, 5, 7, 9), 6), ((1, 64, 3, 4), 64), ((1, 3, 1, 1), 32),
                                                ((1, 32, 2, 5), 1)], ids=lambda c: "x".join(map(str, c)) if
                         isinstance(c, tuple) else str(c))
def test_upsampled_conv_kernel(poisoned_allocations, shape, out_channels, dtype):
    """The Triton kernel (every phase written, NHWC), three-way against fp64 and PyTorch's
    upsample + pad + conv in the same dtype, with and without a bias, one-pixel maps included."""
    torch.manual_seed(sum(shape) + out_channels)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (torch.randn(out_channels, shape[1], 3, 3, device=DEVICE) / (3 * shape[1])).to(dtype)
    for bias in (torch.randn(out_channels, device=DEVICE).to(dtype), None):
        got = kernels.upsampled_conv(x, phase_kernels(weight), bias)
        exact = upsample_pad_conv(x.double(), weight.double(), None if bias is None else bias.double())
        assert got.shape == exact.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert_three_way(got, exact, upsample_pad_conv(x, weight, bias), dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("shape,out_channels", [((2, 5, 7, 9), 6), ((1, 3, 1, 1), 16), ((1, 4, 2, 1), 3),
                                                ((1, 64, 3, 4), 32)],
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_upsampled_conv_gradients(poisoned_allocations, shape, out_channels, dtype):
    """The gradients of x, of the 3 x 3 weight (through ``phase_kernels``) and of the bias, three-way
    against fp64 and PyTorch's upsample + pad + conv in the same dtype; one-pixel maps, where every
    read is clamped, included."""
    torch.manual_seed(sum(shape) + out_channels)
    inputs = [(torch.randn(*size, device=DEVICE) * scale).to(dtype).requires_grad_()
              for size, scale in ((shape, 1.0), ((out_channels, shape[1], 3, 3), 1 / (3 * shape[1])),
                                  ((out_channels,), 1.0))]
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    got = kernels.upsampled_conv(inputs[0], phase_kernels(inputs[1]), inputs[2])
    want, low = upsample_pad_conv(*doubled), upsample_pad_conv(*inputs)
    upstream = torch.randn(got.shape, device=DEVICE)
    grads = [torch.autograd.grad(out, wrt, upstream.to(out.dtype))
             for out, wrt in ((got, inputs), (want, doubled), (low, inputs))]
    for name, g, w, lp in zip(("x", "weight", "bias"), *grads):
        assert g.shape == w.shape, name
        assert_three_way(g, w, lp, dtype, floor_factor=5, name=name)


def test_upsampled_conv_names_bad_input():
    x = torch.randn(1, 4, 3, 3)
    kernels_ = phase_kernels(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="phase_kernels of a 3 x 3 weight"):
        kernels.upsampled_conv(x, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        kernels.upsampled_conv(x, kernels_, torch.randn(3))


def test_opcheck():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 3, 5, device=DEVICE, requires_grad=True)
    kernels_ = phase_kernels(torch.randn(6, 4, 3, 3, device=DEVICE)).requires_grad_()
    bias = torch.randn(6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.crossfuse.upsampled_conv, (x, kernels_, bias, False))
    torch.library.opcheck(torch.ops.crossfuse.upsampled_conv, (x, kernels_, None, False))
