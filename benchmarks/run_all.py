"""Run every ``benchmarks/bench_*.py`` in turn and print their tables (`make bench`).

Each benchmark runs in its own process, one at a time (they measure time and memory, so they must not
compete), with the arguments given here passed through (e.g. ``--quick``). Exit status: 0 when every
benchmark exited 0, else 1 (the others still run).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py and print their tables.")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (a short run)")
    parser.add_argument("--only", help="comma-separated benchmark names, e.g. pipeline (for bench_pipeline.py)")
    args = parser.parse_args(argv)

    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{name.strip()}.py" for name in args.only.split(",")}
        missing = wanted - {s.name for s in scripts}
        if missing:
            print(f"run_all: no such benchmark: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.name in wanted]
    failed = []
    for script in scripts:
        print(f"\n## {script.stem}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *(["--quick"] if args.quick else [])])
        print(f"\n({script.name}: exit {code}, {time.perf_counter() - start:.0f} s)", flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print(f"\nrun_all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
