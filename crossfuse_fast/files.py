"""Writing files so that no run loses one: a temporary file beside the target, renamed into place.

A crash, a full disk or a SIGTERM (the command line turns it into an orderly exit) leaves either
the old file or the new one, never half of one, and no temporary behind. Files get the user's
usual permissions (the umask), not the temporary file's 0600.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False,
                     suffix: str = "") -> Path:
    """Call ``write(temporary_path)``, then move the result to ``path``.

    Refuses to replace an existing ``path`` unless ``overwrite``; a failure leaves nothing behind.
    The temporary's name ends in ``.tmp`` and ``suffix`` (for writers that choose a format by it).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_image(path: str | os.PathLike, image, overwrite: bool = False) -> Path:
    """``cv2.imwrite`` through :func:`write_atomically`: encoded in memory for ``path``'s suffix,
    written to a temporary file and renamed. ``ValueError`` where OpenCV cannot encode it."""
    import cv2

    path = Path(path)
    encoded, data = cv2.imencode(path.suffix, image)
    if not encoded:
        raise ValueError(f"{path}: OpenCV cannot write this image as {path.suffix}")

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data.tobytes())
    return write_atomically(path, write, overwrite=overwrite)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """``text`` (UTF-8) to ``path`` through :func:`write_atomically`."""
    def write(temporary: str) -> None:
        Path(temporary).write_text(text, encoding="utf-8")
    return write_atomically(path, write, overwrite=overwrite)
