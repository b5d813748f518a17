"""The fusion decoder on the fast path: its box filters as their algebra, its upsamplings and
BatchNorms folded into its convolutions (docs/fast-path.md#the-fusion-decoder)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backends import DEFAULT_KERNEL_BACKEND
from ..reference.functional import match_size, minmax_to_255
from ..reference.fusion import FusionDecoder
from .box_filter import box_mean_of_channel_sum, uniform_box_values
from .cache import Derived
from .folded_conv import FoldedConvLayer, folded_steps


class FastFusionDecoder(nn.Module):
    """A reference :class:`FusionDecoder` (its own parameters): the same call and result, up to
    rounding, with its box filters as their algebra, its upsamplings folded into the convolutions
    after them and its BatchNorms folded in inference.

    The box algebra holds when each box filter's weights are all one value (as released and as
    ``box_filter`` makes them) and it has no bias; otherwise the reference decoder runs as it is.
    Both are checked when the decoder is made and again only when a weight changes. Its
    convolutions run on the Triton kernels in inference where ``kernel_backend`` resolves to
    ``"triton"`` (:class:`.folded_conv.FoldedConvLayer`).
    """

    def __init__(self, reference: FusionDecoder, kernel_backend: str = DEFAULT_KERNEL_BACKEND):
        super().__init__()
        self.reference = reference
        convs = (reference.weight.conv_de, reference.weight.conv_sh)
        # Checked here, before any work is queued: reading the weights' values waits for a GPU.
        self._box_values = Derived(lambda: tuple(t for conv in convs for t in (conv.weight, conv.bias)),
                                   lambda: uniform_box_values(reference))
        self._box_values.get()
        self._upsample_steps = folded_steps([reference.conv1, reference.up, *reference.conv_block], kernel_backend)
        self._conv_last = FoldedConvLayer(reference.conv_last, kernel_backend=kernel_backend)

    def forward(self, fused: Tensor, ir_deep: Tensor, ir_shallow: Tensor, vis_deep: Tensor,
                vis_shallow: Tensor) -> Tensor:
        """``FusionDecoder.forward``, with ``conv_de`` and ``conv_sh`` computed by
        :func:`.box_filter.box_mean_of_channel_sum`."""
        box_values = self._box_values.get()
        if box_values is None:
            return self.reference(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
        deep_scale, shallow_scale = (9.0 * value for value in box_values)
        with torch.no_grad():  # as the reference's weights: no gradient through them
            g_ir = deep_scale * box_mean_of_channel_sum(ir_deep)
            g_vis = deep_scale * box_mean_of_channel_sum(vis_deep)
            total = g_ir + g_vis + 1e-6
            w_ir, w_vis = g_ir / total, g_vis / total
        y = self.upsample(fused + w_ir * ir_deep + w_vis * vis_deep, ir_shallow.shape[-2], ir_shallow.shape[-1])
        sources_need_grad = torch.is_grad_enabled() and (ir_shallow.requires_grad or vis_shallow.requires_grad)
        with torch.no_grad():
            s_ir = torch.sub(ir_shallow, box_mean_of_channel_sum(ir_shallow), alpha=shallow_scale).abs_()
            s_vis = torch.sub(vis_shallow, box_mean_of_channel_sum(vis_shallow), alpha=shallow_scale).abs_()
            total = torch.add(s_ir, s_vis).add_(1e-6)
            if not sources_need_grad:
                # The same sum as below, (0.5 s_ir ir + s_vis vis) / total, in place: fewer
                # full-resolution passes where no gradient reaches the shallow maps.
                skip = s_ir.mul_(ir_shallow).mul_(0.5).addcmul_(s_vis, vis_shallow).div_(total)
        if sources_need_grad:
            skip = 0.5 * (s_ir / total) * ir_shallow + (s_vis / total) * vis_shallow
        return self.output(y + skip)  # the 0.5 on infrared alone, as released

    def upsample(self, y: Tensor, height: int, width: int) -> Tensor:
        """``FusionDecoder.upsample`` with its BatchNorms folded in inference and its upsamplings
        folded into the convolutions after them."""
        for step in self._upsample_steps:
            y = step(y)
        return match_size(y, height, width)

    def output(self, y: Tensor) -> Tensor:
        """``FusionDecoder.output`` with its BatchNorm folded in inference."""
        return minmax_to_255(self._conv_last(y))
