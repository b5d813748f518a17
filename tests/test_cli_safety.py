"""``crossfuse fuse`` never loses a file: inputs are never outputs, outputs are written atomically,
a folder job tries every pair and resumes, pairing leaves nothing out silently, and every user
error is one line (issue 15's findings, each as a test; the CLI matters through the installed
entry point)."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import weights

from crossfuse_fast import CrossFuse
from crossfuse_fast.cli import main
from crossfuse_fast.files import write_image

ROOT = Path(__file__).resolve().parents[1]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def folders(trained, tmp_path):
    """A copy of the synthetic pairs (two folders of two pairs each) to spoil at will."""
    ir, vis = tmp_path / "ir", tmp_path / "vis"
    shutil.copytree(trained / "pairs" / "ir", ir)
    shutil.copytree(trained / "pairs" / "vis", vis)
    return ir, vis


def test_an_input_is_never_an_output(trained, folders, capsys):
    ir, vis = folders
    before = {path: md5(path) for folder in folders for path in folder.iterdir()}
    one = ["--ir", str(ir / "0000.png"), "--vis", str(vis / "0000.png")]
    assert main(["fuse", *one, "--out", str(ir / "0000.png"), "--overwrite", *weights(trained)]) == 2
    assert "is an input" in capsys.readouterr().err
    assert main(["fuse", "--ir", str(ir), "--vis", str(vis), "--out", str(ir), "--overwrite", *weights(trained)]) == 2
    assert "is an input folder" in capsys.readouterr().err
    assert {path: md5(path) for folder in folders for path in folder.iterdir()} == before


def test_an_image_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails (a full disk) leaves the old output as it was and no temporary behind; a
    new file gets the umask's permissions, not the temporary's 0600."""
    target = tmp_path / "fused.png"
    image = np.full((8, 8), 7, np.uint8)
    write_image(target, image)
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    old = target.read_bytes()

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_image(target, np.zeros((8, 8), np.uint8), overwrite=True)
    assert target.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["fused.png"]


def test_a_folder_job_tries_every_pair_and_resumes(trained, folders, tmp_path, capsys):
    ir, vis = folders
    for name in ("0002", "0003", "0004", "0005"):
        shutil.copy(ir / "0000.png", ir / f"{name}.png")
        shutil.copy(vis / "0000.png", vis / f"{name}.png")
    (ir / "0001.png").write_bytes((ir / "0001.png").read_bytes()[:200])        # truncated
    (vis / "0002.png").write_text("not an image\n")                            # a text file named .png
    cv2.imwrite(str(vis / "0003.png"), np.zeros((20, 30), np.uint8))           # another size
    cv2.imwrite(str(ir / "0004.png"), np.zeros((40, 48, 4), np.uint8))         # BGRA
    out = tmp_path / "out"
    args = ["fuse", "--ir", str(ir), "--vis", str(vis), "--out", str(out), *weights(trained)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0005.png"]
    for name, reason in (("0001", "not a readable image"), ("0002", "not a readable image"),
                         ("0003", "differ in size"), ("0004", "must be [H, W]")):
        line = next(line for line in error.splitlines() if f"ir/{name}.png, " in line)
        assert line.startswith("crossfuse fuse: failed: ") and f"vis/{name}.png" in line and reason in line
    assert "2 fused, 0 skipped (their outputs exist; --overwrite to redo them), 4 failed" in error
    cv2.imwrite(str(vis / "0003.png"), cv2.imread(str(vis / "0000.png"), cv2.IMREAD_UNCHANGED))
    before = md5(out / "0000.png")
    assert main(args) == 2  # the same command again: only what is missing, 0003 now fuses
    assert "1 fused, 2 skipped" in capsys.readouterr().err
    assert md5(out / "0000.png") == before and (out / "0003.png").exists()


def test_pairing_lists_what_it_leaves_out(trained, tmp_path, capsys):
    ir, vis = tmp_path / "ir", tmp_path / "vis"
    ir.mkdir(), vis.mkdir()
    source = cv2.imread(str(trained / "pairs" / "ir" / "0000.png"), cv2.IMREAD_UNCHANGED)
    for folder, names in ((ir, ("a.png", "b.png", "b.jpg", "lonely.png")), (vis, ("a.png", "b.png"))):
        for name in names:
            cv2.imwrite(str(folder / name), source)
    out = tmp_path / "out"
    assert main(["fuse", "--ir", str(ir), "--vis", str(vis), "--out", str(out), *weights(trained)]) == 0
    error = capsys.readouterr().err
    assert f"{ir / 'lonely.png'}: no partner" in error
    assert "b.jpg" in error and "one name, several files; none of them is used" in error
    assert f"{vis / 'b.png'}: no partner" in error
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_tno_names_and_a_csv_of_pairs(trained, tmp_path, capsys):
    ir, vis = tmp_path / "tno_ir", tmp_path / "tno_vis"
    ir.mkdir(), vis.mkdir()
    for index in (1, 2):
        shutil.copy(trained / "pairs" / "ir" / "0000.png", ir / f"IR{index}.png")
        shutil.copy(trained / "pairs" / "vis" / "0000.png", vis / f"VIS{index}.png")
    assert main(["fuse", "--ir", str(ir), "--vis", str(vis), "--out", str(tmp_path / "tno"), *weights(trained)]) == 0
    assert sorted(p.name for p in (tmp_path / "tno").iterdir()) == ["IR1.png", "IR2.png"]
    csv = tmp_path / "pairs.csv"
    csv.write_text("ir,vis\ntno_ir/IR2.png,tno_vis/VIS1.png\n")
    assert main(["fuse", "--pairs", str(csv), "--out", str(tmp_path / "csv"), *weights(trained)]) == 0
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["IR2.png"]
    csv.write_text("ir;vis\n")
    capsys.readouterr()
    assert main(["fuse", "--pairs", str(csv), "--out", str(tmp_path / "bad"), *weights(trained)]) == 2
    assert "the first row must be the header ir,vis" in capsys.readouterr().err


def test_every_user_error_is_one_line_through_the_entry_point(trained, tmp_path):
    pair = ["--ir", str(trained / "pairs/ir/0000.png"), "--vis", str(trained / "pairs/vis/0000.png")]
    folders = ["--ir", str(trained / "pairs/ir"), "--vis", str(trained / "pairs/vis")]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["fuse", *pair, "--out", str(tmp_path / "x.png"), "--device", "bogus", *weights(trained)],
         "--device 'bogus': not a torch device"),
        (["fuse", *pair, "--out", str(tmp_path / "x.png"), "--device", "cuda:7", *weights(trained)],
         "--device cuda:7: no such CUDA device here"),
        (["fuse", *folders, "--out", str(blocker), *weights(trained)], "exists and is not a folder"),
        (["fuse", *pair, "--out", str(blocker / "sub" / "x.png"), *weights(trained)], "failed: "),
        (["fuse", *pair, "--out", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path)], "a folder (expected"),
        (["fuse", *pair, "--out", str(tmp_path / "x.png"), "--tile", "12", *weights(trained)],
         "--tile: must be a multiple of 8 pixels, or 0 for never, got '12'"),
        (["train-autoencoder", "--synthetic", "2", "--synthetic-modality", "ir", "--size", "7", "--out",
          str(tmp_path / "t")], "must be at least 8"),
        (["train-fusion", "--synthetic", "2", "--size", "72", "--out", str(tmp_path / "t"), "--ir-autoencoder",
          str(trained / "ir" / "autoencoder_epoch1.model"), "--vis-autoencoder",
          str(trained / "vis" / "autoencoder_epoch1.model")], "must be a multiple of 16"),
    ]
    for argv, message in cases:
        result = subprocess.run([shutil.which("crossfuse") or sys.executable, *argv], capture_output=True, text=True,
                                cwd=ROOT, timeout=300)
        assert result.returncode == 2, (argv, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (argv, result.stderr)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("crossfuse fuse: 0 fused")]
        assert len(lines) == 1 or "failed: " in message, result.stderr


def test_load_names_what_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="a folder"):
        CrossFuse.load(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        CrossFuse.load(fifo)


def test_sigterm_during_a_write_leaves_no_temporary(tmp_path, monkeypatch):
    """SIGTERM while a file is being written (a training checkpoint, an image) ends the command in
    order: the temporary file is removed and the target is not created."""
    import signal

    from crossfuse_fast import cli
    from crossfuse_fast.files import write_atomically
    target = tmp_path / "checkpoint.model"

    def interrupted_save(args):
        def write(temporary):
            Path(temporary).write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
        write_atomically(target, write)
    monkeypatch.setattr(cli, "_command_synthetic", interrupted_save)  # what the parser binds to the command
    with pytest.raises(SystemExit) as exit_:
        main(["synthetic", "--out", str(tmp_path / "unused")])
    assert exit_.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not cli._terminate  # the handler is put back
