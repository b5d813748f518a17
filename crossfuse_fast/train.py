"""Both training stages with the released optimiser settings as defaults (docs/model.md#training-schedules).

Stage 1 trains one autoencoder per modality; stage 2 trains the fusion network on top of the
two frozen encoders. Each epoch's weights are saved in the released format (a plain state
dict via ``torch.save``), so ``CrossFuse.from_original`` loads them like the authors' files.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .backends import DEFAULT_BACKEND, NO_TRITON_NOTICE, fast_autoencoder, fast_fusion_net, resolve_backend
from .checkpoints import save_tensors
from .losses import autoencoder_loss, fusion_loss
from .reference import AutoEncoder, FusionNet


def _adam_with_step_decay(parameters, lr: float, weight_decay: float, decay_from_epoch: int,
                          decay: float) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam, with the learning rate times ``decay`` from epoch ``decay_from_epoch`` (1-based) on."""
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: decay if epoch + 1 >= decay_from_epoch else 1.0)
    return optimizer, scheduler


def _resolved(backend: str, log: Callable[[str], None]) -> str:
    resolved = resolve_backend(backend)
    if backend == "auto" and resolved == "reference":
        log(NO_TRITON_NOTICE)
    return resolved


def _checkpoint_paths(out_dir: str | os.PathLike, stem: str, epochs: int, overwrite: bool) -> list[Path]:
    """The per-epoch checkpoint paths, checked before any training so no result is lost late."""
    paths = [Path(out_dir) / f"{stem}_epoch{epoch}.model" for epoch in range(1, epochs + 1)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} checkpoint(s) would be replaced); "
                              "choose another output folder or pass overwrite=True")
    return paths


def _run_epochs(name: str, model: torch.nn.Module, loader: DataLoader, loss_of_batch: Callable,
                optimizer: torch.optim.Optimizer, scheduler, paths: list[Path], max_steps: int | None,
                overwrite: bool, log: Callable[[str], None]) -> None:
    """One pass over ``loader`` per checkpoint path, saving the model's state dict after each."""
    for epoch, path in enumerate(paths, start=1):
        for step, batch in enumerate(loader, start=1):
            if max_steps is not None and step > max_steps:
                break
            loss = loss_of_batch(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log(f"{name} epoch {epoch} step {step} loss {loss.item():.4f}")
        scheduler.step()
        save_tensors(model.state_dict(), path, overwrite=overwrite)
        log(f"saved {path}")


def train_autoencoder(dataset: Dataset, out_dir: str | os.PathLike, *, epochs: int = 4, batch_size: int = 2,
                      lr: float = 1e-4, weight_decay: float = 0.9, decay_from_epoch: int = 3,
                      decay: float = 0.1, device: str | torch.device = "cpu", max_steps: int | None = None,
                      autoencoder: AutoEncoder | None = None, overwrite: bool = False, seed: int = 0,
                      backend: str = DEFAULT_BACKEND, log: Callable[[str], None] = print) -> AutoEncoder:
    """Stage 1 on ``dataset`` (items ``[1, H, W]`` on 0..255), writing ``autoencoder_epoch<n>.model``.

    Defaults are the released schedule: Adam(lr 1e-4, weight_decay 0.9), batch 2, 4 epochs,
    learning rate x 0.1 from the third epoch on. ``max_steps`` caps the batches per epoch.
    ``backend`` is as in :func:`crossfuse_fast.fuse` (``"auto"``: the fast path where Triton is
    installed); the fast path trains the same parameters through its autoencoder
    (:class:`crossfuse_fast.fast.FastAutoEncoder`, docs/fast-path.md).
    """
    backend = _resolved(backend, log)
    paths = _checkpoint_paths(out_dir, "autoencoder", epochs, overwrite)
    torch.manual_seed(seed)
    model = (autoencoder if autoencoder is not None else AutoEncoder()).to(device).train()
    optimizer, scheduler = _adam_with_step_decay(model.parameters(), lr, weight_decay, decay_from_epoch, decay)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size)
    network = fast_autoencoder(model) if backend == "fast" else model
    _run_epochs("autoencoder", model, loader, lambda images: autoencoder_loss(network, images.to(device)),
                optimizer, scheduler, paths, max_steps, overwrite, log)
    return model


def train_fusion(dataset: Dataset, ir_autoencoder: AutoEncoder, vis_autoencoder: AutoEncoder,
                 out_dir: str | os.PathLike, *, epochs: int = 32, batch_size: int = 8, lr: float = 1e-3,
                 weight_decay: float = 0.9, decay_from_epoch: int = 3, decay: float = 0.1,
                 device: str | torch.device = "cpu", max_steps: int | None = None,
                 fusion: FusionNet | None = None, overwrite: bool = False, seed: int = 0,
                 backend: str = DEFAULT_BACKEND, log: Callable[[str], None] = print) -> FusionNet:
    """Stage 2 on ``dataset`` (items ``(ir, vis)``, each ``[1, 256, 256]`` on 0..255, or another
    size whose sides are multiples of 16: the cross encoder runs on each whole deep map, as the
    released training does, docs/model.md#stage-2-training).

    The encoders stay frozen; only the fusion network's trainable parameters are optimised.
    Writes ``fusion_epoch<n>.model``. Defaults are the released schedule: Adam(lr 1e-3,
    weight_decay 0.9), batch 8, 32 epochs, learning rate x 0.1 from the third epoch on.
    ``backend`` is as in :func:`crossfuse_fast.fuse` (``"auto"``: the fast path where Triton is
    installed); the fast path trains the same parameters through
    :class:`crossfuse_fast.fast.FastFusionNet` on the frozen encoders'
    :class:`crossfuse_fast.fast.FastAutoEncoder` (docs/fast-path.md).
    """
    height, width = dataset[0][0].shape[-2:]
    if height % 16 or width % 16:
        raise ValueError(f"stage 2 needs crops whose sides are multiples of 16 (the cross encoder reads the whole "
                         f"deep map in 2 x 2 patches, as released), got {height} x {width}")
    backend = _resolved(backend, log)
    paths = _checkpoint_paths(out_dir, "fusion", epochs, overwrite)
    torch.manual_seed(seed)
    for encoder in (ir_autoencoder, vis_autoencoder):
        encoder.to(device).eval().requires_grad_(False)
    model = (fusion if fusion is not None else FusionNet()).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _adam_with_step_decay(trainable, lr, weight_decay, decay_from_epoch, decay)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size)

    network = fast_fusion_net(model) if backend == "fast" else model
    encoders = ((fast_autoencoder(ir_autoencoder), fast_autoencoder(vis_autoencoder)) if backend == "fast"
                else (ir_autoencoder, vis_autoencoder))

    def loss_of_batch(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return fusion_loss(network, *encoders, pair[0].to(device), pair[1].to(device))

    _run_epochs("fusion", model, loader, loss_of_batch, optimizer, scheduler, paths, max_steps, overwrite, log)
    return model
