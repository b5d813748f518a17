"""Stage 2's deep maps computed once: the frozen encoders' deep maps of a fixed data set, kept in
a memory-mapped file beside the run, so that a step reads them instead of encoding again.

Only the deep maps are kept (1/64 of the pixels, 128 channels: 1 MB per 256 x 256 pair in
float32); the shallow maps are one convolution of the images and are recomputed per step. The
file is made once (atomically) and reused by later runs and resumes of the same data and
encoders; a fingerprint of the encoders' weights and the data's size says when it no longer
applies, and it is then made again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from .files import write_atomically, write_text


def fingerprint(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' state dicts (names and values)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DeepMapCache:
    """``cache[indices] -> (ir_deep, vis_deep)``, ``[B, 128, h, w]`` float32 on ``device``, for the
    dataset items ``indices``, from ``<out_dir>/fusion_deep_maps.npy``."""

    def __init__(self, out_dir: str | os.PathLike, dataset: Dataset, encoders: tuple, key: str, batch_size: int,
                 device: torch.device | str):
        self.device = device
        self.path = Path(out_dir) / "fusion_deep_maps.npy"
        about_path = self.path.with_suffix(".json")
        height, width = dataset[0][0].shape[-2:]
        about = {"samples": len(dataset), "height": int(height), "width": int(width), "encoders": key}
        current = json.loads(about_path.read_text()) if about_path.exists() and self.path.exists() else None
        if current != about:
            self._make(dataset, encoders, batch_size, (len(dataset), 2, 128, height // 8, width // 8))
            write_text(about_path, json.dumps(about), overwrite=True)
        self.maps = np.load(self.path, mmap_mode="r")

    def _make(self, dataset: Dataset, encoders: tuple, batch_size: int, shape: tuple[int, ...]) -> None:
        def write(temporary: str) -> None:
            maps = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
            for start in tqdm(range(0, shape[0], batch_size), desc="caching deep maps", unit="batch", disable=None,
                              leave=False):
                ir, vis = default_collate([dataset[i] for i in range(start, min(start + batch_size, shape[0]))])
                with torch.no_grad():
                    for slot, (encoder, images) in enumerate(zip(encoders, (ir, vis))):
                        maps[start:start + len(images), slot] = encoder.encode(images.to(self.device))[1].float().cpu().numpy()
            maps.flush()
            del maps
        write_atomically(self.path, write, overwrite=True, suffix=".npy")

    def __getitem__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        block = torch.from_numpy(np.ascontiguousarray(self.maps[indices])).to(self.device)
        return block[:, 0], block[:, 1]
