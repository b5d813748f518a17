"""``crossfuse fuse`` on two videos: frame by frame at the inputs' frame rate up to the shorter
one, in batches, written atomically; and ``fuse()`` on lists of images, which the videos use."""
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import weights

from crossfuse_fast import fuse
from crossfuse_fast.synthetic import synthetic_pair
from crossfuse_fast.video import fuse_video

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH, FPS = 40, 48, 12.0


def _write_video(path: Path, frames: list[np.ndarray], fps: float = FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frames[0].shape[1], frames[0].shape[0]))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def _read_video(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """An infrared video of 7 frames and a colour visible one of 10, both 12 fps."""
    root = tmp_path_factory.mktemp("videos")
    pairs = [synthetic_pair(HEIGHT, WIDTH, seed=seed) for seed in range(10)]
    ir = _write_video(root / "ir.avi", [ir for ir, _ in pairs[:7]])
    vis = _write_video(root / "vis.avi", [cv2.applyColorMap(vis, cv2.COLORMAP_JET) for _, vis in pairs])
    return ir, vis


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_lists_fuse_as_one_batch_each_as_alone(model):
    pairs = [synthetic_pair(HEIGHT, WIDTH, seed=seed) for seed in range(3)]
    irs = [ir for ir, _ in pairs]
    viss = [cv2.applyColorMap(vis, cv2.COLORMAP_JET) if i == 1 else vis for i, (_, vis) in enumerate(pairs)]
    together = fuse(irs, viss, model=model, backend="reference")
    assert [f.shape for f in together] == [(HEIGHT, WIDTH), (HEIGHT, WIDTH, 3), (HEIGHT, WIDTH)]
    for ir, vis, got in zip(irs, viss, together):
        assert np.array_equal(got, fuse(ir, vis, model=model, backend="reference"))
    with pytest.raises(ValueError, match="must share a size"):
        fuse(irs + [irs[0][:32]], viss + [viss[0][:32]], model=model, backend="reference")
    with pytest.raises(ValueError, match="as many images"):
        fuse(irs, viss[:2], model=model, backend="reference")


def test_a_video_fuses_frame_by_frame_in_batches(model, videos, tmp_path):
    """Up to the shorter video (7 frames), at its frame rate and size, in colour; the batches are
    4 and 3 frames; each written frame is the fused frame up to the codec's loss."""
    ir, vis = videos
    batches, fused_frames, done = [], [], []

    def fuse_frames(ir_frames, vis_frames):
        batches.append(len(ir_frames))
        fused = fuse(ir_frames, vis_frames, model=model, backend="reference")
        fused_frames.extend(fused)
        return fused

    out = tmp_path / "fused.avi"
    assert fuse_video(ir, vis, out, fuse_frames, frames_per_batch=4,
                      progress=lambda total: done.append(total) or done.append) == 7
    assert batches == [4, 3] and done == [7, 4, 3]
    written, fps = _read_video(out)
    assert len(written) == 7 and fps == FPS and written[0].shape == (HEIGHT, WIDTH, 3)
    assert min(_psnr(a, b) for a, b in zip(written, fused_frames)) > 25
    assert _psnr(written[0], fused_frames[1]) < min(_psnr(a, b) for a, b in zip(written, fused_frames))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.avi"]


def test_a_failing_video_leaves_nothing(model, videos, tmp_path):
    ir, vis = videos
    calls = []

    def fails_second_batch(ir_frames, vis_frames):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("broken frame")
        return fuse(ir_frames, vis_frames, model=model, backend="reference")

    with pytest.raises(ValueError, match=r"ir.avi, .*vis.avi, frames 2-3: broken frame"):
        fuse_video(ir, vis, tmp_path / "fused.mp4", fails_second_batch, frames_per_batch=2)
    assert list(tmp_path.iterdir()) == []


def test_the_command_fuses_videos_through_the_entry_point(trained, videos, tmp_path):
    ir, vis = (shutil.copy(path, tmp_path / path.name) for path in videos)
    out = tmp_path / "fused.mp4"
    command = [shutil.which("crossfuse") or sys.executable, "fuse", "--ir", str(ir), "--vis", str(vis),
               *weights(trained), "--backend", "reference", "--frames-per-batch", "3"]
    run = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "7 frames fused" in run.stderr
    frames, fps = _read_video(out)
    assert len(frames) == 7 and fps == FPS
    again = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "1 skipped" in again.stderr
    other_rate = _write_video(tmp_path / "fast.avi", _read_video(Path(vis))[0], fps=25.0)
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), frames[0])
    for argv, message in (
        (["--out", str(ir), "--overwrite"], "is an input"),
        (["--out", str(tmp_path / "fused.png")], "needs a video suffix"),
        (["--vis", str(other_rate), "--out", str(tmp_path / "x.mp4")], "runs at 12 fps and"),
        (["--vis", str(image), "--out", str(tmp_path / "y.mp4")], "give two videos"),
        (["--vis", str(tmp_path / "missing.avi"), "--out", str(tmp_path / "z.mp4")], "missing.avi: no such file"),
    ):
        result = subprocess.run([*command, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 2, (argv, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (argv, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.avi", "frame.png", "fused.mp4", "ir.avi", "vis.avi"]
