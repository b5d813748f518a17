"""A picture to compare fusion methods: per pair, the infrared and visible images and each method's
fused image side by side under their names, with an optional enlarged crop under each."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .evaluation import fused_file, score_triples

PANEL_HEIGHT = 240
"""Height in pixels of each image in the grid (widths keep the aspect ratio)."""
LABEL_HEIGHT = 28
GAP = 6


def _panel(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if image.shape[0] > height
                      else cv2.INTER_NEAREST)


def fit_panel(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` scaled to fit ``width x height``, aspect kept, centred on white."""
    scale = min(width / image.shape[1], height / image.shape[0])
    scaled = _panel(image, max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    box = np.full((height, width, 3), 255, np.uint8)
    top, left = (height - scaled.shape[0]) // 2, (width - scaled.shape[1]) // 2
    box[top:top + scaled.shape[0], left:left + scaled.shape[1]] = scaled
    return box


def label_band(text: str, width: int) -> np.ndarray:
    """``text`` centred in black on a white band ``width`` pixels wide."""
    band = np.full((LABEL_HEIGHT, width, 3), 255, np.uint8)
    scale = 0.55
    while scale > 0.3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 6:
        scale -= 0.05
    size = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0]
    cv2.putText(band, text, ((width - size[0]) // 2, (LABEL_HEIGHT + size[1]) // 2), cv2.FONT_HERSHEY_SIMPLEX,
                scale, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def _read_colour(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return image


def _check_crop(crop: tuple[int, int, int, int], shape: tuple[int, ...], path: Path) -> None:
    x, y, w, h = crop
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > shape[1] or y + h > shape[0]:
        raise ValueError(f"{path}: the crop {x},{y},{w},{h} (x,y,width,height) is not inside its "
                         f"{shape[1]} x {shape[0]} pixels")


def grid_rows(ir, vis, fused: list, pairs_csv=None, limit: int = 4) -> list[list[Path]]:
    """Per pair ``[ir, vis, fused of each method]``: files as given, or up to ``limit`` pairs of
    folders paired as ``crossfuse eval`` pairs them (a pair that some method lacks is left out)."""
    first, _ = score_triples(fused[0], ir, vis, pairs_csv)
    rows = []
    for _, ir_path, vis_path in first:
        methods = [fused_file(Path(folder), ir_path) if Path(folder).is_dir() else Path(folder) for folder in fused]
        if all(m is not None for m in methods):
            rows.append([ir_path, vis_path, *methods])
        if len(rows) == limit:
            break
    if not rows:
        raise ValueError("no pair has a fused image from every method")
    return rows


def compare_grid(rows: list[list[Path]], names: list[str],
                 crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The grid as a BGR image: a header of ``["infrared", "visible", *names]``, then per row its
    images (the pair named after its infrared image in the first one's corner) at
    :data:`PANEL_HEIGHT` (the first row's aspect sets the columns' width; other rows fit in it);
    with ``crop`` (x, y, width, height in the images' pixels) a
    box marks it on each image and the crop, enlarged, lies under each."""
    columns = ["infrared", "visible", *names]
    blocks = []
    width = None
    for paths in rows:
        images = [_read_colour(path) for path in paths]
        height, source_width = images[0].shape[:2]
        for path, image in zip(paths, images):
            if image.shape[:2] != (height, source_width):
                raise ValueError(f"{path}: {image.shape[1]} x {image.shape[0]} pixels, not "
                                 f"{source_width} x {height} as {paths[0]}")
            if crop:
                _check_crop(crop, image.shape, path)
        width = width or max(1, round(source_width * PANEL_HEIGHT / height))
        panels, crops = [], []
        for image in images:
            marked = image.copy()
            if crop:
                x, y, w, h = crop
                cv2.rectangle(marked, (x, y), (x + w - 1, y + h - 1), (0, 0, 255), max(1, height // 200))
                crops.append(_panel(image[y:y + h, x:x + w], width, max(1, round(width * h / w))))
            panels.append(fit_panel(marked, width, PANEL_HEIGHT))
        _name_pair(panels[0], paths[0].stem)
        blocks.append(gapped_row(panels))
        if crops:
            blocks.append(gapped_row(crops))
    header = gapped_row([label_band(name, width) for name in columns])
    body = [header]
    for block in blocks:
        body += [np.full((GAP, header.shape[1], 3), 255, np.uint8), block]
    return np.vstack(body)


def _name_pair(panel: np.ndarray, name: str) -> None:
    """The pair's name in the top-left corner of its first panel, black on white."""
    size, baseline = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    cv2.rectangle(panel, (0, 0), (size[0] + 6, size[1] + baseline + 6), (255, 255, 255), -1)
    cv2.putText(panel, name, (3, size[1] + 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)


def gapped_row(panels: list[np.ndarray]) -> np.ndarray:
    """Panels of one height side by side, white gaps between them."""
    gap = np.full((panels[0].shape[0], GAP, 3), 255, np.uint8)
    parts = []
    for panel in panels:
        parts += [panel, gap]
    return np.hstack(parts[:-1])
