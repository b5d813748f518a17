"""Training data: image folders, paired infrared/visible folders, synthetic pairs.

Every item is a float tensor ``[1, size, size]`` on 0..255, read as greyscale with OpenCV and
resized with ``cv2.resize`` (bilinear) as the released training did.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .pairing import list_images, pair_folders
from .synthetic import synthetic_pair


def read_grey(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """``[1, H, W]`` float on 0..255 (``[1, size, size]`` when ``size``) from an image file."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    if size is not None:
        image = cv2.resize(image, (size, size))
    return torch.from_numpy(image.astype(np.float32))[None]


class ImageFolder(Dataset):
    """Single-modality images of one folder, for stage 1."""

    def __init__(self, folder: str | os.PathLike, size: int = 256):
        self.files = list_images(folder)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_grey(self.files[index], self.size)


class PairedFolders(Dataset):
    """Infrared and visible images of two folders paired by name (:func:`.pairing.pair_folders`), for
    stage 2; ``pairing.problems()`` lists the files left out."""

    def __init__(self, ir_folder: str | os.PathLike, vis_folder: str | os.PathLike, size: int = 256):
        self.pairing = pair_folders(ir_folder, vis_folder)
        self.pairs = self.pairing.pairs
        self.size = size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ir, vis = self.pairs[index]
        return read_grey(ir, self.size), read_grey(vis, self.size)


class SyntheticPairs(Dataset):
    """``length`` synthetic ``(ir, vis)`` pairs; item ``i`` is always the same pair for a seed.

    ``modality="ir"`` or ``"vis"`` yields single images of that modality, for stage 1.
    """

    def __init__(self, length: int, size: int = 256, seed: int = 0, modality: str | None = None):
        if modality not in (None, "ir", "vis"):
            raise ValueError(f"modality must be None, 'ir' or 'vis', not {modality!r}")
        self.length, self.size, self.seed, self.modality = length, size, seed, modality

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        ir, vis = synthetic_pair(self.size, self.size, np.random.default_rng((self.seed, index)))
        ir = torch.from_numpy(ir.astype(np.float32))[None]
        vis = torch.from_numpy(vis.astype(np.float32))[None]
        if self.modality is None:
            return ir, vis
        return ir if self.modality == "ir" else vis
