"""The Slicer panel's run (the engine in a child process) against the plain command line, and Cancel's latency.

The panel's path is taken as the panel takes it, on a real slicer-core scene: the head is loaded into a volume node,
``Logic.startProcess`` writes it to temporary files and starts ``MRIDeIdentifySlicer.worker`` in a child Python,
the main thread reads the child's events every 100 ms (between reads it sleeps in a C call that keeps Python's
interpreter lock, as Slicer's idle Qt loop does: a worker thread of this process could not run meanwhile), and
``Logic.finishProcess`` fills the output node. The command line is
``python -m MRIDeIdentifyLib run HEAD OUT --method remodel --device cpu`` in a fresh process. Both run in turn,
several times, on the same scan with the same thread limit.

Cancel: a remodel run is started and cancelled at a different moment each time (during the brain extractor, the
generator, ...); the latency is from the Cancel call to the child's process gone.

    python benchmarks/bench_slicer_child.py              # 3 runs each, 5 cancels
    python benchmarks/bench_slicer_child.py --quick      # 1 run each, 2 cancels
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MRIDeIdentify" / "Testing" / "Python"))

from conftest import HEADS_DIR  # noqa: E402

DEFAULT_HEAD = HEADS_DIR / "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz"
POLL_S = 0.1
CANCEL_STAGES = ("brain mask", "privacy transform", "generator", "head mask", "to native")


# A C library loaded with PyDLL keeps the interpreter lock during its calls (CDLL would release it).
_LIBC = ctypes.PyDLL(ctypes.util.find_library("c")) if os.name == "posix" else None


def idle_holding_the_lock(seconds: float) -> None:
    """Sleep ``seconds`` without releasing Python's interpreter lock, as Slicer's main thread idles in Qt."""
    if _LIBC is not None:
        _LIBC.usleep(int(seconds * 1e6))
    else:
        time.sleep(seconds)


def panel_run(logic, node, method: str) -> Dict[str, float]:
    start = time.perf_counter()
    run = logic.startProcess(node, None, method, device="cpu")
    while not run.finished():
        idle_holding_the_lock(POLL_S)
        run.poll()
    outcome = logic.finishProcess(run)
    wall = time.perf_counter() - start
    node.GetScene().RemoveNode(outcome.outputVolumeNode)
    return {
        "wall": wall,
        "startup": outcome.startupSeconds or float("nan"),
        "engine": float(outcome.provenance["timings_s"]["total"]),
    }


def cli_run(head: Path, method: str, out_dir: Path) -> Dict[str, float]:
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "MRIDeIdentifyLib",
            "run",
            str(head),
            str(out_dir / "out.nii.gz"),
            "--method",
            method,
            "--device",
            "cpu",
        ],
        check=True,
        capture_output=True,
    )
    return {"wall": time.perf_counter() - start}


def cancel_latency(logic, node, method: str, stage: str) -> Dict[str, float]:
    """Start a run, cancel it once ``stage`` has started (or at the end of the run's events), time the end."""
    run = logic.startProcess(node, None, method, device="cpu")
    while run.stage != stage and not run.finished():
        idle_holding_the_lock(0.02)
        run.poll()
    if run.finished():
        logic.cancelProcess()
        return {"stage": stage, "latency": float("nan")}
    idle_holding_the_lock(0.3)
    start = time.perf_counter()
    run.cancel()
    latency = time.perf_counter() - start
    assert run.process.poll() is not None
    logic.cancelProcess()  # forget the run and remove its files
    return {"stage": stage, "latency": latency}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--method", default="remodel")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cancels", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="thread limit for both paths (OMP/MKL/ITK)")
    parser.add_argument("--quick", action="store_true", help="1 run each, 2 cancels")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.cancels = 1, 2
    if not args.head.is_file():
        print(f"skipped: {args.head} not found (shared data)", file=sys.stderr)
        return 0
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(args.threads)

    from slicer_scene import HeadlessSlicer, import_module_file

    module = import_module_file()
    scene = HeadlessSlicer()
    logic = module.MRIDeIdentifyLogic()
    node = scene.load_volume(args.head)
    logic.availableMethods()  # the panel has the registry (and torch) imported since it opened
    panel: List[Dict[str, float]] = []
    cli: List[Dict[str, float]] = []
    with tempfile.TemporaryDirectory() as out:
        for index in range(args.runs):
            order = ("panel", "cli") if index % 2 == 0 else ("cli", "panel")
            for path in order:
                print(f"run {index + 1}: {path}...", file=sys.stderr, flush=True)
                if path == "panel":
                    panel.append(panel_run(logic, node, args.method))
                else:
                    cli.append(cli_run(args.head, args.method, Path(out)))
    cancels = []
    for index in range(args.cancels):
        stage = CANCEL_STAGES[index % len(CANCEL_STAGES)]
        print(f"cancel {index + 1} during {stage}...", file=sys.stderr, flush=True)
        cancels.append(cancel_latency(logic, node, args.method, stage))
    scene.close()

    print(f"\n### Panel (child process) vs command line: `{args.method}` on {args.head.name}\n")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads per run, "
        f"CPU, Python {platform.python_version()}\n"
    )
    print("| run | panel wall s | child start-up s | engine s (sidecar total) | CLI wall s | panel / CLI |")
    print("|---|---|---|---|---|---|")
    for index, (p, c) in enumerate(zip(panel, cli)):
        print(
            f"| {index + 1} | {p['wall']:.1f} | {p['startup']:.1f} | {p['engine']:.1f} | {c['wall']:.1f} | "
            f"{p['wall'] / c['wall']:.2f} |"
        )
    ratio = statistics.median(p["wall"] for p in panel) / statistics.median(c["wall"] for c in cli)
    print(
        f"\nMedian panel / CLI: **{ratio:.2f}**; median child start-up (spawn to engine imported): "
        f"{statistics.median(p['startup'] for p in panel):.1f} s.\n"
    )
    print("| cancel | during | latency s (Cancel to process gone) |")
    print("|---|---|---|")
    for index, cancel in enumerate(cancels):
        print(f"| {index + 1} | {cancel['stage']} | {cancel['latency']:.3f} |")
    measured = [c["latency"] for c in cancels if c["latency"] == c["latency"]]
    if measured:
        print(f"\nCancel latency: median {statistics.median(measured):.3f} s, max {max(measured):.3f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
