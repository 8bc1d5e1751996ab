"""The whole `mri-deidentify run` against deepbet brain extraction alone, on a 1 mm 256x256x170 head, on CPU.

The product's target: a whole run, as a fresh process as a user starts it, takes at most twice the time of
deepbet brain extraction alone on the same machine, with at most 3 GB peak RSS. Each repeat runs, back to
back and each in a fresh process limited to ``--threads`` threads: deepbet's own ``BrainExtraction`` (what
``deepbet-cli`` runs: read, two networks, write the mask), the engine's brain mask alone (read, the same
networks on a 1 mm RAS copy, write the mask), then ``run`` with each method. The ratio is taken within each
repeat and its median reported, so a machine that slows down between repeats does not bias it.

The head is made here, never stored: the shared 1 mm ``S01_chris_t1_mricron`` resampled (linear) onto a
256x256x170 grid of 1 mm voxels laid out as a sagittal scan (256 A-P x 256 S-I x 170 R-L, the source's slight
obliquity kept), stored as int16, in a temporary folder deleted afterwards.

deepbet's own runner needs packages the engine does not install (it installs deepbet with --no-deps):
``fill-voids`` and ``connected-components-3d``. Install them, or put them in a folder given with
``--deepbet-deps`` (``pip install --target DIR --no-deps fill-voids fastremap connected-components-3d``);
without them the ratio is taken against the engine's brain mask alone, and the table says so.

    .venv/bin/python benchmarks/bench_run.py                       # 3 repeats, blur and remodel
    .venv/bin/python benchmarks/bench_run.py --quick               # 1 repeat
    .venv/bin/python benchmarks/bench_run.py --repeats 5 --deepbet-deps /tmp/deepbet-deps --json figures.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench_pipeline import NOT_STAGES, PIPELINE_STAGES, SHARED, Fresh, child_environment, run_fresh

from MRIDeIdentifyLib.provenance import sidecar_path

SOURCE = "S01_chris_t1_mricron.nii.gz"
SIZE = (256, 256, 170)
TARGET_RATIO, TARGET_GB = 2.0, 3.0

DEEPBET = (
    "import sys\n"
    "from deepbet import BrainExtraction\n"
    "BrainExtraction(no_gpu=True).run(sys.argv[1], mask_path=sys.argv[2])\n"
)
ENGINE_BRAIN = (
    "import sys\n"
    "import numpy as np, SimpleITK as sitk\n"
    "from MRIDeIdentifyLib.brainmask import extract_brain_mask\n"
    "from MRIDeIdentifyLib.reader import read_volume\n"
    "image = read_volume(sys.argv[1]).image\n"
    "mask = sitk.GetImageFromArray(extract_brain_mask(image, 'cpu').view(np.uint8))\n"
    "mask.CopyInformation(image)\n"
    "sitk.WriteImage(mask, sys.argv[2], useCompression=True)\n"
)


def make_head(source: Path, target: Path) -> None:
    """``source`` resampled onto a 1 mm 256x256x170 sagittal grid centred on it, stored as int16."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    axes = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: the source's voxel axes, R, A, S in LPS
    # Voxel axes pointing P, I and R (a right-handed frame, as a sagittal scanner series).
    direction = np.stack([-axes[:, 1], -axes[:, 2], axes[:, 0]], axis=1)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    reference = sitk.Image(SIZE, sitk.sitkInt16)
    reference.SetSpacing((1.0, 1.0, 1.0))
    reference.SetDirection(direction.ravel().tolist())
    reference.SetOrigin((centre - direction @ (np.asarray(SIZE, float) - 1) / 2).tolist())
    head = sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    sitk.WriteImage(sitk.Cast(sitk.Round(head), sitk.sitkInt16), str(target), useCompression=True)


def deepbet_environment(threads: int, deps: Optional[Path]) -> Dict[str, str]:
    env = child_environment(threads)
    if deps is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(deps), env.get("PYTHONPATH", "")) if p)
    return env


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back repeats (default 3)")
    parser.add_argument("--methods", default="blur,remodel", help="comma-separated methods (default blur,remodel)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per process (default 2)")
    parser.add_argument(
        "--deepbet-deps",
        type=Path,
        metavar="DIR",
        help="folder holding deepbet's own dependencies (fill_voids, cc3d), added to its PYTHONPATH",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    methods = args.methods.split(",")

    source = SHARED / "heads" / SOURCE
    if not source.is_file():
        print(f"bench_run: skipped: {source} not found (set MRIDEIDENTIFY_SHARED_DATA)")
        return 0
    deepbet_env = deepbet_environment(args.threads, args.deepbet_deps)
    probe = run_fresh([sys.executable, "-c", "import deepbet"], args.threads, deepbet_env)
    # name -> (command, environment or None for the default, the run's output whose sidecar holds the stages)
    commands: Dict[str, Tuple[List[str], Optional[Dict[str, str]], Optional[Path]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_run-") as temp:
        folder = Path(temp)
        head = folder / "head_256x256x170_1mm.nii.gz"
        make_head(source, head)
        if probe.exit_code == 0:
            commands["deepbet alone"] = (
                [sys.executable, "-c", DEEPBET, str(head), str(folder / "deepbet.nii.gz")],
                deepbet_env,
                None,
            )
        else:
            print(
                f"bench_run: deepbet's own runner cannot start ({probe.lines[-1] if probe.lines else 'no output'}); "
                "the ratio is taken against the engine's brain mask alone",
                file=sys.stderr,
            )
        commands["engine brain mask alone"] = (
            [sys.executable, "-c", ENGINE_BRAIN, str(head), str(folder / "engine_brain.nii.gz")],
            None,
            None,
        )
        for method in methods:
            output = folder / f"{method}.nii.gz"
            commands[f"run --method {method}"] = (
                [
                    sys.executable,
                    "-m",
                    "MRIDeIdentifyLib",
                    "run",
                    str(head),
                    str(output),
                    "--method",
                    method,
                    "--device",
                    "cpu",
                    "--seed",
                    "0",
                ],
                None,
                output,
            )

        results: Dict[str, List[Fresh]] = {name: [] for name in commands}
        stages: Dict[str, List[Dict[str, float]]] = {name: [] for name in commands}
        for repeat in range(repeats):
            for name, (command, env, output) in commands.items():
                print(f"bench_run: repeat {repeat + 1}/{repeats}: {name} ...", file=sys.stderr, flush=True)
                fresh = run_fresh(command, args.threads, env)
                if fresh.exit_code != 0:
                    print(f"bench_run: {name} failed: {fresh.lines[-1] if fresh.lines else fresh.exit_code}")
                    return 1
                results[name].append(fresh)
                if output is not None:
                    stages[name].append(json.loads(sidecar_path(output).read_text())["timings_s"])
                print(
                    f"bench_run:   {fresh.wall_s:.2f} s wall, {fresh.cpu_s:.2f} s CPU, {fresh.peak_rss_gb:.2f} GB",
                    file=sys.stderr,
                    flush=True,
                )

    reference = "deepbet alone" if "deepbet alone" in results else "engine brain mask alone"
    import torch

    print(
        f"### Whole `run` against deepbet alone: 1 mm {'x'.join(map(str, SIZE))} head, CPU, "
        f"{args.threads} threads per process\n"
    )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs on the machine, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
        f"median of {repeats} back-to-back repeat(s); ratio: wall time over *{reference}* in the same repeat.\n"
    )
    rows = ["| command | wall s | CPU s | peak RSS GB | ratio |", "|---|---|---|---|---|"]
    figures = {}
    for name, runs in results.items():
        ratios = [r.wall_s / ref.wall_s for r, ref in zip(runs, results[reference])]
        figures[name] = {
            "wall_s": [r.wall_s for r in runs],
            "cpu_s": [r.cpu_s for r in runs],
            "peak_rss_gb": [r.peak_rss_gb for r in runs],
            "ratio": ratios,
            "timings_s": stages[name],
        }
        rows.append(
            f"| {name} | {median(figures[name]['wall_s']):.2f} | {median(figures[name]['cpu_s']):.2f} "
            f"| {max(figures[name]['peak_rss_gb']):.2f} | {median(ratios):.2f} |"
        )
    print("\n".join(rows))

    runs = [name for name in results if name.startswith("run ")]
    names: List[str] = []
    for name in runs:
        for timings in stages[name]:
            names += [k for k in timings if k not in NOT_STAGES and k not in PIPELINE_STAGES and k not in names]
    columns = ["start-up and exit", "read", "head mask", "brain mask", *names, "composite", "write"]
    print(
        "\nSeconds per stage (median; from the sidecar's `timings_s`; *start-up and exit*: the process wall time "
        "outside the command's own timing: interpreter, imports, argument and model checks)\n"
    )
    print("| command | " + " | ".join(columns) + " | run wall | process wall |")
    print("|---|" + "---|" * (len(columns) + 2))
    for name in runs:
        timings = stages[name]
        cells = [median([r.wall_s - t["wall"] for r, t in zip(results[name], timings)])]
        cells += [
            median([t[c] for t in timings if c in t]) if any(c in t for t in timings) else None for c in columns[1:]
        ]
        print(
            f"| {name} | "
            + " | ".join("" if c is None else f"{c:.2f}" for c in cells)
            + f" | {median([t['wall'] for t in timings]):.2f} | {median(figures[name]['wall_s']):.2f} |"
        )
    print()
    for name in runs:
        ratio, rss = median(figures[name]["ratio"]), max(figures[name]["peak_rss_gb"])
        ok = ratio <= TARGET_RATIO and rss <= TARGET_GB
        print(
            f"- {name}: {ratio:.2f}x {reference}, {rss:.2f} GB -> {'meets' if ok else 'MISSES'} the target "
            f"(<= {TARGET_RATIO:g}x, <= {TARGET_GB:g} GB)"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
