"""Fusing an infrared and a visible video frame by frame into one video, written atomically."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from .files import write_atomically

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
"""Output containers by suffix and the FourCC written into each (codecs every OpenCV build with
FFmpeg encodes; the container is chosen by the suffix)."""
VIDEO_SUFFIXES = tuple(VIDEO_CODECS)
FRAME_RATE_TOLERANCE = 0.01
"""Relative difference of the inputs' frame rates beyond which their frames are not paired."""
DEFAULT_FRAMES_PER_BATCH = 8


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path``'s suffix is one of :data:`VIDEO_SUFFIXES`."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class _Video:
    """An opened input video: its frame rate, frame size and (possibly estimated) frame count."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        self.path = path
        self.capture = cv2.VideoCapture(str(path))
        if not self.capture.isOpened():
            raise ValueError(f"{path}: not a video OpenCV can read")
        self.fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.size = (int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self.frames = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))

    def read(self, count: int) -> list[np.ndarray]:
        frames = []
        while len(frames) < count:
            ok, frame = self.capture.read()
            if not ok:
                break
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.capture.release()


def fuse_video(ir_path: str | os.PathLike, vis_path: str | os.PathLike, out_path: str | os.PathLike,
               fuse_frames: Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]],
               frames_per_batch: int = DEFAULT_FRAMES_PER_BATCH, overwrite: bool = False,
               progress: Callable[[int | None], Callable[[int], None]] | None = None) -> int:
    """Fuse ``ir_path`` and ``vis_path`` frame by frame into ``out_path``; return the frames written.

    Frames pair in order, up to the shorter video; the output has the inputs' frame rate and
    frame size, in colour when the visible frames are (video frames read as BGR always are).
    ``fuse_frames(ir_frames, vis_frames)`` fuses a batch of up to ``frames_per_batch`` frames
    (``fuse`` on lists). The video is written to a temporary file beside ``out_path`` and renamed
    when complete, so an interrupted or failed run leaves no partial video; an existing
    ``out_path`` is refused unless ``overwrite``. ``progress(total)`` may return a callback told
    the frames done after each batch (``total`` is ``None`` where the container does not say).

    ``ValueError`` names the file where a video cannot be read, where the two differ in frame size
    or frame rate (by more than 1%), where either has no frame, or where ``out_path``'s suffix is
    not one of :data:`VIDEO_SUFFIXES`.
    """
    out_path = Path(out_path)
    codec = VIDEO_CODECS.get(out_path.suffix.lower())
    if codec is None:
        raise ValueError(f"{out_path}: a fused video needs a video suffix ({', '.join(VIDEO_SUFFIXES)})")
    ir, vis = _Video(Path(ir_path)), _Video(Path(vis_path))
    try:
        if ir.size != vis.size:
            raise ValueError(f"{ir.path} and {vis.path} differ in frame size: {ir.size[0]} x {ir.size[1]} and "
                             f"{vis.size[0]} x {vis.size[1]} (width x height)")
        if not (ir.fps > 0 and vis.fps > 0 and math.isfinite(ir.fps) and math.isfinite(vis.fps)):
            raise ValueError(f"{ir.path}, {vis.path}: a frame rate is unknown ({ir.fps:g} and {vis.fps:g} fps)")
        if abs(ir.fps - vis.fps) > FRAME_RATE_TOLERANCE * max(ir.fps, vis.fps):
            raise ValueError(f"{ir.path} runs at {ir.fps:g} fps and {vis.path} at {vis.fps:g} fps; their frames "
                             "do not pair (resample one first)")
        total = min(ir.frames, vis.frames) if ir.frames > 0 and vis.frames > 0 else None
        advance = progress(total) if progress else None
        written = 0

        def write(temporary: str) -> None:
            nonlocal written
            writer = cv2.VideoWriter(temporary, cv2.VideoWriter_fourcc(*codec), ir.fps, ir.size, True)
            if not writer.isOpened():
                raise ValueError(f"{out_path}: OpenCV cannot write {codec} video into {out_path.suffix}")
            try:
                while True:
                    ir_frames, vis_frames = ir.read(frames_per_batch), vis.read(frames_per_batch)
                    count = min(len(ir_frames), len(vis_frames))
                    if count == 0:
                        break
                    try:
                        fused = fuse_frames(ir_frames[:count], vis_frames[:count])
                    except ValueError as error:
                        raise ValueError(f"{ir.path}, {vis.path}, frames {written}-{written + count - 1}: "
                                         f"{error}") from error
                    for frame in fused:
                        writer.write(frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
                    written += count
                    if advance:
                        advance(count)
                    if count < frames_per_batch:
                        break
            finally:
                writer.release()
            if written == 0:
                raise ValueError(f"{ir.path}, {vis.path}: no frame to fuse")

        write_atomically(out_path, write, overwrite=overwrite, suffix=out_path.suffix)
        return written
    finally:
        ir.close()
        vis.close()
