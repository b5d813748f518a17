"""CrossFuse as an ONNX graph with any batch, height and width (docs/export.md).

:class:`ExportableCrossFuse` computes ``CrossFuse.forward`` (the released inference, windows and
shift included) with every shape taken from the inputs by arithmetic, never by a Python branch,
so that one trace holds for every size: the deep maps' padding to whole windows is a gather of
reflected indices (the repeated mirroring of the reference, for any side of two pixels or more)
and the decoder's size adjust always pads, by zero where the sizes agree. :func:`export_onnx`
traces it to an ONNX file (written to a temporary file, then renamed) and
:func:`onnx_difference` runs the file in onnxruntime against PyTorch.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import write_atomically
from .model import CrossFuse
from .reference.functional import WINDOW

MIN_SIDE = 16
"""The smallest image side the graph takes: its deep maps (a side over 8) need two pixels to mirror."""
OPSET = 17
TRACE_SIZE = (270, 525, 2)
"""``(height, width, batch)`` of the pair traced: every dynamic dimension above one (2 x 3 windows
of deep map, 2 images), so that the exporter treats none as a broadcast or a constant."""
INPUT_NAMES = ("ir", "vis")
OUTPUT_NAME = "fused"


def reflected_indices(side: int | Tensor, length: int | Tensor, like: Tensor) -> Tensor:
    """Indices ``0 .. length-1`` of a side of ``side`` pixels extended on its far end by repeated
    reflection (period ``2 (side - 1)``, the edge pixel not repeated): ``j = i mod period``, then
    ``period - j`` where ``j >= side``. The same as ``reference.functional.reflect_pad_extended``
    padding after the side, for ``side >= 2``."""
    period = 2 * (side - 1)
    position = torch.arange(length, device=like.device) % period
    return torch.where(position < side, position, period - position)


def to_windows(x: Tensor) -> Tensor:
    """``reference.functional.to_windows`` with the padding by gather: ``[B, C, h, w]`` ->
    ``[B * nh * nw, C, 32, 32]``."""
    batch, channels, height, width = x.shape
    rows, columns = (height + WINDOW - 1) // WINDOW, (width + WINDOW - 1) // WINDOW
    x = x.index_select(2, reflected_indices(height, rows * WINDOW, x))
    x = x.index_select(3, reflected_indices(width, columns * WINDOW, x))
    x = x.reshape(batch, channels, rows, WINDOW, columns, WINDOW).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch * rows * columns, channels, WINDOW, WINDOW)


def from_windows(windows: Tensor, batch: int | Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """The inverse of :func:`to_windows`, cropped to ``height x width``."""
    rows, columns = (height + WINDOW - 1) // WINDOW, (width + WINDOW - 1) // WINDOW
    channels = windows.shape[1]
    x = windows.reshape(batch, rows, columns, channels, WINDOW, WINDOW).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, rows * WINDOW, columns * WINDOW)[:, :, :height, :width]


def match_size(x: Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """``reference.functional.match_size`` without its branch: a reflection pad by the difference
    (by nothing where the sizes agree)."""
    dh, dw = height - x.shape[-2], width - x.shape[-1]
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="reflect")


class ExportableCrossFuse(nn.Module):
    """``model.forward(ir, vis)`` (shift on) on ``model``'s own modules, written for a trace:
    ``[B, 1, H, W]`` infrared and visible images on 0..255, both sides at least
    :data:`MIN_SIDE`, to the fused ``[B, 1, H, W]`` on 0..255, unrounded."""

    def __init__(self, model: CrossFuse):
        super().__init__()
        self.model = model

    def forward(self, ir: Tensor, vis: Tensor) -> Tensor:
        ir_shallow, ir_deep = self.model.ir_autoencoder.encode(ir)
        vis_shallow, vis_deep = self.model.vis_autoencoder.encode(vis)
        batch, _, height, width = ir_deep.shape
        fused = self.model.fusion.cross_atten_block(to_windows(ir_deep), to_windows(vis_deep), shift=True)
        fused = from_windows(fused, batch, height, width)
        decoder = self.model.fusion.decoder_fusion
        y = match_size(decoder.upsampled(decoder.deep_sum(fused, ir_deep, vis_deep)), ir_shallow.shape[-2],
                       ir_shallow.shape[-1])
        return decoder.output(decoder.shallow_sum(y, ir_shallow, vis_shallow))


def sample_pair(height: int = 48, width: int = 80, batch: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images on 0..255, ``[batch, 1, height, width]``, for tracing and checking."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, 1, height, width, generator=generator) * 255 for _ in range(2))


def export_onnx(model: CrossFuse, path: str | os.PathLike, *, overwrite: bool = False, opset: int = OPSET) -> Path:
    """Writes ``model`` (float32, eval mode, on the CPU) to the ONNX file ``path``: inputs ``ir``
    and ``vis``, output ``fused``, each ``[batch, 1, height, width]`` with the three dimensions
    dynamic (sides of :data:`MIN_SIDE` pixels or more). An existing ``path`` is replaced only
    with ``overwrite``. Traced by PyTorch's TorchScript-based ONNX exporter, which records the
    shape arithmetic of :class:`ExportableCrossFuse`; the ``model`` is left as it was. Needs the
    ``onnx`` package (``pip install crossfuse-fast[export]``)."""
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("exporting to ONNX needs the onnx package (pip install onnx)", name="onnx")
    path = Path(path)
    exportable = ExportableCrossFuse(_inference_copy(model))
    axes = {0: "batch", 2: "height", 3: "width"}

    def write(temporary: str) -> None:
        with warnings.catch_warnings():
            # The TorchScript-based exporter warns that it is deprecated, and about shape values
            # used in Python arithmetic, which it records in the graph.
            warnings.simplefilter("ignore")
            torch.onnx.export(exportable, sample_pair(*TRACE_SIZE), temporary, dynamo=False, opset_version=opset,
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes={name: axes for name in (*INPUT_NAMES, OUTPUT_NAME)})
    with torch.no_grad():
        write_atomically(path, write, overwrite=overwrite, suffix=".onnx")
    return path


def onnx_difference(model: CrossFuse, path: str | os.PathLike, sizes=((1, 48, 80), (2, 100, 72))) -> float:
    """The largest ``|onnxruntime - PyTorch|`` in grey levels (0..255) of the file at ``path``
    against ``model`` (eval mode, float32) over pairs of each ``(batch, height, width)`` in
    ``sizes``. Needs onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = _inference_copy(model)
    largest = 0.0
    for seed, (batch, height, width) in enumerate(sizes):
        ir, vis = sample_pair(height, width, batch, seed=seed + 1)
        with torch.no_grad():
            want = reference(ir, vis)
        got = session.run([OUTPUT_NAME], {"ir": ir.numpy(), "vis": vis.numpy()})[0]
        largest = max(largest, (torch.from_numpy(got) - want).abs().max().item())
    return largest


def _inference_copy(model: CrossFuse) -> CrossFuse:
    """``model`` as exported: a float32 copy on the CPU in eval mode (``model`` itself untouched)."""
    return copy.deepcopy(model).float().cpu().eval()
