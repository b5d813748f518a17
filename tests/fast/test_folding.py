"""``crossfuse_fast.fast.folded_conv``: a BatchNorm folded into the convolution before it (and the
upsampling before that, tests/kernels/test_upsample_fold.py)."""
import copy

import torch

from crossfuse_fast import CrossFuse
from crossfuse_fast.fast import FoldedConvLayer
from crossfuse_fast.synthetic import randomize_batch_norms


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
