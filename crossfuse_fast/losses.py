"""The two training objectives of CrossFuse (docs/model.md#stage-1-loss, docs/model.md#stage-2-loss),
on images ``[B, 1, H, W]`` on 0..255.

``msssim`` is the widely copied "pytorch-msssim" variant the released weights were trained
with, quirks included (dynamic range guessed from the first image at every scale, window
shrunk to the image, the last scale's ssim weighted in four times).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Ranks
from .reference.functional import LAPLACIAN

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_LOSS_WEIGHT = 10000.0
GRADIENT_LOSS_WEIGHT = 10.0


def gaussian_window(size: int, sigma: float = 1.5, channels: int = 1, device=None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[channels, 1, size, size]`` outer product of normalised 1-D Gaussian weights.

    The weights are computed in Python floats and normalised in ``dtype``, as pytorch-msssim does.
    """
    g = torch.tensor([math.exp(-((x - size // 2) ** 2) / (2 * sigma ** 2)) for x in range(size)],
                     dtype=dtype, device=device)
    g = g / g.sum()
    return (g[:, None] @ g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11,
         ranks: Ranks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ssim, cs)`` of the pytorch-msssim variant: valid Gaussian filtering, batch means.

    The dynamic range comes from ``a`` alone: ``(255 if max(a) > 128 else 1) -
    (-1 if min(a) < -0.5 else 0)``. With ``ranks`` of several processes, each holding an equal
    part of the batch, the maxima and means are those of the whole batch (crossfuse_fast.distributed).
    """
    many = ranks is not None and ranks.world > 1
    # As tensors, not Python branches, so torch.compile traces one graph; in float64, so the
    # constants below round to the input's dtype exactly as the Python floats they replace.
    max_value = torch.where((ranks.max(a.max()) if many else a.max()) > 128, 255.0, 1.0).double()
    min_value = torch.where((ranks.min(a.min()) if many else a.min()) < -0.5, -1.0, 0.0).double()
    dynamic_range = max_value - min_value
    channels, height, width = a.shape[1:]
    window = gaussian_window(min(window_size, height, width), channels=channels, device=a.device, dtype=a.dtype)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1 = (0.01 * dynamic_range) ** 2
    c2 = (0.03 * dynamic_range) ** 2
    contrast = (2.0 * cov + c2) / (var_a + var_b + c2)
    ssim_map = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    if many:
        count = ssim_map.numel() * ranks.world
        return ranks.sum(ssim_map.sum()) / count, ranks.sum(contrast.sum()) / count
    return ssim_map.mean(), contrast.mean()


def msssim(a: torch.Tensor, b: torch.Tensor, normalize: bool = True, ranks: Ranks | None = None) -> torch.Tensor:
    """Five-scale MS-SSIM of the pytorch-msssim variant (``a`` the reconstruction, ``b`` the input).

    ``prod_{i<4}(cs_i^w_i * ssim_4^w_4)``, with ``(v + 1) / 2`` applied to every value when
    ``normalize``. ``ranks``: as in :func:`ssim` (the MS-SSIM of the batch of all processes).
    """
    sims, contrasts = [], []
    for scale in range(len(MSSSIM_WEIGHTS)):
        if scale:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        sim, contrast = ssim(a, b, ranks=ranks)
        sims.append(sim)
        contrasts.append(contrast)
    sims, contrasts = torch.stack(sims), torch.stack(contrasts)
    if normalize:
        sims, contrasts = (sims + 1) / 2, (contrasts + 1) / 2
    weights = torch.tensor(MSSSIM_WEIGHTS, dtype=sims.dtype, device=sims.device)
    return torch.prod(contrasts[:-1] ** weights[:-1] * sims[-1] ** weights[-1])


def autoencoder_loss(autoencoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Stage-1 loss: ``MSE(out, x) + 10000 (1 - msssim(out, x, normalize=True))``."""
    return autoencoder_loss_terms(autoencoder, images)["loss"]


def autoencoder_loss_terms(autoencoder: nn.Module, images: torch.Tensor,
                           ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
    """:func:`autoencoder_loss` (``"loss"``) and its unweighted terms: ``"pixel"`` the MSE,
    ``"ssim"`` ``1 - msssim``. With ``ranks`` of several processes (each holding an equal part of
    the batch) ``"ssim"`` is that of the whole batch and ``"pixel"`` this process's part, so that
    DDP's averaged gradients are those of the whole batch's loss (crossfuse_fast.distributed)."""
    reconstruction = autoencoder(images)
    pixel = F.mse_loss(reconstruction, images)
    ssim = 1.0 - msssim(reconstruction, images, normalize=True, ranks=ranks)
    return {"loss": pixel + MSSSIM_LOSS_WEIGHT * ssim, "pixel": pixel, "ssim": ssim}


def box_mean(x: torch.Tensor, size: int = 11) -> torch.Tensor:
    """``size x size`` mean with zero padding, always divided by ``size ** 2``."""
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=True)


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian of ``[B, 1, H, W]`` with zero padding."""
    kernel = torch.tensor(LAPLACIAN, dtype=x.dtype, device=x.device)[None, None]
    return F.conv2d(x, kernel, padding=1)


def order_loss(fused: torch.Tensor, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """MSE to the pixelwise choice of the source with the larger 11 x 11 mean intensity."""
    mean_ir, mean_vis = box_mean(ir), box_mean(vis)
    total = mean_ir + mean_vis + 1e-6
    mask = (mean_ir / total > mean_vis / total).to(ir.dtype)
    return F.mse_loss(fused, mask * ir + (1 - mask) * vis)


def gradient_loss(fused: torch.Tensor, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """MSE between ``relu(Laplacian(fused))`` and the larger of the sources' ones."""
    target = torch.maximum(laplacian(ir).clamp(min=0), laplacian(vis).clamp(min=0))
    return F.mse_loss(laplacian(fused).clamp(min=0), target)


def fusion_loss(fusion_net: nn.Module, ir_autoencoder: nn.Module, vis_autoencoder: nn.Module,
                ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss ``order + 10 * gradient`` of the fusion network on a batch of pairs.

    The encoders are frozen (no gradient reaches them); the fusion network runs as it is
    (train mode for training), without the shift, its cross encoder on each whole deep map as one
    window, as the released training code runs it (docs/model.md#stage-2-training): on the
    released 256 x 256 crops the deep maps are one window anyway; on other crop sizes (multiples
    of 16, so that the deep sides are even) this is what the released code computes.
    """
    return fusion_loss_terms(fusion_net, ir_autoencoder, vis_autoencoder, ir, vis)["loss"]


def fusion_loss_terms(fusion_net: nn.Module, ir_autoencoder: nn.Module, vis_autoencoder: nn.Module,
                      ir: torch.Tensor, vis: torch.Tensor,
                      deep: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """:func:`fusion_loss` (``"loss"``) and its unweighted terms ``"order"`` and ``"gradient"``.
    ``deep``: the encoders' deep maps of ``ir`` and ``vis`` if already known (a
    :class:`~crossfuse_fast.feature_cache.DeepMapCache`); then only the shallow maps are computed."""
    with torch.no_grad():
        if deep is None:
            ir_shallow, ir_deep = ir_autoencoder.encode(ir)
            vis_shallow, vis_deep = vis_autoencoder.encode(vis)
        else:
            (ir_deep, vis_deep), ir_shallow, vis_shallow = deep, ir_autoencoder.shallow(ir), vis_autoencoder.shallow(vis)
    fused = fusion_net(ir_deep, ir_shallow, vis_deep, vis_shallow, shift=False, windows=False)
    order, gradient = order_loss(fused, ir, vis), gradient_loss(fused, ir, vis)
    return {"loss": order + GRADIENT_LOSS_WEIGHT * gradient, "order": order, "gradient": gradient}
