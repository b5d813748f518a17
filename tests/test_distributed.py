"""Many processes (torchrun, gloo on the CPU): two processes end where one process on the same
global batch ends, and the command runs under torchrun with rank 0 alone writing files.

The float64 cases (tests/distributed_worker.py) differ from one process by the order of float
additions only (1e-13 and below); the naive split, each process with its own half's statistics,
is shown to be off by far more, so the comparison can fail.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from crossfuse_fast.losses import autoencoder_loss_terms, fusion_loss
from crossfuse_fast.reference import FusionNet
from crossfuse_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATE = {"autoencoder": 1e-4, "fusion": 1e-3}
"""The released learning rates, which the ``train`` case uses: Adam moves a weight by about this much a step."""
TIGHT = 1e-12
"""Relative difference allowed in float64 between two processes and one (additions reordered)."""


def torchrun(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                   "OMP_NUM_THREADS": "1"}
    environment.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def run_worker(case: str, out: Path) -> list[dict]:
    result = torchrun(str(ROOT / "tests" / "distributed_worker.py"), case, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def relative(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    return ((got - want).abs().max() / (want.abs().max() if scale is None else scale)).item()


def largest(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest difference over the largest magnitude of all of ``want`` (a convolution's bias
    before a BatchNorm has a gradient of zero but for rounding)."""
    scale = max(w.abs().max().item() for w in want)
    return max(relative(g, w, scale) for g, w in zip(got, want))


def averaged(ranks: list[dict], key: str) -> list[torch.Tensor]:
    return [(a + b) / 2 for a, b in zip(ranks[0][key]["gradients"], ranks[1][key]["gradients"])]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return run_worker("parts", tmp_path_factory.mktemp("parts"))


def test_global_batch_norm_is_batch_norm_of_the_whole_batch(parts):
    network = worker.norm_network(nn.BatchNorm2d)
    images = worker.batch(1)
    weights = torch.rand(4, 3, 38, 38, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    output = network(images)
    (output * weights).mean().backward()
    gradients = [p.grad for p in network.parameters()]
    running = [network[1].running_mean, network[1].running_var]

    got = parts[0]["norm_global"], parts[1]["norm_global"]
    assert relative(torch.cat([got[0]["output"], got[1]["output"]]), output.detach()) < TIGHT
    assert largest(averaged(parts, "norm_global"), gradients) < TIGHT
    for rank in got:
        assert largest(rank["running"], running) < TIGHT
    assert largest(averaged(parts, "norm_local"), gradients) > 5e-3
    assert largest(parts[0]["norm_local"]["running"], running) > 0.1


def test_global_msssim_loss_is_that_of_the_whole_batch(parts):
    network = worker.conv_network()
    loss = autoencoder_loss_terms(network, worker.batch(1))["loss"]
    loss.backward()
    gradients = [p.grad for p in network.parameters()]

    mean_loss = (parts[0]["msssim_global"]["loss"] + parts[1]["msssim_global"]["loss"]) / 2
    assert relative(mean_loss, loss.detach()) < TIGHT
    assert largest(averaged(parts, "msssim_global"), gradients) < TIGHT
    assert largest(averaged(parts, "msssim_local"), gradients) > 1e-3


def rounding_only_gradients(fusion: nn.Module, ir_encoder: nn.Module, vis_encoder: nn.Module) -> set[str]:
    """The fusion parameters whose gradient on the first batch is rounding noise (below 1e-12 of
    the largest): the loss does not depend on them."""
    ir, vis = default_collate([worker.stage_two_data()[i] for i in range(4)])
    fusion_loss(fusion, ir_encoder, vis_encoder, ir, vis).backward()
    used = {name: p.grad.abs().max().item() for name, p in fusion.named_parameters() if p.grad is not None}
    return {name for name, size in used.items() if size < 1e-12 * max(used.values())}


def test_two_processes_train_both_stages_to_the_weights_of_one(tmp_path):
    """Both stages, two epochs of two steps of a global batch of 4: each process's weights equal
    one process's on the same batches (float64, additions reordered) to a millionth of one Adam
    step (the learning rate; the largest difference is near 3e-8 of a step, in the cross encoder's
    attention weights, whose Adam denominators are small), and so do the loss logs.

    Stage 2's decoder is linear from its first convolution to the min-max stretch, each
    convolution followed by a BatchNorm: every bias there (convolutions' and BatchNorms') shifts a
    channel by a constant that the next BatchNorm or the stretch removes, so its gradient is
    rounding noise, which Adam scales to steps of the learning rate, whatever the order of additions
    (docs/training.md#many-processes). So is the cross attention's key bias (it adds the same
    amount to every score of a query, which the softmax removes). Those biases, and the running
    means they shift, are left out of the comparison; the function is compared instead: the
    trained networks fuse a batch (train mode) to the same image.
    """
    ranks = run_worker("train", tmp_path / "two")
    alone = worker.train(tmp_path / "one")
    ir_encoder, vis_encoder, _, fusion = worker.initial()
    noise = rounding_only_gradients(fusion, ir_encoder, vis_encoder)
    assert noise == {name for name, _ in fusion.named_parameters() if name.endswith(".bias") and
                     (name.startswith("decoder_fusion.") or name.endswith(".attn.k_linear.bias"))}
    for stage in LEARNING_RATE:
        for name, tensor in alone[stage].items():
            if name in noise or name.endswith("running_mean"):
                continue
            for rank in ranks:
                if tensor.is_floating_point():
                    assert (rank[stage][name] - tensor).abs().max() <= 1e-6 * LEARNING_RATE[stage], (stage, name)
                else:
                    assert torch.equal(rank[stage][name], tensor), (stage, name)
    ir, vis = default_collate([worker.stage_two_data()[i] for i in range(4, 8)])
    (ir_shallow, ir_deep), (vis_shallow, vis_deep) = ir_encoder.encode(ir), vis_encoder.encode(vis)

    def fused(state: dict) -> torch.Tensor:
        network = FusionNet().double()
        network.load_state_dict(state)
        with torch.no_grad():
            return network(ir_deep, ir_shallow, vis_deep, vis_shallow, shift=False, windows=False)
    want = fused(alone["fusion"])
    for rank in ranks:
        assert relative(fused(rank["fusion"]), want) < 1e-10
    for stage, stem in (("stage1", "autoencoder"), ("stage2", "fusion")):
        one = (tmp_path / "one" / stage / f"{stem}_losses.csv").read_text().splitlines()
        two = (tmp_path / "two" / stage / f"{stem}_losses.csv").read_text().splitlines()
        assert one[0] == two[0] and len(one) == len(two) == 5
        for a, b in zip(one[1:], two[1:]):
            assert a.split(",")[:2] == b.split(",")[:2]
            assert all(abs(float(x) - float(y)) <= 1e-10 * abs(float(x))
                       for x, y in zip(a.split(",")[2:], b.split(",")[2:]))


def test_the_commands_under_torchrun(tmp_path):
    """``torchrun -m crossfuse_fast train-autoencoder`` then ``train-fusion --backend fast``: rank 0
    alone writes the checkpoints, losses, pictures and state, the same files as one process, whose
    stage-1 weights and stage-2 losses they give up to float32 rounding; a batch that does not
    split over the processes is one line naming it."""
    stage1 = ["train-autoencoder", "--synthetic", "4", "--synthetic-modality", "ir", "--size", "32", "--epochs", "1",
              "--backend", "reference", "--batch-size", "4"]
    result = torchrun("-m", "crossfuse_fast", *stage1, "--out", str(tmp_path / "two1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1
    encoder = str(tmp_path / "two1" / "autoencoder_epoch1.model")
    stage2 = ["train-fusion", "--synthetic", "4", "--size", "32", "--epochs", "1", "--backend", "fast",
              "--batch-size", "4", "--ir-autoencoder", encoder, "--vis-autoencoder", encoder]
    result = torchrun("-m", "crossfuse_fast", *stage2, "--out", str(tmp_path / "two2"))
    assert result.returncode == 0, result.stderr[-3000:]
    for args, out in ((stage1, "one1"), (stage2, "one2")):
        assert main([*args, "--out", str(tmp_path / out)]) == 0
    for one, two in (("one1", "two1"), ("one2", "two2")):
        assert sorted(p.name for p in (tmp_path / two).iterdir()) == sorted(p.name for p in (tmp_path / one).iterdir())
    got = torch.load(tmp_path / "two1" / "autoencoder_epoch1.model", weights_only=True)
    want = torch.load(tmp_path / "one1" / "autoencoder_epoch1.model", weights_only=True)
    assert max(relative(got[k], want[k]) for k in want) < 1e-5
    one, two = ((tmp_path / out / "fusion_losses.csv").read_text().splitlines() for out in ("one2", "two2"))
    assert one[0] == two[0] and len(one) == len(two) == 2
    assert all(abs(float(x) - float(y)) <= 1e-5 * abs(float(x)) for x, y in zip(one[1].split(","), two[1].split(",")))

    uneven = torchrun("-m", "crossfuse_fast", *stage1[:-1], "3", "--out", str(tmp_path / "three"))
    assert uneven.returncode != 0
    assert uneven.stderr.startswith("crossfuse train-autoencoder: the batch of 3 does not split evenly over 2 processes")


def _rank_pids(agent: int, timeout: float = 60.0) -> dict[int, int]:
    """``{rank: pid}`` of the workers torchrun (``agent``) started, read from their environments."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
            environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = [entry for entry in environment if entry.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(child)
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise AssertionError("torchrun's workers did not start")


def test_a_signal_to_one_process_stops_both_and_resume_is_exact(tmp_path):
    """SIGTERM to rank 1 alone during the first epoch: both processes stop after the same step
    (rank 0 saves the state), and the same command with --resume ends with the weights of the two
    processes left alone, bit for bit."""
    command = ["-m", "crossfuse_fast", "train-autoencoder", "--synthetic", "8", "--synthetic-modality", "ir",
               "--size", "48", "--epochs", "2", "--batch-size", "2", "--backend", "reference", "--save-every", "100"]
    alone = torchrun(*command, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    out = str(tmp_path / "stopped")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                   "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              *command, "--out", out], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    workers = _rank_pids(agent.pid)
    for line in agent.stdout:
        if line.startswith("autoencoder epoch 1 step 1 "):
            os.kill(workers[1], signal.SIGTERM)
            break
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode != 0
    stops = re.findall(r"stopped by SIGTERM after epoch (\d+) step (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1] and stops[0][0] == "1", stderr
    assert not (tmp_path / "stopped" / "autoencoder_epoch2.model").exists()
    resumed = torchrun(*command, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = torch.load(tmp_path / "stopped" / "autoencoder_epoch2.model", weights_only=True)
    want = torch.load(tmp_path / "alone" / "autoencoder_epoch2.model", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
