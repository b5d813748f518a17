"""The fast path: the reference model's own weights, computed with fewer passes (docs/fast-path.md).

One idea a module: :mod:`.cross_encoder` (the transformer half on the fused ops of
:mod:`crossfuse_fast.kernels`, chosen by :mod:`.ops`), :mod:`.encoder` (dense blocks padded piece
by piece), :mod:`.decoder` (the fusion decoder, with :mod:`.box_filter` and :mod:`.folded_conv`),
:mod:`.layout` (channels_last), :mod:`.cache` (derived weights), and :mod:`.model`, the whole
:class:`FastCrossFuse`. Importing it needs Triton (the kernels' module
defines them); :mod:`crossfuse_fast.backends` imports it only when the fast path is asked for.
"""
from .cross_encoder import FastCrossEncoder
from .decoder import FastFusionDecoder
from .encoder import FastAutoEncoder
from .folded_conv import FoldedConvLayer
from .model import FastCrossFuse, FastFusionNet

__all__ = ["FastAutoEncoder", "FastCrossEncoder", "FastCrossFuse", "FastFusionDecoder", "FastFusionNet",
           "FoldedConvLayer"]
