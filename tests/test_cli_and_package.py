"""The ``crossfuse`` command end to end, and what ``pip install .`` puts in site-packages."""
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import Server, blob_id, weights

from crossfuse_fast import weights as weights_module
from crossfuse_fast.cli import main
from crossfuse_fast.weights import ReleasedFile

ROOT = Path(__file__).resolve().parents[1]


def test_fuse_one_pair_and_skip_an_existing_output(trained, capsys):
    """An existing output is kept and said to be (exit 0: a resumed run is not a failure);
    ``--overwrite`` replaces it."""
    out = trained / "fused.png"
    args = ["fuse", "--ir", str(trained / "pairs/ir/0000.png"), "--vis", str(trained / "pairs/vis/0000.png"),
            "--out", str(out), *weights(trained)]
    assert main(args) == 0
    fused = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert fused.shape == (40, 48) and fused.dtype == np.uint8
    out.write_bytes(b"kept")
    capsys.readouterr()
    assert main(args) == 0
    assert "0 fused, 1 skipped (their outputs exist; --overwrite to redo them)" in capsys.readouterr().err
    assert out.read_bytes() == b"kept"
    assert main([*args, "--overwrite"]) == 0
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), fused)


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
    (lambda a, root: a[:a.index("--fusion")], "give all three of --ir-autoencoder, --vis-autoencoder and --fusion"),
    (lambda a, root: a + ["--weights", str(root)], "give one source of weights"),
    (lambda a, root: a[:7] + ["--weights", str(root)], "auto_encoder_epoch_4_ir.model: missing; the folder must hold"),
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
    assert main(["train-autoencoder", "--synthetic", "2", "--out", "unused"]) == 2
    assert "give --synthetic-modality ir or vis with --synthetic" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--epochs", "--max-steps", "--batch-size", "--synthetic"])
def test_counts_below_one_are_refused(capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["train-autoencoder", "--synthetic", "2", "--synthetic-modality", "ir", "--out", "unused", option, "0"])
    assert exit_.value.code == 2
    assert f"{option}: must be a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == "crossfuse 0.1.0"
    for command in ("fuse", "train-autoencoder", "train-fusion", "synthetic"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and "(default: None)" not in text
    assert "(default: 4)" in text or command == "synthetic"


def _released_like(root: Path) -> tuple[list[ReleasedFile], dict[str, bytes]]:
    """A manifest and the files to serve: the trained checkpoints under the released paths."""
    sources = [root / "ir" / "autoencoder_epoch1.model", root / "vis" / "autoencoder_epoch1.model",
               root / "fusion" / "fusion_epoch1.model"]
    return [ReleasedFile(f.part, f.path, blob_id(source.read_bytes()))
            for f, source in zip(weights_module.RELEASED, sources)], {
        f.path: source.read_bytes() for f, source in zip(weights_module.RELEASED, sources)}


def test_fuse_on_the_released_weights_fetches_them_once(trained, monkeypatch, tmp_path, capsys):
    """The README's main command, with no weights named: the released files come from the (here:
    local) server into the cache folder, and a second run asks nothing."""
    manifest, payloads = _released_like(trained)
    server = Server(payloads)
    try:
        monkeypatch.setattr(weights_module, "RELEASED", tuple(manifest))
        monkeypatch.setenv("CROSSFUSE_WEIGHTS_URL", server.url)
        pair = ["--ir", str(trained / "pairs/ir/0000.png"), "--vis", str(trained / "pairs/vis/0000.png")]
        cache = tmp_path / "cache"
        assert main(["fuse", *pair, "--out", str(tmp_path / "a.png"), "--weights-dir", str(cache)]) == 0
        assert len(server.requests) == 3 and sorted(p.name for p in cache.iterdir()) == sorted(f.name for f in manifest)
        assert main(["fuse", *pair, "--out", str(tmp_path / "b.png"), "--weights-dir", str(cache)]) == 0
        assert len(server.requests) == 3
        named = ["--ir-autoencoder", str(cache / manifest[0].name), "--vis-autoencoder", str(cache / manifest[1].name),
                 "--fusion", str(cache / manifest[2].name)]
        assert main(["fuse", *pair, "--out", str(tmp_path / "c.png"), *named]) == 0
        assert main(["fuse", *pair, "--out", str(tmp_path / "d.png"), "--weights", str(cache)]) == 0
        images = [cv2.imread(str(tmp_path / f"{name}.png"), cv2.IMREAD_UNCHANGED) for name in "abcd"]
        assert all(np.array_equal(images[0], image) for image in images[1:])
        server.close()
        capsys.readouterr()
        assert main(["fuse", *pair, "--out", str(tmp_path / "e.png"), "--weights-dir", str(tmp_path / "empty")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "could not fetch the released CrossFuse weights" in error
        assert "by hand" in error and str(tmp_path / "empty") in error
    finally:
        server.close()


def test_auto_backend_without_triton_is_the_reference_with_a_notice(trained, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "triton", None)  # ``import triton`` now fails
    pair = ["--ir", str(trained / "pairs/ir/0000.png"), "--vis", str(trained / "pairs/vis/0000.png")]
    assert main(["fuse", *pair, "--out", str(tmp_path / "auto.png"), *weights(trained)]) == 0
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Triton is not installed, so the reference model runs" in error
    assert main(["fuse", *pair, "--out", str(tmp_path / "reference.png"), "--backend", "reference",
                 *weights(trained)]) == 0
    assert np.array_equal(cv2.imread(str(tmp_path / "auto.png")), cv2.imread(str(tmp_path / "reference.png")))


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
                   "crossfuse_fast/fast/__init__.py", "crossfuse_fast/fast/model.py", "crossfuse_fast/api.py",
                   "crossfuse_fast/metrics/__init__.py", "crossfuse_fast/metrics/vif.py", "crossfuse_fast/video.py"):
        assert module in names
