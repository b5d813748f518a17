"""A decoder ``ConvLayer`` with its BatchNorm folded into the convolution in inference, and the
nearest 2x upsampling before it folded in too (docs/fast-path.md#batchnorms-folded-into-the-convolutions,
docs/fast-path.md#upsamplings-folded-into-the-convolutions)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..backends import DEFAULT_KERNEL_BACKEND, check_kernel_backend, resolve_kernel_backend
from ..kernels.upsample_fold import phase_kernels, upsampled_conv_torch
from ..reference.autoencoder import ConvLayer
from .cache import Derived


def is_nearest_2x(module: nn.Module) -> bool:
    """Whether ``module`` is a nearest-neighbour upsampling by 2 (what a folded layer takes in)."""
    return (isinstance(module, nn.Upsample) and module.mode == "nearest" and module.size is None
            and module.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)))


class FoldedConvLayer:
    """A reference :class:`ConvLayer` with a BatchNorm, as one convolution in inference; with
    ``upsampled``, applied to the nearest 2x upsampling of its input without making it.

    ``bn(conv(x)) = conv(x; w * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``
    while the norm uses its running statistics (eval mode, no gradient): the same function up to
    rounding. ``upsampled`` (a 3 x 3 layer padding one pixel) computes the convolution as four
    phase convolutions (:mod:`crossfuse_fast.kernels.upsample_fold`). Where ``kernel_backend``
    resolves to ``"triton"`` the Triton kernels run the convolution (padding by address), elsewhere
    PyTorch does. Calls in training mode or with gradients enabled use the layer's own parameters
    and norm unfolded, so gradients reach them as they are. The folded weights are
    made again only when one they come from changes (:class:`.cache.Derived`).
    """

    def __init__(self, layer: ConvLayer, upsampled: bool = False, kernel_backend: str = DEFAULT_KERNEL_BACKEND):
        conv, norm = layer.conv2d
        if not (isinstance(norm, nn.BatchNorm2d) and norm.affine and norm.track_running_stats):
            raise ValueError("FoldedConvLayer folds a BatchNorm2d with affine weights and running statistics")
        if upsampled and not (conv.kernel_size == (3, 3) and layer.pad.padding == 1 and conv.stride == (1, 1)
                              and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding == (0, 0)):
            raise ValueError("FoldedConvLayer(upsampled=True) takes a 3 x 3 layer padding one pixel")
        check_kernel_backend(kernel_backend)
        self.layer = layer
        self.upsampled = upsampled
        self.kernel_backend = kernel_backend
        self._weights = Derived(lambda: (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                                         norm.running_var), self._inference_weights)

    def _fold(self) -> tuple[Tensor, Tensor]:
        """The folded weight and bias, in the convolution's dtype; computed in the wider of it and
        the norm's (a 16-bit copy keeps its norms in fp32: crossfuse_fast.precision)."""
        conv, norm = self.layer.conv2d
        wide = torch.promote_types(conv.weight.dtype, norm.weight.dtype)
        with torch.no_grad():
            scale = norm.weight.to(wide) / torch.sqrt(norm.running_var.to(wide) + norm.eps)
            mean = norm.running_mean.to(wide)
            bias = -mean if conv.bias is None else conv.bias.to(wide) - mean
            weight = conv.weight.to(wide) * scale.reshape(-1, 1, 1, 1)
            return weight.to(conv.weight.dtype), (bias * scale + norm.bias.to(wide)).to(conv.weight.dtype)

    def _inference_weights(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._fold()
        return (phase_kernels(weight), bias) if self.upsampled else (weight, bias)

    def inference_weights(self) -> tuple[Tensor, Tensor] | None:
        """The folded ``(weight, bias)`` a call uses now (phase kernels when ``upsampled``), or
        ``None`` when a call would run the layer unfolded (training mode or gradients enabled)."""
        if self.layer.conv2d[1].training or torch.is_grad_enabled():
            return None
        return self._weights.get()

    def __call__(self, x: Tensor) -> Tensor:
        conv, norm = self.layer.conv2d
        on_triton = resolve_kernel_backend(self.kernel_backend, x) == "triton"
        if norm.training or torch.is_grad_enabled():
            if self.upsampled:
                upsampled = kernels.upsampled_conv if on_triton else upsampled_conv_torch
                return norm(upsampled(x, phase_kernels(conv.weight), conv.bias))
            return norm(kernels.conv2d(x, conv.weight, conv.bias)) if on_triton else self.layer(x)
        weight, bias = self._weights.get()
        if on_triton:
            return (kernels.upsampled_conv if self.upsampled else kernels.conv2d)(x, weight, bias)
        if self.upsampled:
            return upsampled_conv_torch(x, weight, bias)
        return F.conv2d(self.layer.pad(x), weight, bias)


def folded_steps(modules: list[nn.Module],
                 kernel_backend: str = DEFAULT_KERNEL_BACKEND) -> list[Callable[[Tensor], Tensor]]:
    """``modules`` run one after the other, with each ConvLayer as a :class:`FoldedConvLayer` and a
    nearest 2x upsampling before a 3 x 3 one folded into it."""
    steps: list[Callable[[Tensor], Tensor]] = []
    for module in modules:
        if isinstance(module, ConvLayer):
            upsampled = bool(steps) and is_nearest_2x(steps[-1]) and module.conv2d[0].kernel_size == (3, 3)
            if upsampled:
                steps.pop()
            steps.append(FoldedConvLayer(module, upsampled, kernel_backend))
        else:
            steps.append(module)
    return steps
