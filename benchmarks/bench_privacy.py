"""Time and peak memory of the privacy transform gamma(x) on the CPU, and the choice of its rotation count.

Heads come from the shared data through the engine's own steps (reader, head threshold and mask, model grid),
so the transform sees what the ``remodel`` method gives it. Each size runs in a fresh process. Peak memory is
the growth of the peak RSS over the inputs already in memory during the first (cold) call (Linux:
``/proc/self/clear_refs`` resets the peak before it). Wall time is the median of ``--repeats`` later runs; CPU
time is the process's user + system time per run. On a shared machine wall time grows with the load and
CPU time with 2 threads includes OpenMP spin-waiting, so ``--threads 1`` CPU time is the cleanest figure of
the work itself.

    .venv/bin/python benchmarks/bench_privacy.py                  # 64/128/256^3, one head, 2 threads
    .venv/bin/python benchmarks/bench_privacy.py --threads 1      # the same on one thread
    .venv/bin/python benchmarks/bench_privacy.py --rotations      # Z accuracy and hull vs rotation count
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MRIDeIdentify"))
sys.path.insert(0, str(REPO / "MRIDeIdentify" / "Testing" / "Python"))
from conftest import SHARED_DATA as SHARED  # noqa: E402  (the one place that knows where the scans are)

DEFAULT_HEAD = "S12_colin27_ch2.nii.gz"
STUDY_HEADS = (
    "S04_robex_ref_T1.nii.gz",
    "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz",
    "S12_colin27_ch2.nii.gz",
    "T07_freesurfer_mni305_cor.mgz",
)


def model_grid_inputs(path: Path, size: int):
    """(volume, head, brain stand-in, threshold) on the model grid, as torch tensors and a float."""
    import torch
    from scipy import ndimage

    from MRIDeIdentifyLib.headmask import head_mask, head_threshold
    from MRIDeIdentifyLib.modelgrid import ModelGrid
    from MRIDeIdentifyLib.reader import read_volume

    image = read_volume(path).image
    threshold = head_threshold(image)
    head = head_mask(image, threshold)
    grid = ModelGrid.around(image, head, size=size)
    volume = grid.to_model(image)
    head_cube = grid.mask_to_model(head, image)
    # The transform's cost does not depend on the brain mask; an eroded head stands in for deepbet's.
    brain = ndimage.binary_erosion(head_cube, iterations=max(1, size // 16))
    return (
        torch.from_numpy(volume),
        torch.from_numpy(head_cube),
        torch.from_numpy(brain),
        float(grid.intensity.normalise(threshold)),
    )


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: Path, size: int, repeats: int, threads: int) -> dict:
    """One size, in this process: wall/CPU seconds and peak RSS growth of privacy_transform."""
    import torch

    from MRIDeIdentifyLib.privacy import privacy_transform

    torch.set_num_threads(threads)
    volume, head, brain, threshold = model_grid_inputs(path, size)
    base = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    privacy_transform(volume, brain, threshold, seed=0)
    peak = _peak_rss_mb()
    walls, cpu0 = [], time.process_time()
    for seed in range(repeats):
        start = time.perf_counter()
        gamma = privacy_transform(volume, brain, threshold, seed=seed + 1)
        walls.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu0) / repeats
    hull = gamma[0].bool()
    return {
        "size": size,
        "wall_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "cpu_s": cpu,
        "peak_extra_mb": peak - base,
        "peak_rss_mb": peak,
        "contains": float((hull & head).sum() / head.sum()),
        "hull_over_head": float(hull.sum() / head.sum()),
    }


def rotation_study(size: int, threads: int) -> None:
    """Z's error against 64 rotations, the hull's containment and volume, and the cost, per rotation count."""
    import torch

    from MRIDeIdentifyLib.privacy import convex_hull_mask, surface_probability

    torch.set_num_threads(threads)
    counts = (1, 2, 4, 8, 16, 32)
    rows = {k: {"err": [], "contains": [], "volume": [], "z_s": []} for k in counts}
    for name in STUDY_HEADS:
        volume, head, _, threshold = model_grid_inputs(SHARED / "heads" / name, size)
        binary = volume >= threshold
        reference = surface_probability(binary, 64, torch.Generator().manual_seed(1000))
        surface = reference > 0
        for k in counts:
            for seed in range(3):
                start = time.process_time()
                z = surface_probability(binary, k, torch.Generator().manual_seed(seed))
                rows[k]["z_s"].append(time.process_time() - start)
                rows[k]["err"].append(float((z - reference)[surface].abs().mean() / reference[surface].mean()))
                hull = convex_hull_mask(z, 100, torch.Generator().manual_seed(seed))
                rows[k]["contains"].append(float((hull & head).sum() / head.sum()))
                rows[k]["volume"].append(float(hull.sum() / head.sum()))
    print(f"\nRotation count at {size}^3, {len(STUDY_HEADS)} heads x 3 seeds, {threads} threads")
    print(
        "| rotations | Z rel. error vs 64 | hull contains head (min) | hull / head volume (mean) | Z CPU s (median) |"
    )
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(
            f"| {k} | {statistics.mean(r['err']):.3f} | {min(r['contains']):.4f} | "
            f"{statistics.mean(r['volume']):.2f} | {statistics.median(r['z_s']):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default=DEFAULT_HEAD, help="file name in shared/data/heads")
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rotations", action="store_true", help="study the rotation count instead")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure one size
    args = parser.parse_args()
    path = SHARED / "heads" / args.head
    if not path.exists():
        sys.exit(f"shared head {path} not found (set MRIDEIDENTIFY_SHARED_DATA)")
    if args.one:
        print(json.dumps(measure(path, args.one, args.repeats, args.threads)))
        return
    if args.rotations:
        rotation_study(128, args.threads)
        return
    load = os.getloadavg()[0]
    print(
        f"privacy_transform on {args.head}, {args.threads} threads, load average {load:.1f} on "
        f"{os.cpu_count()} cores (wall time grows with the load; CPU time does not)"
    )
    print(
        "| grid | wall s (median) | wall s (min) | CPU s | peak RSS growth MB | peak RSS MB | hull contains head |"
        " hull / head volume |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        # Large blocks straight from mmap go back to the system when freed, so the child's RSS follows the
        # memory in use instead of glibc's arena, which keeps what the model-grid resampling freed.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--head",
                args.head,
                "--one",
                str(size),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {size}^3 | {r['wall_s']:.2f} | {r['wall_min_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['peak_extra_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['contains']:.4f} | "
            f"{r['hull_over_head']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
