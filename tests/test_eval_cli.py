"""``crossfuse eval`` and ``crossfuse compare`` through the installed entry point, on generated folders."""
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from crossfuse_fast.metrics import evaluate
from crossfuse_fast.synthetic import synthetic_pair

ROOT = Path(__file__).resolve().parents[1]


def crossfuse(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("crossfuse") or sys.executable, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three TNO-named pairs (IRn / VISn) and two methods' fused images, named after the infrared images."""
    root = tmp_path_factory.mktemp("eval")
    for name in ("ir", "vis", "average", "maximum"):
        (root / name).mkdir()
    for n in range(1, 4):
        ir, vis = synthetic_pair(72, 84, seed=n)  # 72: li's VIF takes four pyramid levels
        cv2.imwrite(str(root / "ir" / f"IR{n}.png"), ir)
        cv2.imwrite(str(root / "vis" / f"VIS{n}.png"), vis)
        cv2.imwrite(str(root / "average" / f"IR{n}.png"), ((ir.astype(int) + vis) // 2).astype(np.uint8))
        cv2.imwrite(str(root / "maximum" / f"IR{n}.png"), np.maximum(ir, vis))
    return root


def test_eval_tables_in_three_formats(folders, tmp_path):
    base = [str(folders / "average"), "--ir", str(folders / "ir"), "--vis", str(folders / "vis")]
    run = crossfuse("eval", *base, "--format", "csv", "--convention", "tang", "--metrics", "EN,MI,SSIM,Qabf")
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert [r["image"] for r in rows] == ["IR1", "IR2", "IR3", "mean"]
    assert {r["convention"] for r in rows} == {"tang"}
    read = lambda path: cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float64)  # noqa: E731
    want = evaluate(read(folders / "average" / "IR2.png"), read(folders / "ir" / "IR2.png"),
                    read(folders / "vis" / "VIS2.png"), "tang", "EN,MI,SSIM,Qabf")
    for name, value in want.items():
        assert float(rows[1][name]) == pytest.approx(value.item(), rel=1e-12)
        assert float(rows[3][name]) == pytest.approx(np.mean([float(r[name]) for r in rows[:3]]), rel=1e-12)

    run = crossfuse("eval", *base, "--format", "json")
    assert run.returncode == 0, run.stderr
    table = json.loads(run.stdout)
    assert table["convention"] == "standard" and len(table["rows"]) == 3 and set(table["mean"]) == set(table["metrics"])
    assert "VIF" in table["metrics"] and "Nabf" in table["metrics"]

    out, page = tmp_path / "li.md", tmp_path / "report.html"
    run = crossfuse("eval", *base, "--convention", "li", "--out", str(out), "--html", str(page))
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert text.startswith("Convention: `li`") and "| mean |" in text
    assert "| VIF |" in text and "| FMI_dct |" in text and "| FMI_pixel |" not in text  # li's "FMI_pixel" is not
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 9 and "<code>li</code>" in html and "<b>mean</b>" in html
    again = crossfuse("eval", *base, "--out", str(out))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_eval_reports_what_it_leaves_out(folders, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(folders / "average", fused)
    (fused / "IR3.png").unlink()
    (fused / "IR2.png").write_bytes(b"not a png")
    run = crossfuse("eval", str(fused), "--ir", str(folders / "ir"), "--vis", str(folders / "vis"), "--format", "csv")
    assert run.returncode == 2
    assert [r["image"] for r in csv.DictReader(io.StringIO(run.stdout))] == ["IR1", "mean"]
    assert "no fused image named IR3" in run.stderr and "IR2.png: not a readable image" in run.stderr
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), cv2.imread(str(fused / "IR1.png"), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 257)
    run = crossfuse("eval", str(wide), "--ir", str(folders / "ir" / "IR1.png"), "--vis", str(folders / "vis" / "VIS1.png"))
    assert run.returncode == 2 and "wide.png" in run.stderr and "a uint16 image" in run.stderr


@pytest.mark.parametrize("argv,message", [
    (["--convention", "matlab"], "invalid choice: 'matlab'"),
    (["--metrics", "EN,XYZ"], "unknown metric XYZ"),
    (["--convention", "li", "--metrics", "FMI_pixel"], "FMI_pixel under the li convention is not implemented"),
    (["--out", "{ir}/table.md"], "inside an input folder"),
])
def test_eval_user_errors_are_one_line(folders, argv, message):
    argv = [a.format(ir=folders / "ir") for a in argv]
    run = crossfuse("eval", str(folders / "average"), "--ir", str(folders / "ir"), "--vis", str(folders / "vis"), *argv)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_compare_draws_the_grid(folders, tmp_path):
    grid = tmp_path / "grid.png"
    methods = [str(folders / "average"), str(folders / "maximum")]
    run = crossfuse("compare", str(folders / "ir"), str(folders / "vis"), *methods, "--out", str(grid), "--limit", "2")
    assert run.returncode == 0, run.stderr
    image = cv2.imread(str(grid))
    # A header, then two rows of four 240-pixel-high panels (72 x 84 images: 280 pixels wide) with gaps of 6.
    assert image.shape == (28 + 2 * (6 + 240), 4 * 280 + 3 * 6, 3)
    # The third column holds the average method's first image, scaled.
    panel = cv2.cvtColor(image[34:274, 2 * 286:2 * 286 + 280], cv2.COLOR_BGR2GRAY)
    average = cv2.imread(str(folders / "average" / "IR1.png"), cv2.IMREAD_GRAYSCALE)
    assert np.abs(panel.astype(int) - cv2.resize(average, (280, 240), interpolation=cv2.INTER_NEAREST)).mean() < 1
    assert (image[34:40, 0:10] == 255).all()  # the pair's name on white in the first panel's corner
    cropped = tmp_path / "cropped.png"
    run = crossfuse("compare", str(folders / "ir" / "IR1.png"), str(folders / "vis" / "VIS1.png"), *(
        str(Path(m) / "IR1.png") for m in methods), "--out", str(cropped), "--crop", "10,8,20,10")
    assert run.returncode == 0, run.stderr
    assert cv2.imread(str(cropped)).shape == (28 + 6 + 240 + 6 + 140, 4 * 280 + 3 * 6, 3)  # the crop row: 280 x 140
    for argv, message in ((["--crop", "70,60,20,20"], "is not inside its 84 x 72 pixels"),
                          (["--names", "one"], "--names gives 1 names for 2"),
                          (["--out", str(folders / "ir" / "IR1.png"), "--overwrite"], "is an input")):
        args = [str(folders / "ir" / "IR1.png"), str(folders / "vis" / "VIS1.png"), *(str(Path(m) / "IR1.png") for m in methods)]
        run = crossfuse("compare", *args, "--out", str(tmp_path / "x.png"), *argv)
        assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
