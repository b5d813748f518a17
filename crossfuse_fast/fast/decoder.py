"""The fusion decoder on the fast path: its box filters as their algebra, its upsamplings and
BatchNorms folded into its convolutions (docs/fast-path.md#the-fusion-decoder)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from ..backends import DEFAULT_KERNEL_BACKEND, resolve_kernel_backend
from ..reference.functional import match_size, minmax_to_255
from ..reference.fusion import FusionDecoder
from .box_filter import uniform_box_values
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
        self.kernel_backend = kernel_backend
        convs = (reference.weight.conv_de, reference.weight.conv_sh)
        # Checked here, before any work is queued: reading the weights' values waits for a GPU.
        self._box_values = Derived(lambda: tuple(t for conv in convs for t in (conv.weight, conv.bias)),
                                   lambda: uniform_box_values(reference))
        self._box_values.get()
        self._upsample_steps = folded_steps([reference.conv1, reference.up, *reference.conv_block], kernel_backend)
        self._conv_last = FoldedConvLayer(reference.conv_last, kernel_backend=kernel_backend)

    def forward(self, fused: Tensor, ir_deep: Tensor, ir_shallow: Tensor, vis_deep: Tensor,
                vis_shallow: Tensor) -> Tensor:
        """``FusionDecoder.forward``, with ``conv_de`` and ``conv_sh`` computed by their algebra in the
        weighted sums of :mod:`crossfuse_fast.kernels.source_weighting` (the Triton kernels where the
        kernel backend resolves to them and no source needs a gradient, the twins elsewhere)."""
        box_values = self._box_values.get()
        if box_values is None:
            return self.reference(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
        deep_scale, shallow_scale = (9.0 * value for value in box_values)
        sources = (ir_deep, vis_deep, ir_shallow, vis_shallow)
        on_triton = (resolve_kernel_backend(self.kernel_backend, fused.device) == "triton"
                     and not (torch.is_grad_enabled() and any(x.requires_grad for x in sources)))
        deep = kernels.deep_weighted_sum if on_triton else kernels.deep_weighted_sum_torch
        shallow = kernels.shallow_weighted_sum if on_triton else kernels.shallow_weighted_sum_torch
        y = self.upsample(deep(fused, ir_deep, vis_deep, deep_scale), ir_shallow.shape[-2], ir_shallow.shape[-1])
        return self.output(shallow(y, ir_shallow, vis_shallow, shallow_scale))

    def upsample(self, y: Tensor, height: int, width: int) -> Tensor:
        """``FusionDecoder.upsample`` with its BatchNorms folded in inference and its upsamplings
        folded into the convolutions after them."""
        for step in self._upsample_steps:
            y = step(y)
        return match_size(y, height, width)

    def output(self, y: Tensor) -> Tensor:
        """``FusionDecoder.output`` with its BatchNorm folded in inference; on the Triton kernels
        (where the backend resolves to them) the stretch too when no gradient is recorded, with its
        statistics gathered by the convolution in inference."""
        on_triton = resolve_kernel_backend(self.kernel_backend, y.device) == "triton"
        folded = self._conv_last.inference_weights()
        if on_triton and folded is not None:
            return kernels.conv2d_minmax_to_255(y, *folded)
        y = self._conv_last(y)
        if on_triton and not (torch.is_grad_enabled() and y.requires_grad):
            return kernels.minmax_to_255(y)
        return minmax_to_255(y)
