"""Pictures of a training run: its loss curves and, per epoch, samples of what the model makes.

Drawn with OpenCV (no plotting library needed at run time) and written atomically.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np

from .compare import fit_panel, gapped_row, label_band
from .files import write_image

PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 720, 170, 42
SAMPLE_SIDE = 160


def plot_losses(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """One panel per column of a ``<stage>_losses.csv`` (the loss, then each term), against the
    step over the whole run; epochs are marked by grey lines, each panel says its range. A column
    whose positive values span more than a factor of 10 is drawn on a log scale (the panel says so),
    so that the late, slow part of the curve is not flattened by the first steps."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    columns, data = rows[0][2:], np.array([[float(v) for v in r] for r in rows[1:]])
    epochs = data[:, 0].astype(int)
    panels = []
    for index, name in enumerate(columns):
        values = data[:, 2 + index]
        panel = np.full((PANEL_HEIGHT, PANEL_WIDTH, 3), 255, np.uint8)
        left, right, top, bottom = MARGIN + 30, PANEL_WIDTH - 12, 26, PANEL_HEIGHT - 22
        cv2.rectangle(panel, (left, top), (right, bottom), (0, 0, 0), 1)
        count = len(values)
        xs = left + (np.arange(count) / max(count - 1, 1)) * (right - left)
        for boundary in np.nonzero(np.diff(epochs))[0]:
            x = int(round((xs[boundary] + xs[boundary + 1]) / 2))
            cv2.line(panel, (x, top + 1), (x, bottom - 1), (200, 200, 200), 1)
        low, high = float(values.min()), float(values.max())
        heights, logarithmic = curve_heights(values)
        ys = bottom - heights * (bottom - top)
        points = np.stack([xs, ys], 1).round().astype(np.int32)
        cv2.polylines(panel, [points], False, (180, 90, 0), 1, cv2.LINE_AA)
        text = cv2.FONT_HERSHEY_SIMPLEX
        title = f"{name} (last {values[-1]:.4g})" + (", log scale" if logarithmic else "")
        cv2.putText(panel, title, (left, 18), text, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(panel, f"{high:.4g}", (4, top + 10), text, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(panel, f"{low:.4g}", (4, bottom), text, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(panel, f"step 1 .. {count} (epochs {epochs[0]}..{epochs[-1]})", (left, PANEL_HEIGHT - 5), text,
                    0.4, (80, 80, 80), 1, cv2.LINE_AA)
        panels.append(panel)
    return write_image(png_path, np.vstack(panels), overwrite=True)


def curve_heights(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Where :func:`plot_losses` draws ``values``: heights in 0..1 (lowest to highest value), on a
    log scale where the values are all positive and span more than a factor of 10 (then ``True``)."""
    low, high = float(values.min()), float(values.max())
    logarithmic = low > 0 and high > 10 * low
    shown = np.log10(values) if logarithmic else values
    shown_low, shown_high = float(shown.min()), float(shown.max())
    return (shown - shown_low) / (shown_high - shown_low if shown_high > shown_low else 1.0), logarithmic


def sample_grid(columns: list[str], rows: list[list[np.ndarray]]) -> np.ndarray:
    """A grid of grey images on 0..255 (float or uint8) under column names: one row per sample."""
    header = gapped_row([label_band(name, SAMPLE_SIDE) for name in columns])
    body = [header]
    for images in rows:
        tiles = [fit_panel(cv2.cvtColor(np.clip(np.rint(image), 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR),
                           SAMPLE_SIDE, SAMPLE_SIDE) for image in images]
        body += [np.full((6, header.shape[1], 3), 255, np.uint8), gapped_row(tiles)]
    return np.vstack(body)
