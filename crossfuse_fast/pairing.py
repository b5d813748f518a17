"""Which infrared image goes with which visible one: two folders paired by name, or a CSV of pairs.

Names pair when their stems are equal (``0001.png`` with ``0001.jpg``; KAIST's ``lwir/I00123.jpg``
with ``visible/I00123.jpg``), or, TNO-style, when they are equal once an ``IR`` / ``VIS`` prefix is
taken off (``IR12.png`` with ``VIS12.png``, ``ir_3.bmp`` with ``vis_3.bmp``). Nothing is dropped
or chosen silently: files without a partner and names that two files of one folder share
(``0001.png`` and ``0001.jpg``) are listed in the :class:`Pairing`, for the caller to report.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MODALITY_PREFIX = re.compile(r"^(ir|vis|lwir|visible)[_\-. ]?", re.IGNORECASE)


@dataclass
class Pairing:
    """``pairs`` as ``(ir, vis)`` paths in name order, and what could not be paired."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unpaired: list[Path] = field(default_factory=list)
    ambiguous: list[list[Path]] = field(default_factory=list)

    def problems(self) -> list[str]:
        """One line per file left out, saying why."""
        lines = [f"{path}: no partner in the other folder" for path in self.unpaired]
        lines += [f"{', '.join(map(str, paths))}: one name, several files; none of them is used"
                  for paths in self.ambiguous]
        return lines


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; ``ValueError`` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _by_key(files: list[Path], key) -> tuple[dict[str, Path], list[list[Path]]]:
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(key(path), []).append(path)
    return ({name: paths[0] for name, paths in groups.items() if len(paths) == 1},
            [paths for paths in groups.values() if len(paths) > 1])


def _stem(path: Path) -> str:
    return path.stem


def without_modality(path: Path) -> str:
    """A file's pairing name without its modality: the stem, lower case, less a TNO-style ``IR`` /
    ``VIS`` prefix (``IR12.png`` and ``VIS12.png`` both give ``12``)."""
    return _MODALITY_PREFIX.sub("", path.stem).lower()


def pair_folders(ir_folder: str | os.PathLike, vis_folder: str | os.PathLike) -> Pairing:
    """Pair the images of two folders by stem, or TNO-style by the stem without its ``IR`` / ``VIS``
    prefix where the stems themselves share nothing; ``ValueError`` if no pair can be made."""
    ir_files, vis_files = list_images(ir_folder), list_images(vis_folder)
    for key in (_stem, without_modality):
        ir, ir_ambiguous = _by_key(ir_files, key)
        vis, vis_ambiguous = _by_key(vis_files, key)
        names = sorted(ir.keys() & vis.keys())
        if names:
            paired = {path for name in names for path in (ir[name], vis[name])}
            ambiguous = ir_ambiguous + vis_ambiguous
            grouped = {path for paths in ambiguous for path in paths}
            unpaired = [p for p in ir_files + vis_files if p not in paired and p not in grouped]
            return Pairing([(ir[name], vis[name]) for name in names], unpaired, ambiguous)
    raise ValueError(f"{ir_folder} and {vis_folder} share no file names (nor IRn / VISn ones), so no pairs "
                     "can be made; name the pairs in a CSV (--pairs)")


def read_pairs_csv(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """The ``ir,vis`` rows of a CSV file (a header row ``ir,vis`` first); relative paths are taken
    from the CSV's folder. ``ValueError`` naming the file and the row for a malformed one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a CSV of ir,vis pairs)")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [cell.strip().lower() for cell in rows[0]] != ["ir", "vis"]:
        raise ValueError(f"{path}: the first row must be the header ir,vis")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{number}: expected two columns, ir and vis, got {len(row)}")
        pairs.append(tuple(path.parent / cell.strip() for cell in row))
    if not pairs:
        raise ValueError(f"{path}: no pairs after the header")
    return pairs
