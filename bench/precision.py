"""The error of each ``fuse(precision=...)`` against the fp32 reference, on real pairs.

    python -m bench.precision --ir DIR --vis DIR --weights FOLDER [--device cuda] [--out table.md]
    python -m bench.precision --ir DIR --vis DIR --ir-autoencoder F --vis-autoencoder F --fusion F

For each precision the fast path's fused images (float, before rounding) are compared with the
reference model's in fp32 over every pixel of every pair: the largest and the mean absolute
difference in grey levels, the share of pixels within one level, and the PSNR (peak 255) of the
difference, and how many pairs a 16-bit call fused in fp32 instead (their deep weighting too
ill-conditioned). Prints a Markdown table that says the machine, the date, the pairs and the command.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import cv2
import torch

from crossfuse_fast import CrossFuse, fuse
from crossfuse_fast.api import luminance_pair
from crossfuse_fast.pairing import pair_folders
from crossfuse_fast.precision import PRECISIONS, SixteenBitFallback


def _model(args: argparse.Namespace) -> CrossFuse:
    if args.weights:
        return CrossFuse.from_dir(args.weights)
    return CrossFuse.from_original(ir_autoencoder=args.ir_autoencoder, vis_autoencoder=args.vis_autoencoder,
                                   fusion=args.fusion)


def measure(model: CrossFuse, pairs: list[tuple[Path, Path]], device: torch.device,
            precisions=PRECISIONS) -> dict[str, dict[str, float]]:
    """``precision -> {"max", "mean", "within_one", "psnr", "seconds", "fallbacks"}`` over ``pairs``
    (``fallbacks``: the pairs a 16-bit call fused again in fp32)."""
    model = model.to(device).eval()
    totals = {p: {"max": 0.0, "sum": 0.0, "within": 0, "squares": 0.0, "pixels": 0, "seconds": 0.0, "fallbacks": 0}
              for p in precisions}
    for ir_path, vis_path in pairs:
        ir, vis, _ = luminance_pair(cv2.imread(str(ir_path), cv2.IMREAD_UNCHANGED),
                                    cv2.imread(str(vis_path), cv2.IMREAD_UNCHANGED))
        ir, vis = (torch.from_numpy(x)[None, None].to(device) for x in (ir, vis))
        reference = fuse(ir, vis, model=model, backend="reference").double()
        for precision in precisions:
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SixteenBitFallback)
                got = fuse(ir, vis, model=model, backend="fast", precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = totals[precision]
            total["fallbacks"] += sum(len(w.message.images) for w in caught if w.category is SixteenBitFallback)
            total["seconds"] += time.perf_counter() - started
            difference = (got.double() - reference).abs()
            total["max"] = max(total["max"], difference.max().item())
            total["sum"] += difference.sum().item()
            total["within"] += int((difference <= 1.0).sum().item())
            total["squares"] += difference.square().sum().item()
            total["pixels"] += difference.numel()
    results = {}
    for precision, total in totals.items():
        mse = total["squares"] / total["pixels"]
        results[precision] = {"max": total["max"], "mean": total["sum"] / total["pixels"],
                              "within_one": total["within"] / total["pixels"],
                              "psnr": math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse),
                              "seconds": total["seconds"], "fallbacks": total["fallbacks"]}
    return results


def table(results: dict[str, dict[str, float]], *, pairs: int, device: torch.device, command: str) -> str:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    lines = [f"Against the fp32 reference, {pairs} pairs, {machine} ({device.type}), torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}: `{command}`", "",
             "| precision | largest difference | mean difference | within one level | PSNR (dB) | pairs fused in fp32 "
             "instead | seconds |",
             "|---|---|---|---|---|---|---|"]
    for precision, row in results.items():
        psnr = "exact" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"
        lines.append(f"| {precision} | {row['max']:.3g} | {row['mean']:.3g} | {100 * row['within_one']:.4g}% | "
                     f"{psnr} | {row['fallbacks']} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--ir", required=True, type=Path, help="folder of infrared images")
    parser.add_argument("--vis", required=True, type=Path, help="folder of visible images, paired by name")
    parser.add_argument("--weights", help="the released weights' folder, or a bundle")
    for part in ("ir-autoencoder", "vis-autoencoder", "fusion"):
        parser.add_argument(f"--{part}", help=f"the {part.replace('-', ' ')} checkpoint (instead of --weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if not args.weights and not (args.ir_autoencoder and args.vis_autoencoder and args.fusion):
        parser.error("give --weights, or --ir-autoencoder, --vis-autoencoder and --fusion")
    pairs = [(ir, vis) for ir, vis in pair_folders(args.ir, args.vis).pairs]
    device = torch.device(args.device)
    results = measure(_model(args), pairs, device, args.precisions.split(","))
    text = table(results, pairs=len(pairs), device=device, command="python -m bench.precision " + " ".join(
        sys.argv[1:] if argv is None else argv))
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
