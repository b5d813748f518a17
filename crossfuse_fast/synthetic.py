"""Synthetic infrared/visible pairs for tests, examples and smoke training.

Both images of a pair share one scene: a few objects (ellipses and boxes) on a background.
The infrared image shows them hot and blurred on a cool, smooth background; the visible image
shows the same outlines with their own reflectance and texture on a textured background,
plus some markings that only the visible camera sees. No real data is needed.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch


def _smooth_noise(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """Gaussian noise blurred by ``sigma`` pixels, rescaled to zero mean and unit std."""
    noise = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigma)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _object_masks(rng: np.random.Generator, height: int, width: int, count: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry, rx = rng.uniform(0.05, 0.22) * height, rng.uniform(0.03, 0.18) * width
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / max(rx, 1.0)
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / max(ry, 1.0)
        inside = np.maximum(np.abs(u), np.abs(v)) if rng.random() < 0.4 else np.hypot(u, v)
        masks.append((inside <= 1.0).astype(np.float32))
    return masks


def synthetic_pair(height: int = 256, width: int = 256,
                   seed: int | np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One ``(infrared, visible)`` pair of ``uint8 [height, width]`` images sharing a scene."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    masks = _object_masks(rng, height, width, int(rng.integers(2, 6)))

    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    ir = 45.0 + 25.0 * ramp + 8.0 * _smooth_noise(rng, height, width, max(height, width) / 16)
    for mask in masks:
        temperature = rng.uniform(150.0, 245.0)
        core = cv2.GaussianBlur(mask, (0, 0), 1.5)
        ir = ir * (1 - core) + core * (temperature + 6.0 * _smooth_noise(rng, height, width, 3.0))
    ir = cv2.GaussianBlur(ir, (0, 0), 1.0) + rng.normal(0.0, 2.0, (height, width))

    vis = 110.0 + 30.0 * _smooth_noise(rng, height, width, max(height, width) / 10)
    vis += 14.0 * _smooth_noise(rng, height, width, 0.8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for mask in masks:
        reflectance = rng.uniform(30.0, 220.0)
        period, phase = rng.uniform(3.0, 9.0), rng.uniform(0, 2 * np.pi)
        stripes = 18.0 * np.sin(2 * np.pi * (xx + yy * rng.uniform(-1, 1)) / period + phase)
        vis = vis * (1 - mask) + mask * (reflectance + stripes)
    for _ in range(int(rng.integers(1, 4))):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        vis[top:top + max(1, height // 40), left:left + max(2, width // 6)] = rng.uniform(200.0, 250.0)
    vis += rng.normal(0.0, 3.0, (height, width))
    return (np.clip(np.rint(ir), 0, 255).astype(np.uint8),
            np.clip(np.rint(vis), 0, 255).astype(np.uint8))


def synthetic_batch(batch: int, height: int = 256, width: int = 256, seed: int = 0,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ir, vis)`` float tensors ``[batch, 1, height, width]`` on 0..255, pairs drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    pairs = [synthetic_pair(height, width, rng) for _ in range(batch)]
    ir = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None].astype(np.float32))
    vis = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.float32))
    return ir.to(device), vis.to(device)


def randomize_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm of ``model`` random running statistics and affine terms, like trained
    ones (a fresh BatchNorm in eval mode is the identity, which would hide mistakes and skip work)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model
