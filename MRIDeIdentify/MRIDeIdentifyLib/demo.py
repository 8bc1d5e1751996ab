"""``mri-deidentify demo``: the whole pipeline on an embedded default scan, with QA renders.

The scan is the average head shipped in the PyPI ``pydeface`` wheel (MIT): a whole head with face and neck
that identifies no one, so the repository may use it anywhere. It is read from the installed package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .methods import default_method


def demo_scan() -> Path:
    from .template import HEAD_FILE, template_dir
    return template_dir() / HEAD_FILE


def run_demo(args: argparse.Namespace) -> int:
    from .cli import add_run_options, run_one

    method = args.method or default_method()
    if method is None:
        method = "blur"
        print("mri-deidentify: the learned 'remodel' is not installed; demonstrating the 'blur' control",
              file=sys.stderr)
    out: Path = args.output
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    run_args = parser.parse_args(["--method", method, "--device", args.device])
    output = out / "demo_deidentified.nii.gz"
    record = run_one(demo_scan(), output, run_args, save_brain_mask=out / "demo_brain_mask.nii.gz",
                     save_face_mask=out / "demo_face_mask.nii.gz", qa_dir=out / "qa")
    print(f"mri-deidentify: demo: {method} on the pydeface average head in {record['timings_s']['wall']:.1f} s; "
          f"wrote {output}, {out / 'qa'} (before/after renders)", file=sys.stderr)
    return 0
