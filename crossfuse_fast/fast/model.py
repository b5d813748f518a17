"""The whole model on the fast path: the fusion network and the two encoders around it."""
from __future__ import annotations

from torch import Tensor, nn

from ..backends import DEFAULT_KERNEL_BACKEND
from ..model import CrossFuse
from ..precision import deep_weighting_conditioning
from ..reference.fusion import FusionNet
from .cross_encoder import FastCrossEncoder
from .decoder import FastFusionDecoder
from .encoder import FastAutoEncoder


class FastFusionNet(nn.Module):
    """A reference :class:`FusionNet` (its own parameters) with its cross encoder on the fast path
    (:class:`.cross_encoder.FastCrossEncoder`) and its decoder as
    :class:`.decoder.FastFusionDecoder`. Same call and result as the reference, up to rounding;
    ``train_fusion(backend="fast")`` trains through it."""

    def __init__(self, reference: FusionNet, kernel_backend: str = DEFAULT_KERNEL_BACKEND):
        super().__init__()
        self.encoder = FastCrossEncoder(reference.cross_atten_block, kernel_backend)
        self.decoder_fusion = FastFusionDecoder(reference.decoder_fusion, kernel_backend)

    def fuse_deep(self, ir_deep: Tensor, vis_deep: Tensor, shift: bool = True) -> Tensor:
        """``FusionNet.fuse_deep``; ``shift`` is accepted for the reference's signature (the fast
        encoder needs no roll)."""
        return self.encoder.fuse_deep(ir_deep, vis_deep)

    def forward(self, ir_deep: Tensor, ir_shallow: Tensor, vis_deep: Tensor, vis_shallow: Tensor,
                shift: bool = True, windows: bool = True) -> Tensor:
        """``FusionNet.forward``; ``shift`` as in :meth:`fuse_deep`; ``windows=False`` encodes each
        whole deep map as one window, as the released training does."""
        fused = self.fuse_deep(ir_deep, vis_deep) if windows else self.encoder(ir_deep, vis_deep)
        return self.decoder_fusion(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)


class FastCrossFuse(nn.Module):
    """A :class:`~crossfuse_fast.CrossFuse` (its own parameters) on the fast path: ``fuse(backend="fast")``.

    The two encoders are :class:`.encoder.FastAutoEncoder` and the fusion network
    :class:`FastFusionNet`; docs/fast-path.md says what each does. ``channels_last`` chooses the
    convolutions' layout (docs/fast-path.md#channels-last): ``None`` for channels_last on a CPU
    and the images' own layout elsewhere, ``True`` or ``False`` to force it. The model itself is
    not touched, so threads may share it.
    """

    def __init__(self, model: CrossFuse, kernel_backend: str = DEFAULT_KERNEL_BACKEND,
                 channels_last: bool | None = None):
        super().__init__()
        # No reference to ``model`` itself, only to its parts: ``fuse`` caches this network in a
        # weak dictionary keyed by the model, which a value holding the key would keep alive.
        self.ir_autoencoder = FastAutoEncoder(model.ir_autoencoder, channels_last, kernel_backend)
        self.vis_autoencoder = FastAutoEncoder(model.vis_autoencoder, channels_last, kernel_backend)
        self.fusion = FastFusionNet(model.fusion, kernel_backend)

    def _fused_and_deep_maps(self, ir: Tensor, vis: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ir_shallow, ir_deep = self.ir_autoencoder.encode(ir)
        vis_shallow, vis_deep = self.vis_autoencoder.encode(vis)
        return self.fusion(ir_deep, ir_shallow, vis_deep, vis_shallow), ir_deep, vis_deep

    def forward(self, ir: Tensor, vis: Tensor) -> Tensor:
        """``CrossFuse.forward``: fused images ``[B, 1, H, W]`` on 0..255."""
        return self._fused_and_deep_maps(ir, vis)[0]

    def forward_with_conditioning(self, ir: Tensor, vis: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and, per image, the conditioning of its deep weighting
        (:func:`crossfuse_fast.precision.deep_weighting_conditioning`), which says whether 16 bits
        suffice for it."""
        fused, ir_deep, vis_deep = self._fused_and_deep_maps(ir, vis)
        return fused, deep_weighting_conditioning(ir_deep, vis_deep)
