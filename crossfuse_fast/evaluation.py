"""Scoring fused images against their sources: the pairs of ``crossfuse fuse``, one row of metrics
per image, the mean, and the table as Markdown, CSV, JSON or an HTML page with the images."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .metrics import evaluate, metric_names
from .metrics._images import check_convention
from .pairing import IMAGE_SUFFIXES, list_images, pair_folders, read_pairs_csv, without_modality

FORMATS = ("markdown", "csv", "json")


@dataclass
class Scores:
    """One row per scored image (``names[i]``, ``rows[i][metric]``), under ``convention``."""

    convention: str
    metrics: list[str]
    names: list[str] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    images: list[tuple[Path, Path, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def mean(self) -> dict[str, float]:
        """The mean of each metric over the rows (NaN where there are none)."""
        return {name: float(np.mean([row[name] for row in self.rows])) if self.rows else math.nan
                for name in self.metrics}


def read_grey(path: Path) -> np.ndarray:
    """An 8-bit image file as float64 grey levels 0..255, colour through OpenCV's BGR -> grey.
    ``ValueError`` naming the file if it cannot be read or is not 8-bit."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: a {image.dtype} image; the metrics are defined on 8-bit grey levels, so convert "
                         "it to 8 bits first (as the fused image would be saved)")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image.reshape(image.shape[:2]).astype(np.float64)


def fused_file(fused: Path, ir: Path) -> Path | None:
    """The fused image of the pair whose infrared image is ``ir``: same stem as ``ir`` (as
    ``crossfuse fuse`` names it), else the same name once an ``IR``/``VIS`` prefix is taken off."""
    candidates = [fused / f"{ir.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    found = [path for path in candidates if path.is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        key = without_modality(ir)
        found = [path for path in list_images(fused) if without_modality(path) == key]
        if len(found) == 1:
            return found[0]
    return None


def score_triples(fused, ir, vis, pairs_csv: str | os.PathLike | None = None) -> tuple[list[tuple[Path, Path, Path]], list[str]]:
    """``(fused, ir, vis)`` files to score and one line per file left out. ``fused``, ``ir`` and
    ``vis`` are three files, or three folders paired as ``crossfuse fuse`` pairs them (or the
    pairs of ``pairs_csv`` with the folder ``fused``)."""
    fused = Path(fused)
    if pairs_csv is not None:
        pairs, problems = read_pairs_csv(pairs_csv), []
    else:
        ir, vis = Path(ir), Path(vis)
        if not (fused.is_dir() == ir.is_dir() == vis.is_dir()):
            raise ValueError(f"{fused}, {ir}, {vis}: give three folders or three files")
        if not fused.is_dir():
            for path in (fused, ir, vis):
                if not path.is_file():
                    raise ValueError(f"{path}: no such file or folder")
            return [(fused, ir, vis)], []
        pairing = pair_folders(ir, vis)
        pairs, problems = pairing.pairs, pairing.problems()
    if not fused.is_dir():
        raise ValueError(f"{fused}: not a folder of fused images")
    triples = []
    for ir_path, vis_path in pairs:
        fused_path = fused_file(fused, ir_path)
        if fused_path is None:
            problems.append(f"{ir_path}, {vis_path}: no fused image named {ir_path.stem} in {fused}")
        else:
            triples.append((fused_path, ir_path, vis_path))
    if not triples:
        raise ValueError(f"{fused}: no fused image matches a pair")
    return triples, problems


def score(triples: Sequence[tuple[Path, Path, Path]], convention: str = "standard",
          metrics: str | Sequence[str] | None = None, progress: Callable | None = None) -> Scores:
    """Every metric of ``metrics`` on each ``(fused, ir, vis)`` triple; a triple that cannot be
    read or whose images differ in size is reported in ``Scores.problems`` and left out.
    ``progress`` wraps the iteration (``tqdm``)."""
    check_convention(convention)
    scores = Scores(convention, metric_names(metrics))
    for fused_path, ir_path, vis_path in (progress(triples) if progress else triples):
        try:
            fused, ir, vis = (read_grey(path) for path in (fused_path, ir_path, vis_path))
            if not fused.shape == ir.shape == vis.shape:
                raise ValueError(f"sizes differ: {fused.shape}, {ir.shape}, {vis.shape}")
            values = evaluate(fused, ir, vis, convention, scores.metrics)
        except (ValueError, NotImplementedError) as error:
            scores.problems.append(f"{fused_path} ({ir_path}, {vis_path}): {error}")
            continue
        scores.names.append(fused_path.stem)
        scores.rows.append({name: float(value[0]) for name, value in values.items()})
        scores.images.append((fused_path, ir_path, vis_path))
    return scores


def _number(value: float) -> str:
    return f"{value:.4f}"


def as_markdown(scores: Scores) -> str:
    lines = [f"Convention: `{scores.convention}`", "",
             "| image | " + " | ".join(scores.metrics) + " |", "|---" * (len(scores.metrics) + 1) + "|"]
    for name, row in [*zip(scores.names, scores.rows), ("mean", scores.mean())]:
        lines.append(f"| {name} | " + " | ".join(_number(row[m]) for m in scores.metrics) + " |")
    return "\n".join(lines) + "\n"


def as_csv(scores: Scores) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", *scores.metrics, "convention"])
    for name, row in [*zip(scores.names, scores.rows), ("mean", scores.mean())]:
        writer.writerow([name, *(repr(row[m]) for m in scores.metrics), scores.convention])
    return out.getvalue()


def as_json(scores: Scores) -> str:
    return json.dumps({"convention": scores.convention, "metrics": scores.metrics,
                       "rows": [{"image": name, **row} for name, row in zip(scores.names, scores.rows)],
                       "mean": scores.mean()}, indent=2) + "\n"


FORMATTERS = {"markdown": as_markdown, "csv": as_csv, "json": as_json}


def _thumbnail(path: Path, height: int = 160) -> str:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    scale = height / image.shape[0]
    image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


def as_html(scores: Scores) -> str:
    """One self-contained page: per image its infrared, visible and fused images beside its
    metrics, then the mean."""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in scores.metrics)
    body = []
    for name, row, (fused, ir, vis) in zip(scores.names, scores.rows, scores.images):
        pictures = "".join(f'<td><img alt="{label}" src="data:image/png;base64,{_thumbnail(path)}"></td>'
                           for label, path in (("infrared", ir), ("visible", vis), ("fused", fused)))
        cells = "".join(f"<td>{_number(row[m])}</td>" for m in scores.metrics)
        body.append(f"<tr><td>{html.escape(name)}</td>{pictures}{cells}</tr>")
    mean = "".join(f"<td><b>{_number(v)}</b></td>" for v in scores.mean().values())
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Fusion metrics ({scores.convention})</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 8px;text-align:center}"
            "img{height:160px}</style></head><body>"
            f"<h1>Fusion metrics</h1><p>Convention: <code>{html.escape(scores.convention)}</code>; "
            f"{len(scores.rows)} images.</p><table><tr><th>image</th><th>infrared</th><th>visible</th>"
            f"<th>fused</th>{head}</tr>{''.join(body)}<tr><td><b>mean</b></td><td></td><td></td><td></td>{mean}</tr>"
            "</table></body></html>\n")
