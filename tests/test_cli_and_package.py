"""The ``crossfuse`` command end to end, and what ``pip install .`` puts in site-packages."""
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from crossfuse_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic pairs and one-step checkpoints of both stages, made through the command line."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["synthetic", "--out", str(root / "pairs"), "--count", "2", "--height", "40", "--width", "48"]) == 0
    for modality in ("ir", "vis"):
        assert main(["train-autoencoder", "--synthetic", "2", "--synthetic-modality", modality, "--size", "32",
                     "--epochs", "1", "--max-steps", "1", "--out", str(root / modality)]) == 0
    assert main(["train-fusion", "--ir", str(root / "pairs" / "ir"), "--vis", str(root / "pairs" / "vis"),
                 "--size", "64", "--batch-size", "2", "--epochs", "1", "--max-steps", "1",
                 "--ir-autoencoder", str(root / "ir" / "autoencoder_epoch1.model"),
                 "--vis-autoencoder", str(root / "vis" / "autoencoder_epoch1.model"),
                 "--out", str(root / "fusion")]) == 0
    return root


def weights(root: Path) -> list[str]:
    return ["--ir-autoencoder", str(root / "ir" / "autoencoder_epoch1.model"),
            "--vis-autoencoder", str(root / "vis" / "autoencoder_epoch1.model"),
            "--fusion", str(root / "fusion" / "fusion_epoch1.model")]


def test_fuse_one_pair_and_refuse_to_overwrite(trained, capsys):
    out = trained / "fused.png"
    args = ["fuse", "--ir", str(trained / "pairs/ir/0000.png"), "--vis", str(trained / "pairs/vis/0000.png"),
            "--out", str(out), *weights(trained)]
    assert main(args) == 0
    fused = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert fused.shape == (40, 48) and fused.dtype == np.uint8
    before = out.read_bytes()
    assert main(args) == 2
    assert "fused.png exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_fuse_and_train_with_the_fast_backend(trained, fast_fusion_calls):
    calls = fast_fusion_calls
    pair = ["--ir", str(trained / "pairs/ir/0001.png"), "--vis", str(trained / "pairs/vis/0001.png")]
    for backend in ("reference", "fast"):
        out = trained / f"fused_{backend}.png"
        assert main(["fuse", *pair, "--out", str(out), "--backend", backend, *weights(trained)]) == 0
        assert len(calls) == (backend == "fast"), backend
    reference, fast = (cv2.imread(str(trained / f"fused_{b}.png"), cv2.IMREAD_UNCHANGED) for b in ("reference", "fast"))
    assert np.abs(fast.astype(int) - reference.astype(int)).max() <= 1
    assert main(["train-fusion", "--synthetic", "2", "--size", "64", "--batch-size", "2", "--epochs", "1",
                 "--max-steps", "1", "--backend", "fast", *weights(trained)[:4], "--out", str(trained / "fast")]) == 0
    assert (trained / "fast" / "fusion_epoch1.model").exists()
    assert len(calls) > 1, "train-fusion --backend fast trained without the fast fusion network"


def test_fast_backend_without_triton_is_one_clear_line(trained, monkeypatch, capsys):
    """Triton installs on Linux only; elsewhere ``--backend fast`` says so instead of a stack trace."""
    monkeypatch.setitem(sys.modules, "triton", None)  # ``import triton`` now fails
    out = trained / "fused_without_triton.png"
    pair = ["--ir", str(trained / "pairs/ir/0001.png"), "--vis", str(trained / "pairs/vis/0001.png")]
    assert main(["fuse", *pair, "--out", str(out), "--backend", "fast", *weights(trained)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "backend 'fast' needs Triton" in error and "'reference'" in error
    assert not out.exists()
    assert main(["train-fusion", "--synthetic", "2", "--size", "64", "--epochs", "1", "--backend", "fast",
                 *weights(trained)[:4], "--out", str(trained / "without_triton")]) == 2
    assert "needs Triton" in capsys.readouterr().err
    assert not list((trained / "without_triton").glob("*.model"))


def test_fuse_folders(trained):
    out = trained / "fused_folder"
    assert main(["fuse", "--ir", str(trained / "pairs/ir"), "--vis", str(trained / "pairs/vis"),
                 "--out", str(out), *weights(trained)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]


@pytest.mark.parametrize("change,message", [
    (lambda a, root: a[:a.index("--fusion")] + ["--fusion", str(root / "ir/autoencoder_epoch1.model")],
     "not a fusion network checkpoint"),
    (lambda a, root: a[:a.index("--fusion")], "give --checkpoint, or all three"),
    (lambda a, root: ["fuse", "--ir", "missing.png"] + a[3:], "missing.png: no such file"),
])
def test_fuse_errors_are_one_line(trained, capsys, change, message):
    args = ["fuse", "--ir", str(trained / "pairs/ir/0000.png"), "--vis", str(trained / "pairs/vis/0000.png"),
            "--out", str(trained / "never.png"), *weights(trained)]
    assert main(change(args, trained)) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (trained / "never.png").exists()


def test_train_needs_data(capsys):
    assert main(["train-autoencoder", "--out", "unused"]) == 2
    assert "give --images, or --synthetic N" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "crossfuse_fast.cli", "--help"], capture_output=True,
                            text=True, cwd=ROOT, check=False)
    assert result.returncode == 0 and "train-fusion" in result.stdout


def test_wheel_installs_subpackages_inside_namespace(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("crossfuse_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"crossfuse_fast"}
    for module in ("crossfuse_fast/reference/fusion.py", "crossfuse_fast/reference/__init__.py",
                   "crossfuse_fast/kernels/__init__.py", "crossfuse_fast/kernels/registry.py",
                   "crossfuse_fast/fast/__init__.py", "crossfuse_fast/fast/model.py", "crossfuse_fast/api.py"):
        assert module in names
