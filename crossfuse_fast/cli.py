"""The ``crossfuse`` command: fuse images, train both stages, write synthetic pairs.

Errors a user can fix (missing files, wrong checkpoints, bad images, outputs that exist) are
printed as one line and exit with status 2; outputs are never overwritten without
``--overwrite``. ``crossfuse fuse`` runs the authors' released weights unless told otherwise,
fetching them on first use (:mod:`crossfuse_fast.weights`).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from . import __version__
from .api import DEFAULT_UINT16_SCALING, UINT16_SCALINGS
from .backends import BACKENDS, DEFAULT_BACKEND, NO_TRITON_NOTICE, require_fast, resolve_backend
from .checkpoints import load_into
from .data import ImageFolder, PairedFolders, SyntheticPairs
from .evaluation import FORMATS
from .files import write_image, write_text
from .metrics import CONVENTIONS, METRICS
from .pairing import IMAGE_SUFFIXES, pair_folders, read_pairs_csv
from .precision import DEFAULT_PRECISION, PRECISIONS, SIXTEEN_BITS
from .reference import AutoEncoder
from .resume import Interrupted
from .tiling import DEEP_STEP, DEFAULT_TILE
from .video import DEFAULT_FRAMES_PER_BATCH, VIDEO_SUFFIXES, fuse_video, is_video
from .weights import default_weights_dir

DESCRIPTION = ("Fuse infrared and visible images with CrossFuse, score and compare fused images, train both of its "
               "stages, export it to ONNX, write synthetic pairs.")
BACKEND_HELP = ("auto: the fast path where Triton is installed, else the reference model (with a notice); "
                "reference: the reference model; fast: the same weights on the fast path (needs Triton; its fused "
                "ops run as Triton kernels on a GPU, as their PyTorch twins on a CPU), the same result up to rounding")
DEVICE_HELP = "the torch device to run on: cpu, cuda, cuda:1, ..."


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for flags and options that are off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return value


def _at_least_8(text: str) -> int:
    value = _positive(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8 (three 2 x 2 poolings), got {text!r}")
    return value


def _multiple_of_16(text: str) -> int:
    value = _positive(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (the deep map, 1/8 of it, is read in 2 x 2 "
                                         f"patches), got {text!r}")
    return value


def _tile(text: str) -> int | None:
    """``--tile``: a multiple of 8 pixels, or 0 for never."""
    value = int(text) if text.strip().lstrip("-").isdigit() else -1
    if value == 0:
        return None
    if value < DEEP_STEP or value % DEEP_STEP:
        raise argparse.ArgumentTypeError(f"must be a multiple of {DEEP_STEP} pixels, or 0 for never, got {text!r}")
    return value


def _add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the weights :func:`_load_model` loads."""
    weights = parser.add_argument_group("weights", "the released weights unless one of these is given")
    weights.add_argument("--weights", metavar="PATH", help="a folder holding the three released files under "
                         "their names, or a bundle written by CrossFuse.save (nothing is downloaded)")
    weights.add_argument("--weights-dir", metavar="DIR", default=str(default_weights_dir()),
                         help="where the released weights are fetched to and kept ($CROSSFUSE_WEIGHTS_DIR)")
    weights.add_argument("--checkpoint", metavar="FILE", help="a bundle written by CrossFuse.save")
    weights.add_argument("--ir-autoencoder", metavar="FILE", help="an infrared autoencoder .model file")
    weights.add_argument("--vis-autoencoder", metavar="FILE", help="a visible autoencoder .model file")
    weights.add_argument("--fusion", metavar="FILE", help="a fusion network .model file")


def _load_model(args: argparse.Namespace):
    from .model import CrossFuse
    three = (args.ir_autoencoder, args.vis_autoencoder, args.fusion)
    sources = [flag for flag, given in (("--checkpoint", args.checkpoint), ("--weights", args.weights),
                                        ("--ir-autoencoder/--vis-autoencoder/--fusion", any(three))) if given]
    if len(sources) > 1:
        raise ValueError(f"give one source of weights, not {' and '.join(sources)}")
    if args.checkpoint:
        return CrossFuse.load(args.checkpoint)
    if any(three):
        if not all(three):
            raise ValueError("give all three of --ir-autoencoder, --vis-autoencoder and --fusion")
        return CrossFuse.from_original(ir_autoencoder=args.ir_autoencoder, vis_autoencoder=args.vis_autoencoder,
                                       fusion=args.fusion)
    if args.weights:
        return CrossFuse.from_dir(args.weights)
    return CrossFuse.pretrained(args.weights_dir)


def _backend(args: argparse.Namespace) -> str:
    """The backend to run, resolved once before any work: a notice where "auto" falls back to the
    reference, ``ValueError`` where "fast" cannot run."""
    backend = resolve_backend(args.backend)
    if args.backend == "auto" and backend == "reference":
        print(f"crossfuse {args.command}: {NO_TRITON_NOTICE}", file=sys.stderr)
    if backend == "fast":
        require_fast()
    if backend == "reference" and getattr(args, "precision", DEFAULT_PRECISION) in SIXTEEN_BITS:
        why = ("the reference model runs here (Triton is not installed)" if args.backend == "auto"
               else "the reference model is the fp32 oracle")
        raise ValueError(f"--precision {args.precision} runs on the fast path, and {why}; use --precision fp32 "
                         "or tf32, or --backend fast")
    return backend


def _device(text: str) -> torch.device:
    """The torch device ``--device`` names; ``ValueError`` for a malformed one or one not here."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device {text!r}: not a torch device (cpu, cuda, cuda:1, ...)") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {text}: no such CUDA device here ({count} visible)")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: this command runs on cpu or cuda devices")
    return device


def _fuse_jobs(args: argparse.Namespace) -> tuple[list[tuple[Path, Path, Path]], list[str]]:
    """``(ir, vis, out)`` triples (one pair of files, two folders paired by name, or the pairs of a
    CSV) and one line per file the pairing left out. Refuses, before any work, outputs that would
    replace an input or land in an input folder."""
    out = Path(args.out)
    problems: list[str] = []
    if args.pairs:
        pairs = read_pairs_csv(args.pairs)
        folders = set()
    else:
        ir, vis = Path(args.ir), Path(args.vis)
        if ir.is_dir() != vis.is_dir():
            raise ValueError(f"--ir {ir} and --vis {vis}: give two folders or two files")
        if ir.is_dir():
            pairing = pair_folders(ir, vis)
            pairs, problems, folders = pairing.pairs, pairing.problems(), {ir.resolve(), vis.resolve()}
        else:
            for path in (ir, vis):
                if not path.is_file():
                    raise ValueError(f"{path}: no such file or folder")
            if out.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{out}: the output needs an image suffix ({', '.join(IMAGE_SUFFIXES)})")
            pairs, folders = [(ir, vis)], set()
            jobs = [(ir, vis, out)]
    if args.pairs or folders:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: exists and is not a folder (a folder job writes one PNG per pair into it)")
        if out.resolve() in folders:
            raise ValueError(f"{out}: is an input folder; outputs would mix with the images they come from")
        jobs = [(ir, vis, out / f"{ir.stem}.png") for ir, vis in pairs]
        seen: dict[Path, Path] = {}
        for ir, _, target in jobs:
            if target in seen:
                raise ValueError(f"{seen[target]} and {ir} would both be fused into {target}")
            seen[target] = ir
    inputs = {path.resolve(): path for ir, vis, _ in jobs for path in (ir, vis)}
    for _, _, target in jobs:
        if target.resolve() in inputs:
            raise ValueError(f"{target}: is an input ({inputs[target.resolve()]}); it is never overwritten")
    return jobs, problems


def _command_fuse_video(args: argparse.Namespace) -> int:
    """Fuse two videos frame by frame into ``--out`` (skipped when it exists, unless ``--overwrite``)."""
    from tqdm import tqdm

    from .api import fuse
    ir, vis, out = Path(args.ir), Path(args.vis), Path(args.out)
    if not (is_video(ir) and is_video(vis)):
        raise ValueError(f"--ir {ir} and --vis {vis}: give two videos ({', '.join(VIDEO_SUFFIXES)}) or two images")
    if not is_video(out):
        raise ValueError(f"{out}: the output of a video job needs a video suffix ({', '.join(VIDEO_SUFFIXES)})")
    for path in (ir, vis):
        if path.resolve() == out.resolve():
            raise ValueError(f"{out}: is an input ({path}); it is never overwritten")
    if out.exists() and not args.overwrite:
        print("crossfuse fuse: 0 fused, 1 skipped (its output exists; --overwrite to redo it), 0 failed",
              file=sys.stderr)
        return 0
    device = _device(args.device)
    backend = _backend(args)
    model = _load_model(args).to(device)

    def fuse_frames(ir_frames, vis_frames):
        return fuse(ir_frames, vis_frames, model=model, uint16_scaling=args.uint16_scaling, backend=backend,
                    tile=args.tile, precision=args.precision)

    bar = None

    def progress(total):
        nonlocal bar
        bar = tqdm(total=total, unit="frame", desc="fusing", disable=None, leave=False)
        return bar.update

    try:
        frames = fuse_video(ir, vis, out, fuse_frames, args.frames_per_batch, overwrite=args.overwrite,
                            progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(out)
    print(f"crossfuse fuse: {frames} frames fused", file=sys.stderr)
    return 0


def _command_fuse(args: argparse.Namespace) -> int:
    """Fuse every pair that has no output yet (``--overwrite``: every pair), each written atomically;
    a pair that fails is reported and the others go on. 0 when none failed, else 2. Pairs are read
    ahead by loader workers and fused in same-size batches (:mod:`crossfuse_fast.batched_fusion`);
    two videos are fused frame by frame (:func:`_command_fuse_video`)."""
    from tqdm import tqdm

    from .batched_fusion import fuse_batch_with, fuse_files, one_line
    if not args.pairs and (is_video(args.ir) or is_video(args.vis)):
        return _command_fuse_video(args)
    jobs, problems = _fuse_jobs(args)
    for line in problems:
        print(f"crossfuse fuse: {line}", file=sys.stderr)
    todo = [job for job in jobs if args.overwrite or not job[2].exists()]
    skipped = len(jobs) - len(todo)
    failures: list[str] = []
    rate = ""
    if todo:
        device = _device(args.device)
        backend = _backend(args)
        model = _load_model(args).to(device)
        fuse_batch = fuse_batch_with(model, backend=backend, tile=args.tile, precision=args.precision)
        started = time.perf_counter()
        with tqdm(total=len(todo), unit="pair", desc="fusing", disable=None, leave=False) as bar:
            for result in fuse_files(todo, fuse_batch, device=device, batch_size=args.batch_size,
                                     workers=args.workers, uint16_scaling=args.uint16_scaling):
                ir_path, vis_path, out = todo[result.index]
                bar.update()
                reason = result.error
                if result.image is not None:
                    try:
                        write_image(out, result.image, overwrite=True)
                    except (ValueError, OSError, cv2.error) as error:
                        reason = one_line(error)
                if reason:
                    failures.append(f"{ir_path}, {vis_path}: {reason}")
                    continue
                if result.note:
                    print(f"crossfuse fuse: {ir_path}, {vis_path}: {result.note}", file=sys.stderr)
                print(out)
        fused_count = len(todo) - len(failures)
        if fused_count > 1:
            rate = (f"crossfuse fuse: {fused_count / (time.perf_counter() - started):.3g} pairs per second "
                    "(reading, fusing and writing)")
    for line in failures:
        print(f"crossfuse fuse: failed: {line}", file=sys.stderr)
    if len(jobs) > 1 or skipped or failures:
        print(f"crossfuse fuse: {len(todo) - len(failures)} fused, {skipped} skipped (their outputs exist; "
              f"--overwrite to redo them), {len(failures)} failed", file=sys.stderr)
    if rate:
        print(rate, file=sys.stderr)
    return 2 if failures else 0


def _command_train_autoencoder(args: argparse.Namespace) -> None:
    from .distributed import process_group
    from .train import train_autoencoder
    dataset = (SyntheticPairs(args.synthetic, args.size, modality=args.synthetic_modality)
               if args.synthetic else ImageFolder(args.images, args.size))
    with process_group(_device(args.device)) as device:
        train_autoencoder(dataset, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          decay_from_epoch=args.lr_decay_epoch, device=device, max_steps=args.max_steps,
                          overwrite=args.overwrite, backend=_backend(args), seed=args.seed, resume=args.resume,
                          save_every=args.save_every, keep=args.keep)


def _command_train_fusion(args: argparse.Namespace) -> None:
    from .distributed import process_group
    from .train import train_fusion
    dataset = (SyntheticPairs(args.synthetic, args.size) if args.synthetic
               else PairedFolders(args.ir, args.vis, args.size))
    ir_autoencoder = load_into(AutoEncoder(), args.ir_autoencoder, "an infrared autoencoder checkpoint")
    vis_autoencoder = load_into(AutoEncoder(), args.vis_autoencoder, "a visible autoencoder checkpoint")
    with process_group(_device(args.device)) as device:
        train_fusion(dataset, ir_autoencoder, vis_autoencoder, args.out, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, decay_from_epoch=args.lr_decay_epoch, device=device,
                     max_steps=args.max_steps, overwrite=args.overwrite, backend=_backend(args), seed=args.seed,
                     resume=args.resume, save_every=args.save_every, cache_features=args.cache_features,
                     keep=args.keep)


def _command_export(args: argparse.Namespace) -> None:
    from .export import MIN_SIDE, export_onnx, onnx_difference
    output = Path(args.onnx)
    sources = [Path(p) for p in (args.checkpoint, args.ir_autoencoder, args.vis_autoencoder, args.fusion) if p]
    if any(output.resolve() == source.resolve() for source in sources):
        raise ValueError(f"{output}: is one of the weights read; choose another --onnx path")
    if output.suffix.lower() != ".onnx":
        raise ValueError(f"{output}: an ONNX file's name ends in .onnx")
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    model = _load_model(args)
    try:
        export_onnx(model, output, overwrite=args.overwrite)
    except ImportError as error:
        raise ValueError(str(error)) from error
    print(f"{output}: inputs ir, vis and output fused, [batch, 1, height, width] on 0..255 (sides of {MIN_SIDE} "
          "pixels or more)")
    if args.check:
        try:
            difference = onnx_difference(model, output)
        except ImportError as error:
            raise ValueError(f"--check runs the file in onnxruntime, which is not installed ({error.name}); "
                             "pip install onnxruntime") from error
        print(f"{output}: largest difference from PyTorch in onnxruntime: {difference:.3g} grey levels")


def _command_synthetic(args: argparse.Namespace) -> None:
    from .synthetic import synthetic_pair
    out = Path(args.out)
    names = [f"{index:04d}.png" for index in range(args.count)]
    existing = [str(out / sub / name) for sub in ("ir", "vis") for name in names if (out / sub / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace")
    for sub in ("ir", "vis"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        ir, vis = synthetic_pair(args.height, args.width, np.random.default_rng((args.seed, index)))
        write_image(out / "ir" / name, ir, overwrite=True)
        write_image(out / "vis" / name, vis, overwrite=True)
    print(f"{args.count} pairs in {out / 'ir'} and {out / 'vis'}")


def _refuse_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """An output path that is an input, or exists without ``--overwrite``, is refused before any work."""
    for path in inputs:
        if path.exists() and (path.resolve() == out.resolve() or (path.is_dir() and out.resolve().parent == path.resolve())):
            raise ValueError(f"{out}: is an input or inside an input folder ({path}); it is never written")
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: exists; pass --overwrite to replace it")


def _command_eval(args: argparse.Namespace) -> int:
    """Score fused images against their sources; one row per image, then the mean. 0 when every
    image was scored, else 2 (each left out is listed; the table holds the others)."""
    from tqdm import tqdm

    from .evaluation import FORMATTERS, as_html, score, score_triples
    from .metrics import NOT_IMPLEMENTED, available, metric_names
    names = metric_names(args.metrics) if args.metrics else available(args.convention)
    missing = [name for name in names if (args.convention, name) in NOT_IMPLEMENTED]
    if missing:
        raise ValueError(f"{', '.join(missing)} under the {args.convention} convention is not implemented")
    if not args.pairs and not (args.ir and args.vis):
        raise ValueError("give --ir and --vis (files or folders), or --pairs CSV")
    inputs = [Path(p) for p in (args.fused, args.ir, args.vis, args.pairs) if p]
    outputs = [Path(p) for p in (args.out, args.html) if p]
    for out in outputs:
        _refuse_output(out, inputs, args.overwrite)
    triples, problems = score_triples(args.fused, args.ir, args.vis, args.pairs)
    scores = score(triples, args.convention, names,
                   progress=lambda items: tqdm(items, unit="image", desc="scoring", disable=None, leave=False))
    for line in problems + scores.problems:
        print(f"crossfuse eval: {line}", file=sys.stderr)
    if not scores.rows:
        raise ValueError("no image could be scored")
    table = FORMATTERS[args.format](scores)
    if args.out:
        write_text(Path(args.out), table, overwrite=args.overwrite)
        print(args.out)
    else:
        sys.stdout.write(table)
    if args.html:
        write_text(Path(args.html), as_html(scores), overwrite=args.overwrite)
        print(args.html)
    return 2 if problems or scores.problems else 0


def _crop(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts) or int(parts[2]) < 1 or int(parts[3]) < 1:
        raise argparse.ArgumentTypeError(f"must be x,y,width,height in pixels (width and height at least 1), got {text!r}")
    return tuple(int(p) for p in parts)


def _command_compare(args: argparse.Namespace) -> None:
    from .compare import compare_grid, grid_rows
    fused = [Path(p) for p in args.fused]
    names = [n.strip() for n in args.names.split(",")] if args.names else [
        p.name if p.is_dir() else (p.parent.name if len({q.parent for q in fused}) == len(fused) else p.stem)
        for p in fused]
    if len(names) != len(fused):
        raise ValueError(f"--names gives {len(names)} names for {len(fused)} fused images or folders")
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{out}: the grid needs an image suffix ({', '.join(IMAGE_SUFFIXES)})")
    _refuse_output(out, [Path(args.ir), Path(args.vis), *fused], args.overwrite)
    grid = compare_grid(grid_rows(args.ir, args.vis, fused, limit=args.limit), names, args.crop)
    write_image(out, grid, overwrite=args.overwrite)
    print(out)


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = _Parser(prog="crossfuse", description=DESCRIPTION, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"crossfuse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    fuse = commands.add_parser("fuse", help="fuse an infrared/visible pair, two folders of pairs, or two videos",
                               description="Fuse an infrared/visible pair, two folders of pairs, or two videos "
                               "frame by frame, with the authors' released weights (fetched on first use) or "
                               "the weights given.",
                               formatter_class=formatter)
    fuse.add_argument("--ir", help="infrared image, folder of them, or video")
    fuse.add_argument("--vis", help="visible image (grey or colour), folder paired with --ir's by name "
                      "(the same stem, or IRn / VISn), or video (frames pair in order, up to the shorter video)")
    fuse.add_argument("--pairs", metavar="CSV", help="a CSV of ir,vis paths (a header row ir,vis; paths relative "
                      "to the CSV's folder) instead of --ir and --vis")
    fuse.add_argument("--out", required=True, help="output image, folder for folder and CSV jobs (one PNG per "
                      "pair, named after the infrared image), or video (at the inputs' frame rate); existing "
                      "outputs are skipped, so a run resumes")
    _add_weight_arguments(fuse)
    fuse.add_argument("--uint16-scaling", choices=UINT16_SCALINGS, default=DEFAULT_UINT16_SCALING,
                      help="how 16-bit images map to 0..255: minmax stretches each image's own range, full "
                      "divides by 257")
    fuse.add_argument("--device", default="cpu", help=DEVICE_HELP)
    fuse.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help=BACKEND_HELP)
    fuse.add_argument("--tile", type=_tile, default=DEFAULT_TILE, metavar="PIXELS",
                      help="images with a side longer than this fuse in overlapping tiles, so memory stays "
                      "near that of one PIXELS x PIXELS image (the same result up to rounding); a multiple "
                      "of 8, or 0 for never")
    fuse.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                      help="fp32; tf32 (TF32 products on a GPU); bf16 or fp16 (the fast path in 16 bits with fp32 "
                      "accumulation, the weighting and the final stretch in fp32; the README gives the error)")
    fuse.add_argument("--batch-size", type=_positive, default=8, metavar="N",
                      help="pairs of one size fused together (a GPU fuses a batch at once; a CPU one pair at a time)")
    fuse.add_argument("--workers", type=_non_negative, default=2, metavar="N",
                      help="processes reading the next pairs while a batch is fused (0: read in the main process)")
    fuse.add_argument("--frames-per-batch", type=_positive, default=DEFAULT_FRAMES_PER_BATCH, metavar="N",
                      help="video frames fused per call (two videos: --ir ir.mp4 --vis vis.mp4 --out fused.mp4)")
    fuse.add_argument("--overwrite", action="store_true", help="fuse every pair again, replacing existing outputs "
                      "(never an input)")
    fuse.set_defaults(run=_command_fuse)

    for name, helptext in (("train-autoencoder", "stage 1: train one modality's autoencoder"),
                           ("train-fusion", "stage 2: train the fusion network on frozen encoders")):
        sub = commands.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ". Under "
                                  f"torchrun (torchrun --nproc-per-node N -m crossfuse_fast {name} ...) the processes "
                                  "train one model together (docs/training.md).", formatter_class=formatter)
        stage1 = name == "train-autoencoder"
        if stage1:
            sub.add_argument("--images", help="folder of training images of one modality")
            sub.add_argument("--synthetic-modality", choices=("ir", "vis"),
                             help="with --synthetic: which modality's images to generate (required there)")
        else:
            sub.add_argument("--ir", help="folder of infrared training images")
            sub.add_argument("--vis", help="folder of visible training images, paired by file name")
            sub.add_argument("--ir-autoencoder", required=True, help="stage-1 infrared autoencoder file")
            sub.add_argument("--vis-autoencoder", required=True, help="stage-1 visible autoencoder file")
            sub.add_argument("--cache-features", action="store_true", help="compute the frozen encoders' deep maps "
                             "of the data once, into OUT/fusion_deep_maps.npy (1 MB per 256 x 256 pair), and read "
                             "them at each step: the same loss up to rounding, faster where encoding weighs")
        sub.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help=BACKEND_HELP)
        sub.add_argument("--synthetic", type=_positive, metavar="N",
                         help="train on N synthetic images/pairs instead of folders")
        sub.add_argument("--out", required=True, help="folder for the per-epoch checkpoints")
        sub.add_argument("--epochs", type=_positive, default=4 if stage1 else 32, help="passes over the data")
        sub.add_argument("--batch-size", type=_positive, default=2 if stage1 else 8,
                         help="images per step (under torchrun: of all processes together, split evenly)")
        sub.add_argument("--lr", type=float, default=1e-4 if stage1 else 1e-3,
                         help="Adam's learning rate (x 0.1 from --lr-decay-epoch on)")
        sub.add_argument("--lr-decay-epoch", type=_positive, default=3, metavar="E",
                         help="the learning rate is x 0.1 from epoch E on (the released schedule's 3; an epoch "
                              "of a small data set is short, bench/NOTES.md)")
        sub.add_argument("--size", type=_at_least_8 if stage1 else _multiple_of_16, default=256,
                         help="training images are resized to SIZE x SIZE" + ("" if stage1 else
                         " (a multiple of 16: the cross encoder reads the whole deep map in 2 x 2 patches)"))
        sub.add_argument("--max-steps", type=_positive, help="cap the batches per epoch (smoke runs)")
        sub.add_argument("--device", default="cpu", help=DEVICE_HELP)
        sub.add_argument("--seed", type=int, default=0, help="the run's seed (weights' start and data order)")
        sub.add_argument("--save-every", type=_positive, default=100, metavar="N",
                         help="save the run's whole state every N steps (and at each epoch's end), for --resume")
        sub.add_argument("--resume", action="store_true", help="continue the interrupted run in --out exactly "
                         "(the same command and settings); SIGINT or SIGTERM stops a run with its state saved")
        sub.add_argument("--keep", type=_positive, metavar="N", help="keep only the last N epochs' checkpoints "
                         "(default: all)")
        sub.add_argument("--overwrite", action="store_true", help="start again, replacing the checkpoints and state "
                         "in --out")
        sub.set_defaults(run=_command_train_autoencoder if stage1 else _command_train_fusion)

    evaluate = commands.add_parser("eval", help="score fused images against their sources (EN, SD, MI, SSIM, ...)",
                                   description="Score fused images against their infrared and visible sources: one "
                                   "row of metrics per image, then the mean, under a named convention "
                                   "(docs/metrics.md).", formatter_class=formatter)
    evaluate.add_argument("fused", help="a fused image, or a folder of them named after their infrared images "
                          "(as crossfuse fuse names them) or by the pairs' common name (IRn / VISn -> n)")
    evaluate.add_argument("--ir", help="infrared image, or folder of them")
    evaluate.add_argument("--vis", help="visible image, or folder paired with --ir's as crossfuse fuse pairs them")
    evaluate.add_argument("--pairs", metavar="CSV", help="a CSV of ir,vis paths instead of --ir and --vis")
    evaluate.add_argument("--convention", choices=CONVENTIONS, default="standard",
                          help="whose numbers to reproduce: standard (docs/metrics.md), li, tang, cddfuse, vifb")
    evaluate.add_argument("--metrics", help=f"comma-separated, of {','.join(METRICS)} (default: all the convention "
                          "computes)")
    evaluate.add_argument("--format", choices=FORMATS, default="markdown", help="the table's format")
    evaluate.add_argument("--out", help="write the table to this file (default: print it)")
    evaluate.add_argument("--html", metavar="FILE", help="also write one page with each image beside its metrics")
    evaluate.add_argument("--overwrite", action="store_true", help="replace --out and --html if they exist")
    evaluate.set_defaults(run=_command_eval)

    compare = commands.add_parser("compare", help="a picture of the sources and each method's fused image",
                                  description="Draw a grid: infrared | visible | each method's fused image, under "
                                  "their names, with an optional enlarged crop.", formatter_class=formatter)
    compare.add_argument("ir", help="infrared image, or folder of them")
    compare.add_argument("vis", help="visible image, or folder paired with IR's")
    compare.add_argument("fused", nargs="+", help="each method's fused image, or folder of them (named as for eval)")
    compare.add_argument("--out", required=True, help="the grid image (.png, .jpg, ...)")
    compare.add_argument("--names", help="comma-separated method names (default: the fused folders' names)")
    compare.add_argument("--crop", type=_crop, metavar="X,Y,W,H", help="a region, in image pixels, marked on each "
                         "image and shown enlarged under it")
    compare.add_argument("--limit", type=_positive, default=4, help="pairs shown when IR and VIS are folders")
    compare.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    compare.set_defaults(run=_command_compare)

    export = commands.add_parser("export", help="write the model as an ONNX file (any batch, height and width)",
                                 description="Write the model (the released weights unless given) as an ONNX file: "
                                 "inputs ir and vis, output fused, each [batch, 1, height, width] on 0..255 with "
                                 "the three dimensions dynamic (docs/export.md).", formatter_class=formatter)
    export.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write (.onnx)")
    _add_weight_arguments(export)
    export.add_argument("--check", action="store_true", help="run the file in onnxruntime on random pairs of two "
                        "sizes and print its largest difference from PyTorch (needs onnxruntime)")
    export.add_argument("--overwrite", action="store_true", help="replace --onnx if it exists")
    export.set_defaults(run=_command_export)

    synthetic = commands.add_parser("synthetic", help="write synthetic pairs to OUT/ir and OUT/vis",
                                    description="Write synthetic infrared/visible pairs (PNG) to OUT/ir and OUT/vis.",
                                    formatter_class=formatter)
    synthetic.add_argument("--out", required=True, help="folder to write ir/ and vis/ into")
    synthetic.add_argument("--count", type=_positive, default=8, help="how many pairs")
    synthetic.add_argument("--height", type=_positive, default=256, help="image height in pixels")
    synthetic.add_argument("--width", type=_positive, default=256, help="image width in pixels")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same pairs)")
    synthetic.add_argument("--overwrite", action="store_true", help="replace existing files")
    synthetic.set_defaults(run=_command_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train-autoencoder" and args.synthetic and not args.synthetic_modality:
        print("crossfuse train-autoencoder: give --synthetic-modality ir or vis with --synthetic (which modality's "
              "images to generate)", file=sys.stderr)
        return 2
    if args.command.startswith("train-") and not args.synthetic:
        missing = ["--images"] if args.command == "train-autoencoder" and not args.images else []
        if args.command == "train-fusion":
            missing = [flag for flag, value in (("--ir", args.ir), ("--vis", args.vis)) if not value]
        if missing:
            print(f"crossfuse {args.command}: give {' and '.join(missing)}, or --synthetic N", file=sys.stderr)
            return 2
    if args.command == "fuse" and not args.pairs and not (args.ir and args.vis):
        print("crossfuse fuse: give --ir and --vis (files or folders), or --pairs CSV", file=sys.stderr)
        return 2
    # SIGTERM as an orderly exit, so the temporary files of the writes under way are removed.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings():
            # Warnings (a 16-bit call fused in fp32, say) as one line, like everything else.
            warnings.showwarning = lambda message, *rest, **options: print(f"crossfuse {args.command}: {message}",
                                                                            file=sys.stderr)
            return args.run(args) or 0
    except (ValueError, OSError) as error:
        print(f"crossfuse {args.command}: {error}", file=sys.stderr)
        return 2
    except Interrupted as stopped:
        print(f"crossfuse {args.command}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
