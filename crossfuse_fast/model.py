"""``CrossFuse``: the two autoencoders and the fusion network as one model."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, check_state_dict, load_into, read_tensors, save_tensors
from .reference import AutoEncoder, FusionNet

BUNDLE_FORMAT = "crossfuse-fast/1"


class CrossFuse(nn.Module):
    """Infrared autoencoder, visible autoencoder and fusion network, with the released sizes.

    ``forward(ir, vis)`` takes ``[B, 1, H, W]`` images on 0..255 (H, W >= 8) and returns the
    fused ``[B, 1, H, W]`` on 0..255, unrounded. Only the autoencoders' encoders take part in
    fusion; their decoders are kept so a bundle holds everything stage 1 produced.
    """

    def __init__(self, ir_autoencoder: AutoEncoder | None = None, vis_autoencoder: AutoEncoder | None = None,
                 fusion: FusionNet | None = None):
        super().__init__()
        self.ir_autoencoder = ir_autoencoder if ir_autoencoder is not None else AutoEncoder()
        self.vis_autoencoder = vis_autoencoder if vis_autoencoder is not None else AutoEncoder()
        self.fusion = fusion if fusion is not None else FusionNet()

    def forward(self, ir: torch.Tensor, vis: torch.Tensor, shift: bool = True) -> torch.Tensor:
        ir_shallow, ir_deep = self.ir_autoencoder.encode(ir)
        vis_shallow, vis_deep = self.vis_autoencoder.encode(vis)
        return self.fusion(ir_deep, ir_shallow, vis_deep, vis_shallow, shift=shift)

    def fast(self, kernel_backend: str = "auto") -> nn.Module:
        """This model on the fast path: a :class:`crossfuse_fast.fast.FastCrossFuse` sharing its
        parameters (docs/fast-path.md), the network ``fuse(backend="fast")`` runs. Its call is this
        model's, up to rounding; ``kernel_backend`` ``"auto"`` runs the Triton kernels on a GPU and
        their PyTorch twins elsewhere (``"triton"``, ``"torch"`` to choose). It compiles whole:
        ``torch.compile(model.fast(), fullgraph=True)``. Raises ``ValueError`` where Triton is not
        installed."""
        from .backends import _fast_module
        return _fast_module().FastCrossFuse(self, kernel_backend)

    @classmethod
    def pretrained(cls, weights_dir: str | os.PathLike | None = None, *, progress: bool = True) -> CrossFuse:
        """The authors' released weights, fetched into ``weights_dir`` (default: the cache folder of
        :mod:`crossfuse_fast.weights`) on first use and verified by their git blob ids, then loaded
        as :meth:`from_original` does. Raises :class:`~crossfuse_fast.weights.WeightsError` saying how
        to place the files by hand where they cannot be fetched."""
        from .weights import released_files
        return cls.from_original(**released_files(weights_dir, progress=progress))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> CrossFuse:
        """The released weights from a folder that holds the three files under their released names
        (no download), or a bundle written by :meth:`save`. A missing file raises
        :class:`~crossfuse_fast.CheckpointError` naming the name expected in that folder."""
        from .weights import RELEASED
        path = Path(path)
        if path.is_file():
            return cls.load(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such folder or bundle (expected the released weights' folder)")
        files = {released.part: path / released.name for released in RELEASED}
        for released in RELEASED:
            if not files[released.part].is_file():
                raise CheckpointError(f"{files[released.part]}: missing; the folder must hold the released "
                                      f"{released.part.replace('_', ' ')} as {released.name} ({released.path} of "
                                      "the CrossFuse repository)")
        return cls.from_original(**files)

    @classmethod
    def from_original(cls, *, ir_autoencoder: str | os.PathLike, vis_autoencoder: str | os.PathLike,
                      fusion: str | os.PathLike) -> CrossFuse:
        """Load the authors' three released files (``torch.load(weights_only=True)``, strict).

        A file that is missing, truncated, not a checkpoint, or the wrong one of the three
        raises :class:`~crossfuse_fast.CheckpointError` naming it and what was expected.
        Files written by ``crossfuse_fast.train`` in the same format load here too.
        """
        model = cls()
        load_into(model.ir_autoencoder, ir_autoencoder, "an infrared autoencoder checkpoint")
        load_into(model.vis_autoencoder, vis_autoencoder, "a visible autoencoder checkpoint")
        load_into(model.fusion, fusion, "a fusion network checkpoint")
        return model.eval()

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write all three parts to one safetensors file; an existing file is kept unless ``overwrite``."""
        return save_tensors(self.state_dict(), path, overwrite=overwrite, metadata={"format": BUNDLE_FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CrossFuse:
        """Read a file written by :meth:`save` (strict: every key and shape must match)."""
        model = cls()
        state = read_tensors(path, "a crossfuse-fast CrossFuse bundle")
        check_state_dict(state, model, path, "a crossfuse-fast CrossFuse bundle")
        model.load_state_dict(state, strict=True)
        return model.eval()
