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
                                   lambda: uniform_box_values(reference), traceable=False)
        self._box_values.get()
        self._upsample_steps = folded_steps([reference.conv1, reference.up, *reference.conv_block], kernel_backend)
        self.conv_last = FoldedConvLayer(reference.conv_last, kernel_backend=kernel_backend)

    def forward(self, fused: Tensor, ir_deep: Tensor, ir_shallow: Tensor, vis_deep: Tensor,
                vis_shallow: Tensor) -> Tensor:
        """``FusionDecoder.forward``, with ``conv_de`` and ``conv_sh`` computed by their algebra in the
        weighted sums of :mod:`crossfuse_fast.kernels.source_weighting` (the Triton kernels where the
        kernel backend resolves to them and no source needs a gradient, the twins elsewhere)."""
        if self._box_values.get() is None:
            return self.reference(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
        y = self.upsampled(self.deep_sum(fused, ir_deep, vis_deep))
        return self.output(self.shallow_sum(y, ir_shallow, vis_shallow))

    def _on_triton(self, ir: Tensor, vis: Tensor) -> bool:
        """Whether a weighted sum of these sources runs on the Triton kernels (they pass no gradient
        to the sources)."""
        return (resolve_kernel_backend(self.kernel_backend, ir) == "triton"
                and not (torch.is_grad_enabled() and (ir.requires_grad or vis.requires_grad)))

    def deep_sum(self, fused: Tensor, ir_deep: Tensor, vis_deep: Tensor) -> Tensor:
        """``FusionDecoder.deep_sum``, ``conv_de`` by its algebra where it holds."""
        return self._weighted_sum("deep", fused, ir_deep, vis_deep)

    def shallow_sum(self, y: Tensor, ir_shallow: Tensor, vis_shallow: Tensor) -> Tensor:
        """``FusionDecoder.shallow_sum``, ``conv_sh`` by its algebra where it holds; ``y`` smaller than
        the shallow maps is size-adjusted first (by address on the kernels: ``FusionDecoder.upsample``'s
        adjust and this sum in one pass)."""
        return self._weighted_sum("shallow", y, ir_shallow, vis_shallow)

    def _weighted_sum(self, kind: str, base: Tensor, ir: Tensor, vis: Tensor) -> Tensor:
        """The ``kind`` ("deep" or "shallow") weighted sum: the reference's where the box filters are
        not uniform, else the fused op (kernel or twin) with nine times the box's value."""
        box_values = self._box_values.get()
        if box_values is None:
            if kind == "shallow":
                base = match_size(base, ir.shape[-2], ir.shape[-1])
            return getattr(self.reference, f"{kind}_sum")(base, ir, vis)
        name = f"{kind}_weighted_sum" if self._on_triton(ir, vis) else f"{kind}_weighted_sum_torch"
        return getattr(kernels, name)(base, ir, vis, 9.0 * box_values[0 if kind == "deep" else 1])

    def upsampled(self, y: Tensor) -> Tensor:
        """``FusionDecoder.upsampled`` with its BatchNorms folded in inference and its upsamplings
        folded into the convolutions after them."""
        for step in self._upsample_steps:
            y = step(y)
        return y

    def output(self, y: Tensor) -> Tensor:
        """``FusionDecoder.output`` with its BatchNorm folded in inference; on the Triton kernels
        (where the backend resolves to them) the stretch too when no gradient is recorded, with its
        statistics gathered by the convolution in inference. The stretch runs in fp32 and gives
        fp32 from 16-bit maps."""
        on_triton = resolve_kernel_backend(self.kernel_backend, y) == "triton"
        folded = self.conv_last.inference_weights()
        if on_triton and folded is not None:
            return kernels.conv2d_minmax_to_255(y, *folded)
        y = self.conv_last(y)
        if y.dtype in (torch.float16, torch.bfloat16):
            y = y.float()  # the stretch to 0..255 in fp32 (crossfuse_fast.precision)
        if on_triton and not (torch.is_grad_enabled() and y.requires_grad):
            return kernels.minmax_to_255(y)
        return minmax_to_255(y)
