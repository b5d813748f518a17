"""The authors' released weights by name: fetched on first use, verified, cached.

``released_files()`` returns the three files of the CrossFuse repository (the infrared and the
visible autoencoder, the fusion network), downloading any that is not in the cache folder yet.
Every file is checked against its git blob id (the SHA-1 of ``b"blob <size>\\0" + content``, what
``git`` itself names it by) before it is used; a download goes to a temporary file beside its
place and is moved there only once verified, so the cache never holds a partial or wrong file
under a released name. A cached file that does not match is reported and fetched again, never
loaded.

The cache folder is ``$CROSSFUSE_WEIGHTS_DIR``, else ``$XDG_CACHE_HOME/crossfuse-fast/weights``,
else ``~/.cache/crossfuse-fast/weights``. ``$CROSSFUSE_WEIGHTS_URL`` replaces the address the
files are fetched from (a mirror of the repository's ``models/`` tree).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import CheckpointError
from .files import write_atomically

RELEASE_URL = "https://github.com/hli1221/CrossFuse/raw/main/"
"""Where the authors publish their checkpoints (the repository's raw files)."""
CHUNK = 1 << 20


@dataclass(frozen=True)
class ReleasedFile:
    """One released checkpoint: which part of the model it is, its path in the authors' repository
    and its git blob id."""

    part: str
    path: str
    blob: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


RELEASED = (
    ReleasedFile("ir_autoencoder", "models/autoencoder/auto_encoder_epoch_4_ir.model",
                 "8c1cec7bc8ba4f484bd4b40b4e2134036b5228f9"),
    ReleasedFile("vis_autoencoder", "models/autoencoder/auto_encoder_epoch_4_vi.model",
                 "5564ae20d87026e41e1419f88722b4b3c11555ab"),
    ReleasedFile("fusion", "models/transfuse/fusetrans_epoch_32_bs_8_num_20k_lr_0.1_s1_c1.model",
                 "6e3afe223562a48e7f467f03081b2772fccbda63"),
)


class WeightsError(CheckpointError):
    """The released weights could not be fetched or verified; the message says how to place them by hand."""


def default_weights_dir() -> Path:
    """The cache folder: ``$CROSSFUSE_WEIGHTS_DIR``, else under ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    if os.environ.get("CROSSFUSE_WEIGHTS_DIR"):
        return Path(os.environ["CROSSFUSE_WEIGHTS_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "crossfuse-fast" / "weights"


def git_blob_id(path: str | os.PathLike) -> str:
    """The id git gives the file's content: SHA-1 of ``b"blob <size>\\0"`` and the bytes."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def released_files(directory: str | os.PathLike | None = None, *, files: Sequence[ReleasedFile] | None = None,
                   base_url: str | None = None, progress: bool = True,
                   log: Callable[[str], None] = _stderr) -> dict[str, Path]:
    """``{part: path}`` of the released checkpoints in ``directory`` (default :func:`default_weights_dir`),
    each verified by its git blob id; the missing or wrong ones are fetched from ``base_url``
    (default ``$CROSSFUSE_WEIGHTS_URL``, else :data:`RELEASE_URL`) first, with a progress bar.

    Raises :class:`WeightsError` naming the addresses, the folder and how to place the files by
    hand when a download fails or is not the released file. ``files`` defaults to :data:`RELEASED`.
    """
    files = RELEASED if files is None else files
    directory = Path(directory) if directory is not None else default_weights_dir()
    base_url = base_url or os.environ.get("CROSSFUSE_WEIGHTS_URL") or RELEASE_URL
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    paths = {}
    for released in files:
        path = directory / released.name
        if path.is_file():
            found = git_blob_id(path)
            if found == released.blob:
                paths[released.part] = path
                continue
            log(f"{path}: not the released file (git blob {found}, expected {released.blob}); fetching it again")
        try:
            write_atomically(path, lambda temporary, released=released: _download(
                base_url + released.path, temporary, released, progress), overwrite=True)
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as error:
            raise WeightsError(_by_hand(error, files, base_url, directory)) from error
        paths[released.part] = path
    return paths


def _download(url: str, target: str, released: ReleasedFile, progress: bool) -> None:
    """``url`` into ``target``; raises ``ValueError`` if what arrived is not ``released``."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as handle:
        size = response.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, desc=released.name,
                  disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                handle.write(chunk)
                bar.update(len(chunk))
    found = git_blob_id(target)
    if found != released.blob:
        raise ValueError(f"{url} sent a file that is not the released {released.name} "
                         f"(git blob {found}, expected {released.blob})")


def _by_hand(error: Exception, files: Sequence[ReleasedFile], base_url: str, directory: Path) -> str:
    reason = getattr(error, "reason", None) or error
    return (f"could not fetch the released CrossFuse weights ({reason}); download "
            f"{', '.join(base_url + f.path for f in files)} by hand and put them in {directory} under those "
            "names (or point --weights / CrossFuse.from_dir at the folder that holds them)")
