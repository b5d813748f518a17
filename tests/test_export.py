"""ONNX export: the exportable forward is the model's, the window padding by gather is the
reference's repeated mirroring, and the file written by ``crossfuse export`` runs in onnxruntime
at any batch, height and width to the PyTorch result up to float32 rounding."""
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import weights

from crossfuse_fast import CrossFuse
from crossfuse_fast.export import ExportableCrossFuse, reflected_indices, sample_pair
from crossfuse_fast.reference.functional import reflect_pad_extended

ONNX_TOLERANCE = 1e-3
"""Grey levels (of 0..255) between onnxruntime and PyTorch, both float32: measured near 3e-4 (sums in
another order, magnified by the final stretch to 0..255), far under one level of an 8-bit image."""
SIZES = [(1, 16, 16), (3, 100, 72), (2, 270, 300), (1, 41, 517)]
"""``(batch, height, width)``: the smallest sides; deep maps shorter than a window (mirrored more
than once); two by two windows; a long, odd-sized image."""


@pytest.mark.parametrize("side", [2, 3, 5, 9, 31, 32, 33])
def test_reflected_indices_are_the_references_repeated_mirroring(side):
    row = torch.arange(side, dtype=torch.float64)[None, None, None]
    for pad in (0, 1, side - 1, side, 3 * side + 2, 31):
        want = reflect_pad_extended(row, 0, pad, 0, 0)[0, 0, 0].long()
        assert torch.equal(reflected_indices(side, side + pad, row), want), (side, pad)


@pytest.mark.parametrize("batch, height, width", [(1, 16, 24), (2, 100, 72), (1, 270, 300)])
def test_the_exportable_forward_is_the_models(model, batch, height, width):
    ir, vis = sample_pair(height, width, batch, seed=3)
    with torch.no_grad():
        assert torch.equal(ExportableCrossFuse(model)(ir, vis), model(ir, vis))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """``crossfuse export --check`` through the installed entry point, on the weights a short
    training run wrote."""
    path = tmp_path_factory.mktemp("export") / "crossfuse.onnx"
    command = [shutil.which("crossfuse") or sys.executable, "export", "--onnx", str(path), *weights(trained), "--check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return path, result.stdout, CrossFuse.from_original(**dict(zip(("ir_autoencoder", "vis_autoencoder", "fusion"),
                                                                   weights(trained)[1::2]))).eval()


def test_the_command_writes_a_file_onnxruntime_runs_at_any_size(exported):
    path, stdout, model = exported
    assert "inputs ir, vis and output fused" in stdout
    assert float(stdout.split("onnxruntime: ")[1].split()[0]) < ONNX_TOLERANCE
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", 1, "height", "width"]] * 2
    for seed, (batch, height, width) in enumerate(SIZES):
        ir, vis = sample_pair(height, width, batch, seed=seed)
        with torch.no_grad():
            want = model(ir, vis).numpy()
        got = session.run(["fused"], {"ir": ir.numpy(), "vis": vis.numpy()})[0]
        assert got.shape == (batch, 1, height, width)
        assert np.abs(got - want).max() < ONNX_TOLERANCE, (batch, height, width)


def test_the_command_refuses_to_overwrite_or_to_write_a_weight(exported, trained, tmp_path):
    path, _, _ = exported
    before = path.read_bytes()
    crossfuse = [shutil.which("crossfuse") or sys.executable, "export"]
    for args, message in (([str(path)], "exists; pass --overwrite"),
                          ([weights(trained)[5], "--overwrite"], "is one of the weights read"),
                          ([str(tmp_path / "model.pt")], "name ends in .onnx")):
        result = subprocess.run([*crossfuse, "--onnx", *args, *weights(trained)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert path.read_bytes() == before


def test_exporting_leaves_the_model_as_it_was(model, tmp_path):
    """The file is traced from a float32 eval copy: a float64 model in train mode stays one."""
    import copy

    from crossfuse_fast.export import export_onnx

    double = copy.deepcopy(model).double().train()
    before = {name: tensor.clone() for name, tensor in double.state_dict().items()}
    export_onnx(double, tmp_path / "double.onnx")
    assert double.training and all(t.dtype == torch.float64 for t in double.state_dict().values() if t.is_floating_point())
    assert all(torch.equal(before[name], tensor) for name, tensor in double.state_dict().items())
