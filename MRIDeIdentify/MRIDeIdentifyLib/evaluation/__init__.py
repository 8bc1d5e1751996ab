"""``mri-deidentify evaluate``: re-identification attacks, downstream fidelity and cost, per method.

``main(argv)`` is the command; :func:`runner.evaluate` does the work and :mod:`report` writes it up. The
heavy dependencies (dlib-bin, face-recognition-models, antspyx, matplotlib) come with the ``eval`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

from ..devices import DEVICE_CHOICES, DEVICE_HELP
from ..errors import PROG, InputError, OneLineParser


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluate`` options (``mri-deidentify evaluate --help``)."""
    from .attacks import RENDER_SIZE
    from .fidelity import ANALYSIS_SPACING_MM

    parser = OneLineParser(prog=f"{PROG} evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder of head scans; names sharing the prefix before '_' are one person, "
        "a prefix starting with T marks a template (distractor, negative control)",
    )
    parser.add_argument("--methods", required=True, help="comma-separated method names, e.g. blur,skullstrip")
    parser.add_argument("--out", type=Path, required=True, help="report folder (work files are reused: resume)")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the ANTsPy downstream analysis")
    parser.add_argument(
        "--fidelity-spacing-mm",
        type=float,
        default=ANALYSIS_SPACING_MM,
        help="spacing of the downstream analysis (mm, default %(default)s)",
    )
    parser.add_argument("--render-size", type=int, default=RENDER_SIZE, help="render size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", choices=DEVICE_CHOICES, default="auto", help=f"for the methods and the brain masks; {DEVICE_HELP}"
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the evaluation; exit status 0 when the controls passed, 3 when they did not. Bad input raises
    InputError, which the command line reports like every other subcommand's (one line, exit 2)."""
    from .runner import evaluate

    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.data.is_dir():
        raise InputError(f"{args.data}: not a folder")
    needed = ("dlib", "face_recognition_models", "matplotlib") + (() if args.no_fidelity else ("ants",))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"the evaluation needs {', '.join(missing)}: pip install 'mrideidentify[eval]'")
    summary, controls_passed = evaluate(
        args.data,
        methods,
        args.out,
        size=args.render_size,
        run_fidelity=not args.no_fidelity,
        fidelity_spacing_mm=args.fidelity_spacing_mm,
        seed=args.seed,
        device=args.device,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(summary)
    return 0 if controls_passed else 3
