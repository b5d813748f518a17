"""``kernels.minmax_stretch``: the per-image min-max stretch, the reference's arithmetic in its order."""
import pytest
import torch
from utils import DEVICE, INTERPRETER_DTYPES, assert_three_way

from crossfuse_fast import kernels
from crossfuse_fast.reference.functional import minmax_to_255


@pytest.mark.parametrize("spread", [30.0, 1e-5], ids=["wide", "narrow"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 1, 9, 13), (1, 3, 40, 50), (1, 1, 1, 1), (3, 2, 33, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_minmax_to_255_is_the_reference_bit_for_bit(poisoned_allocations, shape, channels_last, spread):
    """fp32: the same operations in the same order, so the same bits; planes over several blocks
    (40 x 50, 33 x 33), a constant one-pixel image (stretched to 0), a range so narrow that the
    1e-6 in the denominator counts, every element written."""
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, device=DEVICE) * spread + 7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(kernels.minmax_to_255(x), minmax_to_255(x))


def test_minmax_to_255_fp16():
    torch.manual_seed(2)
    x = (torch.randn(2, 1, 40, 30, device=DEVICE) * 30).half()
    assert_three_way(kernels.minmax_to_255(x), minmax_to_255(x.double()), minmax_to_255(x), torch.float16)


def test_minmax_to_255_records_no_gradient():
    with pytest.raises(RuntimeError, match="records no gradient"):
        kernels.minmax_to_255(torch.randn(1, 1, 4, 4, requires_grad=True))
    with pytest.raises(ValueError, match="non-empty map"):
        kernels.minmax_to_255(torch.randn(4, 4))


def test_opcheck():
    torch.library.opcheck(torch.ops.crossfuse.minmax_to_255, (torch.randn(2, 3, 5, 7, device=DEVICE),))


# (batch, in, out, height, width, kernel): conv_last's 32 -> 1 by 1 x 1, planes over one and over
# several convolution tiles, several channels, a 3 x 3 kernel, a one-pixel map.
CONV_CASES = [(2, 32, 1, 9, 13, 1), (1, 32, 1, 17, 8, 1), (3, 5, 3, 6, 7, 3), (2, 4, 2, 1, 1, 3)]


def _conv_inputs(batch, in_channels, out_channels, height, width, kernel, dtype=torch.float32):
    torch.manual_seed(batch + in_channels + height * width)
    buffer = torch.randn(batch, in_channels + 3, height, width, device=DEVICE).to(dtype)
    x = buffer.contiguous(memory_format=torch.channels_last)[:, 3:]  # a channel slice of an NHWC buffer
    weight = (torch.randn(out_channels, in_channels, kernel, kernel, device=DEVICE) / in_channels).to(dtype)
    return x, weight, torch.randn(out_channels, device=DEVICE).to(dtype)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_minmax_to_255_is_the_two_ops_bit_for_bit(poisoned_allocations, case):
    """Statistics gathered in the convolution's epilogue, per image and channel across its tiles:
    each image the same bits as the convolution of that image alone, then the stretch (alone,
    because a batch's convolution tiles may straddle two images, and a dot may round a row
    differently beside other rows)."""
    x, weight, bias = _conv_inputs(*case)
    got = kernels.conv2d_minmax_to_255(x, weight, bias)
    assert got.is_contiguous(memory_format=torch.channels_last)
    for image in range(got.shape[0]):
        alone = kernels.minmax_to_255(kernels.conv2d(x[image:image + 1], weight, bias))
        assert torch.equal(got[image:image + 1], alone)
    for image in range(got.shape[0]):
        for channel in range(got.shape[1]):
            plane = got[image, channel]
            assert plane.min() == 0 and (plane.max() == 0 if plane.numel() == 1 else plane.max() > 254.99)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_minmax_to_255_against_fp64(poisoned_allocations, case, dtype):
    x, weight, bias = _conv_inputs(*case, dtype=dtype)
    exact = kernels.conv2d_minmax_to_255_torch(x.double(), weight.double(), bias.double())
    got = kernels.conv2d_minmax_to_255(x, weight, bias)
    assert_three_way(got, exact, kernels.conv2d_minmax_to_255_torch(x, weight, bias), dtype)


def test_conv2d_minmax_to_255_records_no_gradient():
    x, weight, bias = _conv_inputs(1, 4, 1, 3, 3, 1)
    with pytest.raises(RuntimeError, match="records no gradient"):
        kernels.conv2d_minmax_to_255(x, weight.requires_grad_(), bias)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.conv2d_minmax_to_255(x, weight.detach()[:, :2], bias)


def test_conv2d_minmax_to_255_opcheck():
    torch.library.opcheck(torch.ops.crossfuse.conv2d_minmax_to_255, (*_conv_inputs(2, 4, 2, 5, 7, 3), "reflect", False))
