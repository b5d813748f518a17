"""``crossfuse_fast.batched_fusion`` and ``crossfuse fuse --batch-size``: pairs read ahead by loader
workers, fused in batches of one size, each image as it is fused alone."""
import shutil

import cv2
import numpy as np
import torch
from conftest import weights

from crossfuse_fast import CrossFuse, fuse
from crossfuse_fast.batched_fusion import fuse_files
from crossfuse_fast.cli import main


def _write_pairs(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "ir").mkdir(parents=True)
    (folder / "vis").mkdir()
    jobs = []
    for number, (height, width) in enumerate(sizes):
        ir_path, vis_path = folder / "ir" / f"{number:02d}.png", folder / "vis" / f"{number:02d}.png"
        cv2.imwrite(str(ir_path), rng.integers(0, 256, (height, width), dtype=np.uint8))
        cv2.imwrite(str(vis_path), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        jobs.append((ir_path, vis_path))
    return jobs


def test_consecutive_pairs_of_one_size_are_batched(tmp_path):
    """Batches of at most ``batch_size`` consecutive same-size pairs, in order; an unreadable pair
    between them is reported alone; a batch that fails is fused again pair by pair."""
    jobs = _write_pairs(tmp_path, [(16, 24)] * 3 + [(24, 16)] + [(16, 24)] * 2)
    jobs.insert(2, (tmp_path / "missing.png", jobs[0][1]))
    cv2.imwrite(str(jobs[6][0]), np.full((16, 24), 255, np.uint8))
    batches = []

    def fuse_batch(ir, vis):
        batches.append(ir.shape[0])
        if (ir.amin(dim=(1, 2, 3)) == 255).any():
            raise ValueError("a saturated image is refused")
        return (ir + vis) / 2

    results = list(fuse_files(jobs, fuse_batch, device=torch.device("cpu"), batch_size=2, workers=0))
    assert [r.index for r in results] == list(range(7))
    assert batches == [2, 1, 1, 2, 1, 1]
    assert [bool(r.error) for r in results] == [False, False, True, False, False, False, True]
    assert "missing.png: not a readable image" in results[2].error
    assert results[6].error == "a saturated image is refused"
    assert results[0].image.shape == (16, 24, 3) and results[0].image.dtype == np.uint8


def test_the_command_batches_with_workers_and_reports_the_rate(trained, tmp_path, capsys):
    """``--batch-size 3 --workers 2`` on a folder of two sizes, grey and colour: every image equals
    ``fuse`` on its pair alone, and the rate is reported."""
    pairs = trained / "pairs"
    folder = tmp_path / "pairs"
    shutil.copytree(pairs, folder)
    for number in range(2, 7):
        for modality in ("ir", "vis"):
            shutil.copy(folder / modality / "0000.png", folder / modality / f"{number:04d}.png")
    rng = np.random.default_rng(5)
    cv2.imwrite(str(folder / "ir" / "0004.png"), rng.integers(0, 256, (48, 40), dtype=np.uint8))
    cv2.imwrite(str(folder / "vis" / "0004.png"), rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["fuse", "--ir", str(folder / "ir"), "--vis", str(folder / "vis"), "--out", str(out),
                 "--batch-size", "3", "--workers", "2", "--backend", "reference", *weights(trained)]) == 0
    error = capsys.readouterr().err
    assert "7 fused, 0 skipped" in error and "pairs per second (reading, fusing and writing)" in error
    model = CrossFuse.from_original(ir_autoencoder=trained / "ir" / "autoencoder_epoch1.model",
                                    vis_autoencoder=trained / "vis" / "autoencoder_epoch1.model",
                                    fusion=trained / "fusion" / "fusion_epoch1.model")
    for number in range(7):
        name = f"{number:04d}.png"
        ir = cv2.imread(str(folder / "ir" / name), cv2.IMREAD_UNCHANGED)
        vis = cv2.imread(str(folder / "vis" / name), cv2.IMREAD_UNCHANGED)
        alone = fuse(ir, vis, model=model, backend="reference")
        assert np.array_equal(cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED), alone), name
