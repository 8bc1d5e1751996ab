"""Throughput and memory of `mri-deidentify batch`: scans per hour and peak memory for --jobs 1 and 2, and the
peak memory over a long batch (after 10, 50 and 100 scans), which must not grow.

Each case runs the real command in a fresh process on a BIDS dataset of links to shared heads made in a
temporary folder (the heads repeated under distinct subject names). While it runs, the script samples every
0.2 s the resident memory of the batch process and each of its worker processes (/proc, Linux) and counts the
finished outputs, so "peak after 10 scans" is the highest memory seen until the 10th output appeared.
Scans per hour count the whole command (start-up, model loading, every scan).

    .venv/bin/python benchmarks/bench_batch.py                 # --jobs 1 and 2 on 16 scans; 100-scan memory curve
    .venv/bin/python benchmarks/bench_batch.py --quick         # --jobs 1 and 2 on 4 scans; 20-scan curve
    .venv/bin/python benchmarks/bench_batch.py --method blur --heads S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MRIDEIDENTIFY_SHARED_DATA", REPO.parent / "shared" / "data"))
# 1 mm heads of distinct people and templates (the 2 mm and 3 mm heads are faster, less representative).
DEFAULT_HEADS = (
    "S01_chris_t1_mricron.nii.gz",
    "S12_colin27_ch2.nii.gz",
    "S13_seg3d_MR_T1.nii.gz",
    "T03_fsl_MNI152_T1_1mm.nii.gz",
)
CHECKPOINTS = (10, 50, 100)


@dataclass
class Run:
    jobs: int
    scans: int
    wall_s: float = 0.0
    exit_code: Optional[int] = None
    peak_total_gb: float = 0.0  # batch process + workers, summed at each sample
    peak_process_gb: float = 0.0  # the largest single process
    at: Dict[int, float] = field(default_factory=dict)  # finished scans -> peak total GB until then

    @property
    def scans_per_hour(self) -> float:
        return self.scans / self.wall_s * 3600 if self.wall_s else 0.0


def make_dataset(root: Path, heads: List[Path], count: int) -> Path:
    for n in range(count):
        anat = root / f"sub-{n:03d}" / "anat"
        anat.mkdir(parents=True)
        head = heads[n % len(heads)]
        suffix = ".mgz" if head.name.endswith(".mgz") else ".nii.gz"
        (anat / f"sub-{n:03d}_T1w{suffix}").symlink_to(head)
    (root / "dataset_description.json").write_text('{"Name": "bench", "BIDSVersion": "1.9.0"}\n')
    return root


def rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> List[int]:
    """``pid`` and every process below it (workers, and the resource tracker multiprocessing starts)."""
    parents: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def finished(out: Path) -> int:
    return sum(1 for p in out.glob("sub-*/anat/*_T1w.*") if not p.name.endswith(".json"))


def run_batch(dataset: Path, out: Path, jobs: int, scans: int, method: Optional[str], threads: int) -> Run:
    command = [
        sys.executable,
        "-m",
        "MRIDeIdentifyLib",
        "batch",
        str(dataset),
        str(out),
        "--jobs",
        str(jobs),
        "--device",
        "cpu",
    ] + (["--method", method] if method else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = Run(jobs, scans)
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while child.poll() is None:
        sizes = [rss_gb(pid) for pid in descendants(child.pid)]
        result.peak_total_gb = max(result.peak_total_gb, sum(sizes))
        result.peak_process_gb = max(result.peak_process_gb, max(sizes, default=0.0))
        done = finished(out) if out.exists() else 0
        for mark in CHECKPOINTS:
            if done >= mark and mark not in result.at:
                result.at[mark] = result.peak_total_gb
        time.sleep(0.2)
    result.wall_s = time.perf_counter() - start
    result.exit_code = child.returncode
    for mark in CHECKPOINTS:
        if finished(out) >= mark and mark not in result.at:
            result.at[mark] = result.peak_total_gb
    if child.returncode != 0:
        print(child.stderr.read() if child.stderr else "", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 scans per --jobs case and a 20-scan curve")
    parser.add_argument("--method", help="method (default: the default method)")
    parser.add_argument("--heads", nargs="+", default=list(DEFAULT_HEADS), help="shared head file names")
    parser.add_argument("--scans", type=int, help="scans per --jobs case (default 16; --quick 4)")
    parser.add_argument("--curve", type=int, help="scans of the memory curve (default 100; --quick 20; 0 = skip)")
    parser.add_argument(
        "--jobs", type=int, nargs="*", default=[1, 2], help="--jobs values to compare (none: the curve only)"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the whole batch (OMP_NUM_THREADS)")
    args = parser.parse_args()
    scans = args.scans or (4 if args.quick else 16)
    curve = args.curve if args.curve is not None else (20 if args.quick else 100)
    heads = [SHARED / "heads" / name for name in args.heads]
    missing = [str(h) for h in heads if not h.is_file()]
    if missing:
        print(f"shared heads not found: {', '.join(missing)} (set MRIDEIDENTIFY_SHARED_DATA)", file=sys.stderr)
        return 2

    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {args.threads} threads for the whole batch; method "
        f"{args.method or 'default'}; heads {', '.join(args.heads)}\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench_batch.") as tmp:
        root = Path(tmp)
        dataset = make_dataset(root / "bids", heads, max(scans, curve))
        subset = make_dataset(root / "subset", heads, scans)
        print("| --jobs | scans | wall s | scans/hour | peak total GB | peak per process GB | exit |")
        print("|---|---|---|---|---|---|---|")
        for jobs in args.jobs:
            print(f"running --jobs {jobs} on {scans} scans", file=sys.stderr)
            r = run_batch(subset, root / f"out-jobs{jobs}", jobs, scans, args.method, args.threads)
            print(
                f"| {jobs} | {scans} | {r.wall_s:.1f} | {r.scans_per_hour:.0f} | {r.peak_total_gb:.2f} | "
                f"{r.peak_process_gb:.2f} | {r.exit_code} |",
                flush=True,
            )
        if curve:
            print(f"running the {curve}-scan memory curve (--jobs 1)", file=sys.stderr)
            r = run_batch(dataset, root / "out-curve", 1, curve, args.method, args.threads)
            marks = [m for m in CHECKPOINTS if m <= curve] or [curve]
            print(
                f"\nPeak resident memory over one {curve}-scan batch (--jobs 1; exit {r.exit_code}, "
                f"{r.wall_s:.0f} s, {r.scans_per_hour:.0f} scans/hour):\n"
            )
            print("| after scans | " + " | ".join(str(m) for m in marks) + " |")
            print("|---|" + "---|" * len(marks))
            print("| peak GB | " + " | ".join(f"{r.at.get(m, float('nan')):.2f}" for m in marks) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
