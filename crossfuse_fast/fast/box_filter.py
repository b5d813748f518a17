"""Whether the fusion decoder's fixed 3 x 3 box filters are what the algebra needs: uniform weights,
no bias (docs/fast-path.md#the-decoders-box-filters-as-their-algebra). The weighted sums that use
the algebra are :mod:`crossfuse_fast.kernels.source_weighting`."""
from __future__ import annotations

from torch import nn

from ..reference.fusion import FusionDecoder


def uniform_box_values(decoder: FusionDecoder) -> tuple[float, float] | None:
    """``(w_deep, w_shallow)``: the one value of all weights of ``conv_de`` and of ``conv_sh``, if both
    are bias-free 3 x 3, zero padding 1 convs whose weights are all equal; else None.

    Reads the weights' values, which on a GPU waits for the queued work.
    """
    values = (_uniform_value(decoder.weight.conv_de), _uniform_value(decoder.weight.conv_sh))
    return None if None in values else values


def _uniform_value(conv: nn.Conv2d) -> float | None:
    shape_ok = (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and conv.bias is None)
    weight = conv.weight
    if not shape_ok or not bool((weight == weight.flatten()[0]).all()):
        return None
    return weight.flatten()[0].item()
