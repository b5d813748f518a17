"""Fusing many pairs of image files: decoded ahead by loader workers, fused in same-size batches.

``crossfuse fuse`` on folders runs this. Worker processes read and convert the next pairs
(:class:`PairFiles`, a ``DataLoader`` over them, pinned memory where the device is a GPU) while
the main process fuses the current batch: consecutive pairs of one size, up to ``batch_size``,
go to :func:`crossfuse_fast.fuse` as one batch (a folder from one camera is one size). A pair that
cannot be read or converted is reported and the others go on; a batch that fails is fused again
pair by pair, so only the pair at fault fails.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .api import DEFAULT_UINT16_SCALING, fuse, luminance_pair, to_image
from .precision import SixteenBitFallback

_NOTHING = torch.empty(0)


def read_image(path: Path) -> np.ndarray:
    """An image file as OpenCV reads it (unchanged depth and channels); ``ValueError`` if it cannot."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return image


class PairFiles(Dataset):
    """Item ``i``: the pair ``jobs[i] = (ir, vis, ...)`` read and converted as :func:`fuse` would,
    ``{"index", "ir", "vis" ([1, H, W] float32 on 0..255), "ycrcb" (the visible colours, or empty),
    "error" ("" or one line)}``; a failure is returned as ``"error"``, not raised, so that a loader's
    workers go on."""

    def __init__(self, jobs: list[tuple], uint16_scaling: str = DEFAULT_UINT16_SCALING):
        self.jobs = jobs
        self.uint16_scaling = uint16_scaling

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict:
        ir_path, vis_path = self.jobs[index][:2]
        try:
            ir, vis, ycrcb = luminance_pair(read_image(ir_path), read_image(vis_path), self.uint16_scaling)
        except (ValueError, OSError, cv2.error) as error:
            return {"index": index, "ir": _NOTHING, "vis": _NOTHING, "ycrcb": _NOTHING, "error": one_line(error)}
        return {"index": index, "ir": torch.from_numpy(ir)[None], "vis": torch.from_numpy(vis)[None],
                "ycrcb": _NOTHING if ycrcb is None else torch.from_numpy(ycrcb), "error": ""}


def one_line(error: Exception) -> str:
    """The first line of ``error``'s message (its type's name where it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Fused:
    """One pair's outcome: its index in the jobs, the fused uint8 image or the reason it failed, and
    a note (a 16-bit call that fused it in fp32 instead says so)."""

    index: int
    image: np.ndarray | None
    error: str = ""
    note: str = ""


def fuse_files(jobs: list[tuple], fuse_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
               device: torch.device, batch_size: int = 8, workers: int = 2,
               uint16_scaling: str = DEFAULT_UINT16_SCALING) -> Iterator[Fused]:
    """Every pair of ``jobs`` (``(ir_path, vis_path, ...)``), in order: read by ``workers`` loader
    processes (none for a single pair), fused by ``fuse_batch(ir, vis)`` (``[B, 1, H, W]`` on
    ``device`` -> fused ``[B, 1, H, W]`` on 0..255) in batches of up to ``batch_size`` consecutive
    pairs of one size, and yielded as each batch is done."""
    loader = DataLoader(PairFiles(jobs, uint16_scaling), batch_size=None, shuffle=False,
                        num_workers=workers if len(jobs) > 1 else 0, pin_memory=device.type == "cuda")
    group: list[dict] = []
    for item in loader:
        if item["error"]:
            yield from _fused(group, fuse_batch, device)
            group = []
            yield Fused(item["index"], None, item["error"])
            continue
        if group and (len(group) == batch_size or group[0]["ir"].shape != item["ir"].shape):
            yield from _fused(group, fuse_batch, device)
            group = []
        group.append(item)
    yield from _fused(group, fuse_batch, device)


def _fused(group: list[dict], fuse_batch: Callable, device: torch.device) -> Iterator[Fused]:
    if not group:
        return
    notes = [""] * len(group)
    try:
        ir = torch.stack([item["ir"].to(device, non_blocking=True) for item in group])
        vis = torch.stack([item["vis"].to(device, non_blocking=True) for item in group])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SixteenBitFallback)
            fused = fuse_batch(ir, vis)[:, 0].float().cpu().numpy()
    except ValueError as error:
        if len(group) == 1:
            yield Fused(group[0]["index"], None, one_line(error))
            return
        for item in group:
            yield from _fused([item], fuse_batch, device)
        return
    for warning in caught:
        if issubclass(warning.category, SixteenBitFallback):
            for image, value in zip(warning.message.images, warning.message.conditioning):
                notes[image] = (f"fused in fp32: its deep weighting is too ill-conditioned for 16 bits "
                                f"(conditioning {value:.3g})")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    for item, luma, note in zip(group, fused, notes):
        ycrcb = item["ycrcb"].numpy() if item["ycrcb"].numel() else None
        yield Fused(item["index"], to_image(luma, ycrcb), note=note)


def fuse_batch_with(model, **options) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fuse_batch`` for :func:`fuse_files`: :func:`crossfuse_fast.fuse` with ``model`` and
    ``options`` (backend, tile, precision)."""
    return lambda ir, vis: fuse(ir, vis, model=model, **options)
