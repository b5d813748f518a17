"""``kernels.minmax_stretch``: the per-image min-max stretch, the reference's arithmetic in its order."""
import pytest
import torch
from utils import DEVICE, assert_three_way

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
