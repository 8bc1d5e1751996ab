"""Time per stage and peak memory of `mri-deidentify run`, per head and per registered method, on CPU.

Each case runs the real command in a fresh process (limited to ``--threads`` threads and, where the machine
has more cores, pinned to that many), so import cost and peak RSS are those a user sees. Stage times come
from the sidecar JSON (``timings_s``); peak RSS is the child's ``ru_maxrss`` from ``os.wait4``.

Heads: the 1 mm shared heads, plus a 0.5 mm head this script makes by resampling the first one with
SimpleITK (linear) into a temporary folder. Prints Markdown tables and, per 1 mm head, a sanity line (<= 30 s on
2 cores, <= 3 GB); the product's time target is relative to deepbet alone, measured by bench_run.py.

    .venv/bin/python benchmarks/bench_pipeline.py            # every 1 mm head + the 0.5 mm head, every method
    .venv/bin/python benchmarks/bench_pipeline.py --quick    # one 1 mm head, every method
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from MRIDeIdentifyLib.provenance import sidecar_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MRIDeIdentify" / "Testing" / "Python"))
from conftest import SHARED_DATA as SHARED  # noqa: E402  (the one place that knows where the scans are)

HEADS_1MM = ("S01_chris_t1_mricron.nii.gz", "S12_colin27_ch2.nii.gz", "T03_fsl_MNI152_T1_1mm.nii.gz")
HALF_MM_SOURCE = HEADS_1MM[0]
# Stages the pipeline itself times; every other key of timings_s is one of the method's own stages.
PIPELINE_STAGES = ("read", "head mask", "brain mask", "composite", "write")
NOT_STAGES = ("total", "wall")
TARGET_SECONDS, TARGET_GB = 30.0, 3.0


@dataclass
class Case:
    head: str
    path: Path
    method: str
    shape: str = ""
    spacing: str = ""
    exit_code: Optional[int] = None
    error: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    process_wall_s: float = 0.0
    peak_rss_gb: float = 0.0

    @property
    def method_stages(self) -> Dict[str, float]:
        return {k: v for k, v in self.timings.items() if k not in PIPELINE_STAGES + NOT_STAGES}


def registered_methods() -> List[str]:
    from MRIDeIdentifyLib.methods import method_names

    return method_names()


def make_half_mm(source: Path, folder: Path) -> Path:
    """``source`` resampled to 0.5 mm voxels over the same physical box (linear, same pixel type)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    factor = [s / 0.5 for s in image.GetSpacing()]
    size = [int(round(n * f)) for n, f in zip(image.GetSize(), factor)]
    # Keep the box: the first new voxel centre sits a quarter of an old voxel before the old one.
    origin = image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 / f for f in factor])
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing([0.5] * 3)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(origin)
    half = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, image.GetPixelID())
    target = folder / source.name.replace(".nii.gz", "_0.5mm.nii.gz")
    sitk.WriteImage(half, str(target), useCompression=True)
    return target


def describe(path: Path) -> tuple:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape = "x".join(str(n) for n in reader.GetSize()[:3])
    spacing = "x".join(f"{s:g}" for s in reader.GetSpacing()[:3])
    return shape, spacing


def child_environment(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[name] = str(threads)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("MRIDEIDENTIFY_DEBUG", None)
    return env


@dataclass
class Fresh:
    """One command run in a fresh process: exit code, wall and CPU seconds, peak RSS, output lines."""

    exit_code: int
    wall_s: float
    cpu_s: float
    peak_rss_gb: float
    lines: List[str]


def run_fresh(command: List[str], threads: int, env: Optional[Dict[str, str]] = None) -> Fresh:
    """Run ``command`` in a fresh process limited to ``threads`` threads (pinned to that many cores where the
    machine has more) and measure it as a user would wait for it. ``env``: default ``child_environment``."""
    cores = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else None

    def pin() -> None:
        if cores:
            os.sched_setaffinity(0, cores)

    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=log, stderr=log, env=env or child_environment(threads), cwd=str(REPO), preexec_fn=pin
        )
        # wait4 gives this child's own usage (getrusage(RUSAGE_CHILDREN) is the maximum over all children).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        lines = [line for line in log.read().splitlines() if line.strip()]
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    rss = usage.ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)
    return Fresh(os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, rss, lines)


def run_case(case: Case, threads: int, workdir: Path) -> None:
    """Run one ``mri-deidentify run`` in a fresh process and fill in the case's timings and memory."""
    output = workdir / f"{case.method}_{case.path.name}"
    fresh = run_fresh(
        [
            sys.executable,
            "-m",
            "MRIDeIdentifyLib",
            "run",
            str(case.path),
            str(output),
            "--method",
            case.method,
            "--device",
            "cpu",
            "--seed",
            "0",
        ],
        threads,
    )
    case.exit_code, case.process_wall_s, case.peak_rss_gb = fresh.exit_code, fresh.wall_s, fresh.peak_rss_gb
    if fresh.exit_code != 0:
        case.error = fresh.lines[-1] if fresh.lines else f"exit {fresh.exit_code}"
        return
    sidecar = sidecar_path(output)
    case.timings = json.loads(sidecar.read_text())["timings_s"]
    output.unlink()
    sidecar.unlink()


def fmt(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds:.2f}"


def table(cases: List[Case]) -> str:
    head = (
        "| head | size | spacing mm | method | read | head mask | brain mask | method | composite | write "
        "| other | run wall | process wall | peak RSS GB |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        if c.exit_code != 0:
            error = c.error.replace("|", "/")[:100]
            rows.append(
                f"| {c.head} | {c.shape} | {c.spacing} | {c.method} | failed: {error} |"
                + " |" * 8
                + f" {c.peak_rss_gb:.2f} |"
            )
            continue
        t = c.timings
        staged = sum(v for k, v in t.items() if k not in NOT_STAGES)
        rows.append(
            f"| {c.head} | {c.shape} | {c.spacing} | {c.method} | {fmt(t.get('read'))} "
            f"| {fmt(t.get('head mask'))} | {fmt(t.get('brain mask'))} | {fmt(sum(c.method_stages.values()))} "
            f"| {fmt(t.get('composite'))} | {fmt(t.get('write'))} | {fmt(t['wall'] - staged)} | {fmt(t['wall'])} "
            f"| {fmt(c.process_wall_s)} | {c.peak_rss_gb:.2f} |"
        )
    return "\n".join(rows)


def stage_table(cases: List[Case]) -> str:
    rows = ["| head | method | method stages (s) |", "|---|---|---|"]
    for c in cases:
        if c.exit_code == 0 and c.method_stages:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in c.method_stages.items())
            rows.append(f"| {c.head} | {c.method} | {stages} |")
    return "\n".join(rows)


def verdict(cases: List[Case]) -> List[str]:
    lines = []
    for c in cases:
        if c.spacing.split("x") != ["1", "1", "1"] or c.exit_code != 0:
            continue
        ok = c.process_wall_s <= TARGET_SECONDS and c.peak_rss_gb <= TARGET_GB
        lines.append(
            f"- {c.head} / {c.method}: {c.process_wall_s:.1f} s, {c.peak_rss_gb:.2f} GB -> "
            f"{'meets' if ok else 'MISSES'} the target ({TARGET_SECONDS:g} s, {TARGET_GB:g} GB)"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 1 mm head, no 0.5 mm head")
    parser.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    parser.add_argument(
        "--heads", help="comma-separated file names in the shared heads folder (default: the 1 mm ones)"
    )
    parser.add_argument("--no-half-mm", action="store_true", help="skip the 0.5 mm head")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run (default 2)")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)

    heads_dir = SHARED / "heads"
    if not heads_dir.is_dir():
        print(f"bench_pipeline: skipped: shared head scans not found at {SHARED} (set MRIDEIDENTIFY_SHARED_DATA)")
        return 0
    methods = args.methods.split(",") if args.methods else registered_methods()
    names = args.heads.split(",") if args.heads else list(HEADS_1MM[:1] if args.quick else HEADS_1MM)
    half_mm = not (args.quick or args.no_half_mm or args.heads)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as temp:
        workdir = Path(temp)
        paths = {name: heads_dir / name for name in names}
        if half_mm:
            made = make_half_mm(heads_dir / HALF_MM_SOURCE, workdir)
            paths[f"{made.name} (made here)"] = made
        cases = []
        for label, path in paths.items():
            shape, spacing = describe(path)
            for method in methods:
                case = Case(label, path, method, shape, spacing)
                print(f"bench_pipeline: {label} / {method} ...", file=sys.stderr, flush=True)
                run_case(case, args.threads, workdir)
                cases.append(case)
                # Each row as it comes, so a long run interrupted part-way still leaves its figures.
                print(table([case]).splitlines()[-1], file=sys.stderr, flush=True)

    import torch

    print(f"### `mri-deidentify run` on CPU, {args.threads} threads per run\n")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs on the machine, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. "
        "Seconds per stage from the sidecar's `timings_s`; *other*: not in any stage (set-up, loading); "
        "*run wall* is read to written inside the command, "
        "*process wall* adds interpreter start and imports; peak RSS of the whole process.\n"
    )
    print(table(cases))
    print()
    print(stage_table(cases))
    print()
    print("\n".join(verdict(cases)))
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ | {"path": str(c.path)} for c in cases], indent=2))
    return 1 if any(c.exit_code != 0 for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
