"""``crossfuse_fast.fast.upsample_fold`` and ``.folded_conv``: a nearest 2x upsampling folded into the
3 x 3 convolution after it, and a BatchNorm folded into the convolution before it."""
import copy

import pytest
import torch

from crossfuse_fast import CrossFuse
from crossfuse_fast.fast import FoldedConvLayer, upsample_fold
from crossfuse_fast.reference.autoencoder import ReflectionPad
from crossfuse_fast.synthetic import randomize_batch_norms


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (1, 4, 1, 6), (1, 3, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_upsampled_conv_is_upsample_pad_conv(shape, channels_last):
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
        got = upsample_fold.upsampled_conv(x, upsample_fold.phase_kernels(weight), bias)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
        if not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):  # one pixel: both
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_folded_layer_is_conv_then_batch_norm():
    """One ``ConvLayer`` with its BatchNorm folded, fp32, against the layer in fp64: as close as the
    layer itself in fp32; and the layer as it is in training mode (batch statistics)."""
    torch.manual_seed(4)
    fusion = randomize_batch_norms(CrossFuse(), seed=4).fusion
    layer = fusion.decoder_fusion.conv1.eval()
    x = torch.randn(2, 128, 9, 11)
    folded = FoldedConvLayer(layer)
    with torch.no_grad():
        exact = copy.deepcopy(layer).double()(x.double())
        layer_error = (layer(x) - exact).abs().max().item()
        assert (folded(x) - exact).abs().max().item() <= 4 * layer_error
        layer.train()
        assert torch.equal(folded(x), layer(x))
