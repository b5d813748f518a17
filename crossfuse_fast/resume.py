"""Exact resume: a training run's whole state saved atomically, the data order it depends on, and
an orderly stop on SIGINT or SIGTERM.

A run is a function of its settings and data only: each epoch's batch order is drawn from a
generator seeded by the run's seed and the epoch, the weights and the optimiser move only by
steps, and torch's global generator is saved with them. A run restored from the state saved after
step ``s`` of epoch ``e`` and continued therefore computes what the run left alone computed, bit
for bit on a CPU.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import write_atomically

STATE_FORMAT = 1


def epoch_batches(length: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The dataset indices of each batch of ``epoch`` (1-based): a permutation drawn from a
    generator seeded by ``(seed, epoch)``; the last incomplete batch is dropped unless the data
    holds less than one batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(length, generator=generator).tolist()
    count = length // batch_size if length >= batch_size else math.ceil(length / batch_size)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


@dataclass(frozen=True)
class Progress:
    """Where a run stands: ``step`` batches of epoch ``epoch`` (1-based) are done."""

    epoch: int
    step: int


def state_path(out_dir: str | os.PathLike, stem: str) -> Path:
    return Path(out_dir) / f"{stem}_state.pt"


def save_state(path: Path, progress: Progress, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler, settings: dict) -> None:
    """Everything a run needs to continue from ``progress``, written atomically (the previous
    state stays until the new one is complete)."""
    state = {"format": STATE_FORMAT, "epoch": progress.epoch, "step": progress.step, "settings": settings,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    write_atomically(path, lambda target: torch.save(state, target), overwrite=True)


def load_state(path: Path, settings: dict) -> dict:
    """The state at ``path`` (``weights_only``), checked to belong to a run with ``settings``;
    ``ValueError`` naming the file and the first setting that differs."""
    if not path.is_file():
        raise ValueError(f"{path}: no training state to resume (it is written every --save-every steps and at "
                         "each epoch's end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one message
        raise ValueError(f"{path}: not a readable training state ({type(error).__name__})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a training state of this version")
    for name, value in settings.items():
        if state["settings"].get(name) != value:
            raise ValueError(f"{path}: saved by a run with {name}={state['settings'].get(name)!r}, not {value!r}; "
                             "resume with the same settings")
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(state["epoch"], state["step"])


class Interrupted(Exception):
    """A run stopped on SIGINT or SIGTERM after saving its state."""

    def __init__(self, signum: int, progress: Progress, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after epoch {progress.epoch} step "
                         f"{progress.step}; its state is in {path}: run the same command with --resume "
                         "(resume=True) to continue")
        self.signum = signum


class StopRequests:
    """While active (in the main thread), SIGINT and SIGTERM do not kill the run: they are recorded
    in ``signum``, for the loop to save its state after the step under way and stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
