"""Both training stages with the released optimiser settings as defaults (docs/model.md#training-schedules).

Stage 1 trains one autoencoder per modality; stage 2 trains the fusion network on top of the
two frozen encoders. Each epoch's weights are saved in the released format (a plain state
dict via ``torch.save``), so ``CrossFuse.from_original`` loads them like the authors' files.
"""
from __future__ import annotations

import csv
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from .backends import DEFAULT_BACKEND, NO_TRITON_NOTICE, fast_autoencoder, fast_fusion_net, resolve_backend
from .checkpoints import save_tensors
from .distributed import Ranks, with_global_batch_norms
from .feature_cache import DeepMapCache, fingerprint
from .files import write_image, write_text
from .losses import autoencoder_loss_terms, fusion_loss_terms
from .reference import AutoEncoder, FusionNet
from .resume import Interrupted, Progress, StopRequests, epoch_batches, load_state, restore, save_state, state_path
from .training_pictures import plot_losses, sample_grid

__all__ = ["Interrupted", "train_autoencoder", "train_fusion"]

SAMPLES = 4
"""Images (stage 1) or pairs (stage 2) drawn after each epoch: the data's first ones."""


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


def _checkpoint_paths(out_dir: str | os.PathLike, stem: str, epochs: int, overwrite: bool,
                      resume: bool) -> list[Path]:
    """The per-epoch checkpoint paths, checked before any training so no result is lost late:
    a folder that holds another run's checkpoints or state is refused unless ``overwrite``, or
    ``resume`` (which continues that run)."""
    paths = [Path(out_dir) / f"{stem}_epoch{epoch}.model" for epoch in range(1, epochs + 1)]
    existing = [str(p) for p in [*paths, state_path(out_dir, stem)] if p.exists()]
    if existing and not (overwrite or resume):
        raise FileExistsError(f"{existing[0]} exists (a run's results are in {out_dir}); resume it with --resume "
                              "(resume=True), or choose another output folder, or pass --overwrite to start again")
    return paths


class _LossLog:
    """``<stem>_losses.csv``: one row per step (epoch, step, the loss and its terms), appended as the
    run goes; on resume, the rows after the saved step (steps about to be redone) are dropped."""

    def __init__(self, out_dir: str | os.PathLike, stem: str, resumed_from: Progress | None):
        self.path = Path(out_dir) / f"{stem}_losses.csv"
        self.columns: list[str] | None = None
        if resumed_from is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            self.columns = rows[0][2:] if rows else None
            kept = rows[:1] + [r for r in rows[1:] if (int(r[0]), int(r[1])) <= (resumed_from.epoch, resumed_from.step)]
            write_text(self.path, "".join(",".join(r) + "\n" for r in kept), overwrite=True)
        elif self.path.exists():
            self.path.unlink()

    def append(self, epoch: int, step: int, terms: dict[str, float]) -> None:
        if self.columns is None:
            self.columns = list(terms)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("epoch,step," + ",".join(self.columns) + "\n", encoding="utf-8")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{epoch},{step}," + ",".join(repr(terms[c]) for c in self.columns) + "\n")


def _processes(batch_size: int, log: Callable[[str], None]) -> tuple[Ranks, Callable[[str], None]]:
    """This process's ranks (one process unless a process group is made: torchrun) and its log
    (rank 0's only); ``ValueError`` when the global batch does not split evenly."""
    ranks = Ranks.current()
    if batch_size % ranks.world:
        raise ValueError(f"the batch of {batch_size} does not split evenly over {ranks.world} processes; "
                         "--batch-size is the global batch (all processes together)")
    return ranks, (log if ranks.main else (lambda line: None))


def _across_processes(network: torch.nn.Module, ranks: Ranks, device: torch.device | str,
                      unused_parameters: bool) -> torch.nn.Module:
    """``network`` in DistributedDataParallel when there are several processes. Buffers are not
    broadcast: the only ones, BatchNorm running statistics, are the same in every process
    (:class:`~crossfuse_fast.distributed.GlobalBatchNorm2d`)."""
    if ranks.world == 1:
        return network
    device = torch.device(device)
    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=unused_parameters)


def _run_epochs(name: str, model: torch.nn.Module, dataset: Dataset, batch_size: int, terms_of_batch: Callable,
                optimizer: torch.optim.Optimizer, scheduler, paths: list[Path], *, max_steps: int | None,
                resume: bool, save_every: int | None, keep: int | None, seed: int,
                settings: dict, samples: Callable[[], tuple[list[str], list[list]]], ranks: Ranks,
                device: torch.device | str, log: Callable[[str], None]) -> None:
    """One pass over the data per checkpoint path, saving the model's state dict after each (the
    last ``keep`` of them kept, when given).

    The run's whole state goes to ``<name>_state.pt`` every ``save_every`` steps and at each
    epoch's end; ``resume`` continues from it (crossfuse_fast.resume). SIGINT or SIGTERM stops the
    run after the step under way, with its state saved (:class:`Interrupted`). At each epoch's end
    the loss curves are drawn to ``<name>_losses.png`` and ``samples()`` (column names and rows of
    images) to ``<name>_samples_epoch<n>.png``; a progress bar shows the loss and images per second.
    With several processes (``ranks``) each takes its equal, contiguous part of every batch; rank 0
    alone reads the state and writes every file, and all stop at the same step.
    """
    out_dir = paths[0].parent
    state_file = state_path(out_dir, name)
    settings = {"stage": name, "epochs": len(paths), "batch_size": batch_size, "samples": len(dataset),
                "seed": seed, "max_steps": max_steps, **settings}
    start = (restore(ranks.from_main(lambda: load_state(state_file, settings)), model, optimizer, scheduler)
             if resume else Progress(1, 0))
    if resume:
        log(f"resuming {name} from epoch {start.epoch} step {start.step}")
    losses = _LossLog(out_dir, name, start if resume else None) if ranks.main else None
    part = batch_size // ranks.world
    with StopRequests() as stop:
        for epoch in range(start.epoch, len(paths) + 1):
            batches = epoch_batches(len(dataset), batch_size, seed, epoch)[:max_steps]
            first = start.step + 1 if epoch == start.epoch else 1
            bar = tqdm(total=len(batches), initial=first - 1, desc=f"{name} epoch {epoch}/{len(paths)}",
                       unit="batch", disable=None if ranks.main else True, leave=False)
            began = time.perf_counter()
            for step in range(first, len(batches) + 1):
                indices = batches[step - 1][ranks.rank * part:(ranks.rank + 1) * part]
                terms = terms_of_batch(default_collate([dataset[i] for i in indices]), indices)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()
                values = ranks.mean({key: value.item() for key, value in terms.items()}, device)
                if ranks.main:
                    losses.append(epoch, step, values)
                    log(f"{name} epoch {epoch} step {step} loss {values['loss']:.4f}")
                    bar.update()
                    rate = (step - first + 1) * batch_size / (time.perf_counter() - began)
                    bar.set_postfix(loss=f"{values['loss']:.4g}", images_per_s=f"{rate:.3g}")
                stopping = ranks.any(stop.signum is not None, device)
                if ranks.main and (stopping or (save_every and step % save_every == 0 and step < len(batches))):
                    save_state(state_file, Progress(epoch, step), model, optimizer, scheduler, settings)
                if stopping:
                    ranks.wait()  # for rank 0's save, so that no process ends while another still works
                    raise Interrupted(stop.signum or signal.SIGTERM, Progress(epoch, step), state_file)
            bar.close()
            scheduler.step()
            if ranks.main:
                save_tensors(model.state_dict(), paths[epoch - 1], overwrite=True)
                save_state(state_file, Progress(epoch + 1, 0), model, optimizer, scheduler, settings)
                log(f"saved {paths[epoch - 1]}")
                for old in paths[:max(epoch - keep, 0)] if keep else []:
                    old.unlink(missing_ok=True)
                plot_losses(losses.path, out_dir / f"{name}_losses.png")
                write_image(out_dir / f"{name}_samples_epoch{epoch}.png", sample_grid(*samples()), overwrite=True)


def train_autoencoder(dataset: Dataset, out_dir: str | os.PathLike, *, epochs: int = 4, batch_size: int = 2,
                      lr: float = 1e-4, weight_decay: float = 0.9, decay_from_epoch: int = 3,
                      decay: float = 0.1, device: str | torch.device = "cpu", max_steps: int | None = None,
                      autoencoder: AutoEncoder | None = None, overwrite: bool = False, seed: int = 0,
                      backend: str = DEFAULT_BACKEND, resume: bool = False, save_every: int | None = 100,
                      keep: int | None = None, log: Callable[[str], None] = print) -> AutoEncoder:
    """Stage 1 on ``dataset`` (items ``[1, H, W]`` on 0..255), writing ``autoencoder_epoch<n>.model``.

    Defaults are the released schedule: Adam(lr 1e-4, weight_decay 0.9), batch 2, 4 epochs,
    learning rate x 0.1 from the third epoch on. ``max_steps`` caps the batches per epoch.
    The run's state is saved every ``save_every`` steps and at each epoch's end, with each step's
    loss terms in ``autoencoder_losses.csv``; ``resume=True`` continues an interrupted run in
    ``out_dir`` exactly (the same settings; crossfuse_fast.resume), and SIGINT or SIGTERM stops
    it after the step under way with its state saved (raising :class:`Interrupted`). ``keep``: only
    the last ``keep`` epochs' checkpoints stay (default all).
    ``backend`` is as in :func:`crossfuse_fast.fuse` (``"auto"``: the fast path where Triton is
    installed); the fast path trains the same parameters through its autoencoder
    (:class:`crossfuse_fast.fast.FastAutoEncoder`, docs/fast-path.md).

    Under torchrun (a default process group made, as ``crossfuse train-autoencoder`` does there)
    the processes train one model together: ``batch_size`` is the global batch, split evenly, and
    the result is one process's on that batch up to rounding (docs/training.md#many-processes).
    """
    ranks, log = _processes(batch_size, log)
    backend = _resolved(backend, log)
    paths = ranks.from_main(lambda: _checkpoint_paths(out_dir, "autoencoder", epochs, overwrite, resume))
    torch.manual_seed(seed)
    model = (autoencoder if autoencoder is not None else AutoEncoder()).to(device).train()
    optimizer, scheduler = _adam_with_step_decay(model.parameters(), lr, weight_decay, decay_from_epoch, decay)
    network = fast_autoencoder(model) if backend == "fast" else model
    trained = _across_processes(network, ranks, device, unused_parameters=False)
    shown = default_collate([dataset[i] for i in range(min(SAMPLES, len(dataset)))]).to(device)

    def samples() -> tuple[list[str], list[list]]:
        with torch.no_grad():
            made = network(shown)
        return ["input", "reconstruction"], [[x[0].cpu().numpy(), y[0].cpu().numpy()] for x, y in zip(shown, made)]

    _run_epochs("autoencoder", model, dataset, batch_size,
                lambda images, indices: autoencoder_loss_terms(trained, images.to(device), ranks), optimizer, scheduler,
                paths, max_steps=max_steps, resume=resume, save_every=save_every, keep=keep,
                seed=seed, settings=dict(lr=lr, weight_decay=weight_decay, decay_from_epoch=decay_from_epoch,
                                         decay=decay, backend=backend), samples=samples, ranks=ranks, device=device,
                log=log)
    return model


def train_fusion(dataset: Dataset, ir_autoencoder: AutoEncoder, vis_autoencoder: AutoEncoder,
                 out_dir: str | os.PathLike, *, epochs: int = 32, batch_size: int = 8, lr: float = 1e-3,
                 weight_decay: float = 0.9, decay_from_epoch: int = 3, decay: float = 0.1,
                 device: str | torch.device = "cpu", max_steps: int | None = None,
                 fusion: FusionNet | None = None, overwrite: bool = False, seed: int = 0,
                 backend: str = DEFAULT_BACKEND, resume: bool = False, save_every: int | None = 100,
                 cache_features: bool = False, keep: int | None = None,
                 log: Callable[[str], None] = print) -> FusionNet:
    """Stage 2 on ``dataset`` (items ``(ir, vis)``, each ``[1, 256, 256]`` on 0..255, or another
    size whose sides are multiples of 16: the cross encoder runs on each whole deep map, as the
    released training does, docs/model.md#stage-2-training).

    The encoders stay frozen; only the fusion network's trainable parameters are optimised.
    Writes ``fusion_epoch<n>.model``. Defaults are the released schedule: Adam(lr 1e-3,
    weight_decay 0.9), batch 8, 32 epochs, learning rate x 0.1 from the third epoch on. State,
    loss terms (``fusion_losses.csv``), ``resume``, stops, ``keep`` and many processes as in
    :func:`train_autoencoder`; with several processes the fusion network's BatchNorms become
    :class:`~crossfuse_fast.distributed.GlobalBatchNorm2d` (statistics of the global batch, the
    same state dict).
    ``cache_features`` computes the frozen encoders' deep maps of the whole data set once, into
    ``fusion_deep_maps.npy`` in ``out_dir`` (1 MB per 256 x 256 pair, reused by resumes), and
    steps read them (:class:`~crossfuse_fast.feature_cache.DeepMapCache`): the same loss up to
    float rounding, faster where encoding is a large part of a step (bench/NOTES.md).
    ``backend`` is as in :func:`crossfuse_fast.fuse` (``"auto"``: the fast path where Triton is
    installed); the fast path trains the same parameters through
    :class:`crossfuse_fast.fast.FastFusionNet` on the frozen encoders'
    :class:`crossfuse_fast.fast.FastAutoEncoder` (docs/fast-path.md).
    """
    height, width = dataset[0][0].shape[-2:]
    if height % 16 or width % 16:
        raise ValueError(f"stage 2 needs crops whose sides are multiples of 16 (the cross encoder reads the whole "
                         f"deep map in 2 x 2 patches, as released), got {height} x {width}")
    ranks, log = _processes(batch_size, log)
    if cache_features and ranks.world > 1:
        raise ValueError("--cache-features runs in one process (the cache is one file for the whole data set); "
                         "under torchrun each process encodes its own part of each batch")
    backend = _resolved(backend, log)
    paths = ranks.from_main(lambda: _checkpoint_paths(out_dir, "fusion", epochs, overwrite, resume))
    torch.manual_seed(seed)
    for encoder in (ir_autoencoder, vis_autoencoder):
        encoder.to(device).eval().requires_grad_(False)
    model = (fusion if fusion is not None else FusionNet()).to(device).train()
    if ranks.world > 1:
        with_global_batch_norms(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _adam_with_step_decay(trainable, lr, weight_decay, decay_from_epoch, decay)

    network = fast_fusion_net(model) if backend == "fast" else model
    # The released loss leaves some parameters without a gradient (tests/test_training.py).
    trained = _across_processes(network, ranks, device, unused_parameters=True)
    encoders = ((fast_autoencoder(ir_autoencoder), fast_autoencoder(vis_autoencoder)) if backend == "fast"
                else (ir_autoencoder, vis_autoencoder))

    cache = (DeepMapCache(out_dir, dataset, encoders, fingerprint(ir_autoencoder, vis_autoencoder), batch_size, device)
             if cache_features else None)

    def terms_of_batch(pair: tuple[torch.Tensor, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        return fusion_loss_terms(trained, *encoders, pair[0].to(device), pair[1].to(device),
                                 deep=cache[indices] if cache is not None else None)

    shown_ir, shown_vis = (x.to(device) for x in
                           default_collate([dataset[i] for i in range(min(SAMPLES, len(dataset)))]))

    def samples() -> tuple[list[str], list[list]]:
        # Eval mode (running statistics) for the picture, so that it leaves them as training has them.
        model.eval()
        try:
            with torch.no_grad():
                (ir_shallow, ir_deep), (vis_shallow, vis_deep) = (e.encode(x) for e, x in zip(encoders, (shown_ir, shown_vis)))
                fused = network(ir_deep, ir_shallow, vis_deep, vis_shallow, shift=False, windows=False)
        finally:
            model.train()
        return ["infrared", "visible", "fused"], [[a[0].cpu().numpy(), b[0].cpu().numpy(), f[0].cpu().numpy()]
                                                  for a, b, f in zip(shown_ir, shown_vis, fused)]

    _run_epochs("fusion", model, dataset, batch_size, terms_of_batch, optimizer, scheduler, paths,
                max_steps=max_steps, resume=resume, save_every=save_every, keep=keep, seed=seed,
                settings=dict(lr=lr, weight_decay=weight_decay, decay_from_epoch=decay_from_epoch, decay=decay,
                              backend=backend, cache_features=cache_features), samples=samples, ranks=ranks,
                device=device, log=log)
    return model
