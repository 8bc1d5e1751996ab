"""``mri-deidentify demo``: the whole pipeline on an embedded default scan, with QA renders.

The scan is the average head shipped in the PyPI ``pydeface`` wheel (MIT): a whole head with face and neck
that identifies no one, so the repository may use it anywhere. It is read from the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .methods import default_method
from .onescan import PROG, run_one
from .settings import Settings


def demo_scan() -> Path:
    from .template import HEAD_FILE, template_dir

    return template_dir() / HEAD_FILE


def run_demo(out: Path, settings: Settings) -> int:
    """De-identify the demo scan into ``out`` (image, brain and face masks, QA renders) with ``settings``."""
    method = settings.method or default_method()
    if method is None:
        method = "blur"
        print(f"{PROG}: the learned 'remodel' is not installed; demonstrating the 'blur' control", file=sys.stderr)
    output = out / "demo_deidentified.nii.gz"
    record = run_one(
        demo_scan(),
        output,
        settings.replace(method=method),
        save_brain_mask=out / "demo_brain_mask.nii.gz",
        save_face_mask=out / "demo_face_mask.nii.gz",
        qa_dir=out / "qa",
    )
    print(
        f"{PROG}: demo: {method} on the pydeface average head in {record['timings_s']['wall']:.1f} s; "
        f"wrote {output}, {out / 'qa'} (before/after renders)",
        file=sys.stderr,
    )
    return 0
