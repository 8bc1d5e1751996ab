"""The ``mri-deidentify`` command line: the contract in product.md, nothing more.

Exit status: 0 success; 2 bad usage or unusable input (one line on stderr, nothing written); 1 internal error.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from . import __version__, provenance
from .devices import DEVICE_CHOICES, DEVICE_HELP
from .errors import PROG, Cancelled, InputError, OneLineParser
from .pipeline import DEFAULT_MARGIN_MM


def _method_names() -> List[str]:
    from .methods import method_names
    return method_names()


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``batch`` (and the Slicer panel's Advanced section)."""
    parser.add_argument("--method", help=f"de-identification method: {', '.join(_method_names())} "
                                         "(default: remodel)")
    parser.add_argument("--brain-mask", type=Path, metavar="PATH",
                        help="use this brain mask (non-zero = brain) instead of the built-in extractor")
    parser.add_argument("--margin-mm", type=float, default=DEFAULT_MARGIN_MM, metavar="MM",
                        help=f"dilate the brain mask by MM millimetres; that region is copied exactly "
                             f"(default {DEFAULT_MARGIN_MM})")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output")
    parser.add_argument("--model", type=Path, metavar="PATH", help="generator weights (.safetensors) for remodel")
    parser.add_argument("--rotations", type=int, metavar="K", help="random rotations for the head surface (remodel)")
    parser.add_argument("--facets", type=int, metavar="N", help="hull facets carving the head shape (remodel)")
    parser.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID when the folder holds several")
    parser.add_argument("--shift-dates", action="store_true",
                        help="DICOM output: keep dates shifted by one random offset per run instead of removing "
                             "them (the offset is recorded nowhere)")
    parser.add_argument("--qa", type=Path, metavar="DIR", help="write before/after face renderings into DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="De-identify head MRI: remodel the face, keep every "
                                     "brain voxel bit-identical, keep the input's grid.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="de-identify one scan (file or DICOM folder)")
    run.add_argument("input", type=Path, metavar="INPUT")
    run.add_argument("output", type=Path, metavar="OUTPUT")
    add_run_options(run)
    run.add_argument("--save-brain-mask", type=Path, metavar="PATH",
                     help="write the region copied exactly from the input (uint8, input grid)")
    run.add_argument("--save-face-mask", type=Path, metavar="PATH",
                     help="write the region the method changed (uint8, input grid)")

    batch = commands.add_parser("batch", help="de-identify a folder or a BIDS dataset")
    batch.add_argument("input", type=Path, metavar="INPUT_DIR_OR_BIDS")
    batch.add_argument("output", type=Path, metavar="OUTPUT_DIR")
    add_run_options(batch)
    batch.add_argument("--shard", metavar="I/N", help="process only shard I of N (0 <= I < N), for array jobs")

    demo = commands.add_parser("demo", help="de-identify the embedded default scan, with QA renders")
    demo.add_argument("output", type=Path, nargs="?", default=Path("demo-output"), metavar="OUTPUT_DIR")
    demo.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    demo.add_argument("--method", help="method to demonstrate (default: the default method)")

    commands.add_parser("methods", help="list the registered methods")
    commands.add_parser("train", help="train the generator (see `mri-deidentify train --help`)", add_help=False)
    commands.add_parser("evaluate", help="privacy and fidelity evaluation (see `mri-deidentify evaluate --help`)",
                        add_help=False)
    return parser


def options_from(args: argparse.Namespace) -> dict:
    options = {}
    for name in ("model", "rotations", "facets"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = str(value) if isinstance(value, Path) else value
    return options


def check_method(args: argparse.Namespace) -> None:
    """Fail at once on an unusable method or model (InputError), before any scan is read."""
    from .devices import resolve_device
    from .methods import get_method
    get_method(args.method).check(options_from(args), resolve_device(args.device))


def progress_printer(label: str = "") -> Callable[[str, float], None]:
    """Progress on stderr: one line per stage start (a bar is drawn by ``batch`` over scans)."""
    def report(stage: str, fraction: float) -> None:
        if fraction == 0.0:
            print(f"{PROG}: {label}{stage}...", file=sys.stderr, flush=True)
    return report


class DicomRun:
    """What every DICOM series of one invocation shares: the UID map (series of a study stay together) and
    the date offset (intervals between studies survive, the absolute dates do not)."""

    def __init__(self, shift_dates: bool = False) -> None:
        from .dicom import UIDMap
        self.uid_map = UIDMap()
        self.date_shift_days = -(secrets.randbelow(3650) + 1) if shift_dates else None


def run_one(input_path: Path, output: Path, args: argparse.Namespace, *, quiet: bool = False,
            save_brain_mask: Optional[Path] = None, save_face_mask: Optional[Path] = None,
            qa_dir: Optional[Path] = None, dicom_run: Optional[DicomRun] = None,
            series: Optional[str] = None) -> dict:
    """Read, de-identify and write one scan; returns its provenance. Raises InputError for unusable input.

    ``series``: the DICOM series to read from a folder holding several (default: ``args.series``)."""
    from .pipeline import deidentify
    from .reader import format_of, read_volume
    from .writer import OutputSet, check_output_path, write_image

    started = time.perf_counter()
    check_output_path(output, input_path)
    for extra in (save_brain_mask, save_face_mask):
        if extra is not None:
            check_output_path(extra, input_path)
            format_of(extra)
    out_format = "dicom" if not _has_image_suffix(output) else format_of(output)
    if out_format == "dicom" and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output}: the DICOM output folder exists and is not empty")
    if qa_dir is not None:
        from . import render  # noqa: F401  (fail before the work when the renderer cannot load)
    check_method(args)

    volume = read_volume(input_path, series or getattr(args, "series", None))
    if out_format == "dicom" and volume.format != "dicom":
        raise InputError(f"{output}: DICOM output needs DICOM input; give an output file name such as "
                         "scan_deid.nii.gz")
    read_seconds = time.perf_counter() - started
    mask = read_volume(args.brain_mask).image if getattr(args, "brain_mask", None) else None
    result = deidentify(volume.image, args.method, brain_mask=mask, margin_mm=args.margin_mm, seed=args.seed,
                        device=args.device, options=options_from(args),
                        progress=None if quiet else progress_printer())
    record = result.provenance
    record["timings_s"] = {"read": round(read_seconds, 4), **record["timings_s"]}
    marker = provenance.marker(record["method"])

    write_start = time.perf_counter()
    with OutputSet() as outputs:
        if out_format == "dicom":
            from . import dicom
            dicom_run = dicom_run or DicomRun(getattr(args, "shift_dates", False))
            dicom.write_series(result.image, volume.dicom, outputs.path(output), method=record["method"],
                               tool_version=__version__, uid_map=dicom_run.uid_map,
                               date_shift_days=dicom_run.date_shift_days)
        else:
            write_image(result.image, outputs.path(output), marker)
        if save_brain_mask is not None:
            write_image(result.brain_mask, outputs.path(save_brain_mask), marker)
        if save_face_mask is not None:
            write_image(result.face_mask, outputs.path(save_face_mask), marker)
        if qa_dir is not None:
            from .render import write_qa
            write_qa(volume.image, result.image, outputs.path(qa_dir))
        record["timings_s"]["write"] = round(time.perf_counter() - write_start, 4)
        record["timings_s"]["wall"] = round(time.perf_counter() - started, 4)
        outputs.path(provenance.sidecar_path(output)).write_text(provenance.to_json(record), encoding="utf-8")
    return record


def _has_image_suffix(path: Path) -> bool:
    from .reader import IMAGE_SUFFIXES
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def cmd_run(args: argparse.Namespace) -> int:
    record = run_one(args.input, args.output, args, save_brain_mask=args.save_brain_mask,
                     save_face_mask=args.save_face_mask, qa_dir=args.qa)
    timings = record["timings_s"]
    print(f"{PROG}: wrote {args.output} ({record['method']}, {record['device']}, {timings['wall']:.1f} s)",
          file=sys.stderr)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch
    return run_batch(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args)


def cmd_methods(_: argparse.Namespace) -> int:
    from .methods import METHODS, default_method
    default = default_method()
    for method in METHODS.values():
        flag = " (default)" if method.name == default else ""
        print(f"{method.name}{flag}\t{method.summary} — {method.role}")
    return 0


COMMANDS = {"run": cmd_run, "batch": cmd_batch, "demo": cmd_demo, "methods": cmd_methods}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:
            from .train import main as train_main
            return int(train_main(argv[1:]) or 0)
        if argv[:1] == ["evaluate"]:
            from .evaluation import main as evaluate_main
            return int(evaluate_main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except InputError as error:
        # The contract is one line: library messages (nibabel, ITK) sometimes carry line breaks.
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except Cancelled as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:  # the contract: one line and exit 1; the traceback on request
        if os.environ.get("MRIDEIDENTIFY_DEBUG"):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG}: internal error: {type(error).__name__}: {reason} "
              "(set MRIDEIDENTIFY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
