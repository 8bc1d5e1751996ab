"""The ``mri-deidentify`` command line: the contract in product.md, nothing more.

Exit status: 0 success; 2 bad usage or unusable input (one line on stderr, nothing written); 1 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .devices import DEVICE_CHOICES, DEVICE_HELP
from .errors import PROG, Cancelled, InputError, OneLineParser
from .settings import (
    DEFAULT_DEVICE,
    DEFAULT_FACETS,
    DEFAULT_MARGIN_MM,
    DEFAULT_METHOD,
    DEFAULT_ROTATIONS,
    DEFAULT_SEED,
    Settings,
)


def _method_names() -> List[str]:
    from .methods import method_names

    return method_names()


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``batch`` (and the Slicer panel's Advanced section)."""
    parser.add_argument(
        "--method", help=f"de-identification method: {', '.join(_method_names())} (default: {DEFAULT_METHOD})"
    )
    parser.add_argument(
        "--brain-mask",
        type=Path,
        metavar="PATH",
        help="use this brain mask (non-zero = brain) instead of the built-in extractor",
    )
    parser.add_argument(
        "--margin-mm",
        type=float,
        default=DEFAULT_MARGIN_MM,
        metavar="MM",
        help=f"dilate the brain mask by MM millimetres; that region is copied exactly (default {DEFAULT_MARGIN_MM})",
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="random seed; the same seed gives the same output"
    )
    parser.add_argument("--model", type=Path, metavar="PATH", help="generator weights (.safetensors) for remodel")
    parser.add_argument(
        "--rotations",
        type=int,
        metavar="K",
        help=f"random rotations for the head surface (remodel; default {DEFAULT_ROTATIONS})",
    )
    parser.add_argument(
        "--facets",
        type=int,
        metavar="N",
        help=f"hull facets carving the head shape (remodel; default {DEFAULT_FACETS})",
    )
    parser.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID when the folder holds several")
    parser.add_argument(
        "--shift-dates",
        action="store_true",
        help="DICOM output: keep dates shifted by one random offset per run instead of removing "
        "them (the offset is recorded nowhere)",
    )
    parser.add_argument("--qa", type=Path, metavar="DIR", help="write before/after face renderings into DIR")


def _add_deidentify_command(
    commands: argparse._SubParsersAction, name: str, help: str, input_metavar: str, output_metavar: str
) -> argparse.ArgumentParser:
    """A command that de-identifies its INPUT path into its OUTPUT path with the run options (``run``, ``batch``)."""
    command = commands.add_parser(name, help=help)
    command.add_argument("input", type=Path, metavar=input_metavar)
    command.add_argument("output", type=Path, metavar=output_metavar)
    add_run_options(command)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="De-identify head MRI: remodel the face, keep every "
        "brain voxel bit-identical, keep the input's grid.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _add_deidentify_command(commands, "run", "de-identify one scan (file or DICOM folder)", "INPUT", "OUTPUT")
    run.add_argument(
        "--save-brain-mask",
        type=Path,
        metavar="PATH",
        help="write the region copied exactly from the input (uint8, input grid)",
    )
    run.add_argument(
        "--save-face-mask", type=Path, metavar="PATH", help="write the region the method changed (uint8, input grid)"
    )

    batch = _add_deidentify_command(
        commands, "batch", "de-identify a folder or a BIDS dataset", "INPUT_DIR_OR_BIDS", "OUTPUT_DIR"
    )
    batch.add_argument(
        "--shard",
        metavar="I/N",
        help="process only shard I of N (0 <= I < N), for array jobs; "
        "shards may run at the same time into one OUTPUT_DIR",
    )
    batch.add_argument(
        "--jobs",
        default="1",
        metavar="N",
        help="worker processes on this machine, each with its share of the CPU threads (default 1); "
        "auto: as many as the cores and the free memory allow",
    )
    batch.add_argument(
        "--participant-label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="BIDS input: only these participants (with or without the sub- prefix)",
    )
    batch.add_argument(
        "--session-label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="BIDS input: only these sessions (with or without the ses- prefix)",
    )

    demo = commands.add_parser("demo", help="de-identify the embedded default scan, with QA renders")
    demo.add_argument("output", type=Path, nargs="?", default=Path("demo-output"), metavar="OUTPUT_DIR")
    demo.add_argument("--device", choices=DEVICE_CHOICES, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    demo.add_argument("--method", help="method to demonstrate (default: the default method)")

    commands.add_parser("methods", help="list the registered methods")
    commands.add_parser("train", help="train the generator (see `mri-deidentify train --help`)", add_help=False)
    commands.add_parser(
        "evaluate", help="privacy and fidelity evaluation (see `mri-deidentify evaluate --help`)", add_help=False
    )
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from .onescan import run_one

    record = run_one(
        args.input,
        args.output,
        Settings.from_namespace(args),
        save_brain_mask=args.save_brain_mask,
        save_face_mask=args.save_face_mask,
        qa_dir=args.qa,
    )
    timings = record["timings_s"]
    print(
        f"{PROG}: wrote {args.output} ({record['method']}, {record['device']}, {timings['wall']:.1f} s)",
        file=sys.stderr,
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import parse_jobs, run_batch

    return run_batch(
        args.input,
        args.output,
        Settings.from_namespace(args),
        qa=args.qa,
        shard=args.shard,
        jobs=parse_jobs(args.jobs),
        participants=args.participant_label,
        sessions=args.session_label,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.output, Settings.from_namespace(args))


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
        print(
            f"{PROG}: internal error: {type(error).__name__}: {reason} (set MRIDEIDENTIFY_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
