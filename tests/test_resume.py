"""Exact resume: a run stopped by a signal, or killed between saves, and resumed ends with the
weights (and the loss log) of the run left alone, bit for bit on the CPU."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import weights

from crossfuse_fast.data import SyntheticPairs
from crossfuse_fast.resume import Interrupted, epoch_batches
from crossfuse_fast.train import train_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def _stage_one(out: Path, **kwargs):
    return train_autoencoder(SyntheticPairs(6, 32, modality="ir"), out, epochs=2, batch_size=2, backend="reference",
                             **kwargs)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone")
    model = _stage_one(out, save_every=1, log=lambda line: None)
    return out, model.state_dict()


def test_a_signal_stops_after_the_step_and_resume_is_exact(left_alone, tmp_path):
    """SIGTERM during epoch 2's first step: the step finishes, the state is saved, the run stops;
    resumed, it ends where the run left alone ended, its loss log too."""
    alone_dir, alone = left_alone

    def log(line: str) -> None:
        if line == "autoencoder epoch 2 step 1 loss " + line.split()[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM after epoch 2 step 1"):
        _stage_one(tmp_path, save_every=100, log=log)
    assert (tmp_path / "autoencoder_epoch1.model").exists() and not (tmp_path / "autoencoder_epoch2.model").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        _stage_one(tmp_path, save_every=100)
    resumed = _stage_one(tmp_path, save_every=100, resume=True, log=lambda line: None)
    assert _equal_states(resumed.state_dict(), alone)
    assert (tmp_path / "autoencoder_losses.csv").read_text() == (alone_dir / "autoencoder_losses.csv").read_text()
    for epoch in (1, 2):
        name = f"autoencoder_epoch{epoch}.model"
        assert _equal_states(torch.load(tmp_path / name, weights_only=True),
                             torch.load(alone_dir / name, weights_only=True))


def test_a_crash_between_saves_resumes_from_the_last_one(left_alone, tmp_path):
    """Killed in epoch 1's third step (no orderly stop) with a state saved every 2 steps: resumed,
    step 3 is done again from the state after step 2, and the run ends as the one left alone."""
    _, alone = left_alone

    def crash(line: str) -> None:
        if line.startswith("autoencoder epoch 1 step 3 "):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _stage_one(tmp_path, save_every=2, log=crash)
    assert _equal_states(_stage_one(tmp_path, save_every=2, resume=True, log=lambda line: None).state_dict(), alone)
    with pytest.raises(ValueError, match="saved by a run with batch_size=2, not 3"):
        train_autoencoder(SyntheticPairs(6, 32, modality="ir"), tmp_path, epochs=2, batch_size=3, resume=True,
                          backend="reference")


def test_epoch_order_is_a_function_of_seed_and_epoch():
    first = epoch_batches(10, 3, seed=4, epoch=1)
    assert first == epoch_batches(10, 3, seed=4, epoch=1) != epoch_batches(10, 3, seed=4, epoch=2)
    assert [len(b) for b in first] == [3, 3, 3] and len({i for b in first for i in b}) == 9
    assert epoch_batches(2, 8, seed=0, epoch=1) in ([[0, 1]], [[1, 0]])


def test_the_command_stops_on_sigterm_and_resumes(trained, tmp_path):
    """Stage 2 through the installed entry point: SIGTERM mid-run exits 143 with one line saying how
    to resume; the same command with --resume ends with the uninterrupted run's weights."""
    command = [shutil.which("crossfuse") or sys.executable, "train-fusion", "--synthetic", "4", "--size", "64",
               "--batch-size", "2", "--epochs", "2", "--backend", "reference", "--save-every", "1",
               "--ir-autoencoder", weights(trained)[1], "--vis-autoencoder", weights(trained)[3]]
    alone = subprocess.run([*command, "--out", str(tmp_path / "alone")], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr
    out = tmp_path / "stopped"
    process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("fusion epoch 1 step 1 "):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM after epoch 1 step" in stderr and "--resume" in stderr
    resumed = subprocess.run([*command, "--out", str(out), "--resume"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _equal_states(torch.load(out / "fusion_epoch2.model", weights_only=True),
                         torch.load(tmp_path / "alone" / "fusion_epoch2.model", weights_only=True))
