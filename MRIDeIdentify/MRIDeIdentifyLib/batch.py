"""Batch de-identification of a folder or a BIDS dataset: worker processes, resume, shards that run together.

A BIDS dataset (``sub-*/[ses-*/]anat/*_T1w.*``) is written as a BIDS derivatives dataset with the same
relative paths; a plain folder is mirrored file by file (DICOM series folders become DICOM series folders).
A scan that fails is reported as it fails and the batch goes on; the exit status says whether all succeeded.

Several ``batch`` processes (array-job shards, or reruns) may write into one output folder at the same time:
each scan is staged beside its destination and renamed into place with its sidecar already there; a scan
whose output exists is skipped, whoever wrote it; ``dataset_description.json`` is created once, atomically,
and a later process checks that it describes the same method and settings instead of rewriting it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from . import __version__
from .errors import InputError
from .onescan import PROG, DicomRun, check_method, run_one
from .reader import IMAGE_SUFFIXES, image_stem
from .scans import Scan, inventory
from .settings import Settings

# Peak resident memory of one worker de-identifying 1 mm heads with the default method on the CPU, models loaded,
# plus headroom (benchmarks/bench_batch.py measures it); --jobs auto never starts more workers than fit.
WORKER_MEMORY_GB = 2.0


@dataclass(frozen=True)
class Task:
    """One scan to de-identify: ``described`` names it in messages (relative to the input, never absolute)."""

    scan: Scan
    target: Path
    qa: Optional[Path]
    described: str


def parse_shard(text: str) -> Tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; InputError otherwise."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like I/N (e.g. 0/4), not {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return index, count


def parse_jobs(text: str) -> Optional[int]:
    """``--jobs``: a number of worker processes >= 1, or ``auto`` (None)."""
    if text == "auto":
        return None
    try:
        jobs = int(text)
    except ValueError:
        raise InputError(f"--jobs must be a number of worker processes or auto, not {text!r}") from None
    if jobs < 1:
        raise InputError(f"--jobs {text}: need at least 1 worker process")
    return jobs


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. a cluster allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_budget() -> int:
    """CPU threads the whole batch may use: ``OMP_NUM_THREADS`` where the user set it, else the usable cores."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return usable_cores()


def available_memory_gb() -> Optional[float]:
    """Memory this process may still take, in GB: the OS's ``MemAvailable`` (Linux), or less where the process's
    cgroup (a SLURM allocation, a container) has a lower limit; None where unknown."""
    limits = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(limits) / 1024**3 if limits else None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number.
_NO_LIMIT = 1 << 60


def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as stream:
            lines = [line.strip().split(":", 2) for line in stream]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":
            folder, limit_file, usage_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = int((folder / limit_file).read_text())
            if limit < _NO_LIMIT:
                return limit - int((folder / usage_file).read_text())
        except (OSError, ValueError):  # "max" (v2's no limit), or the file is not visible from here
            pass
    return None


def auto_jobs(pending: int) -> int:
    """``--jobs auto``: one worker per core, no more than the free memory holds (``WORKER_MEMORY_GB`` each)
    and no more than there are scans to do; at least one."""
    jobs = min(usable_cores(), max(pending, 1))
    memory = available_memory_gb()
    if memory is not None:
        jobs = min(jobs, int(memory // WORKER_MEMORY_GB))
    return max(jobs, 1)


def dataset_description(settings: Settings) -> Dict[str, Any]:
    """The derivatives' ``dataset_description.json``: the same for every process of one batch (no dates, no
    paths), with the tool version and the method and settings in ``GeneratedBy`` (provenance)."""
    from .methods import get_method

    method = get_method(settings.method)
    how = (
        f"method {method.name} ({method.summary}); brain mask dilated by {settings.margin_mm:g} mm and copied "
        f"bit for bit; seed {settings.seed}"
    )
    if method.name == "remodel":
        model = settings.model.name if settings.model is not None else "default weights"
        how += f"; model {model}, {settings.rotations} rotations, {settings.facets} facets"
    return {
        "Name": "MRIDeIdentify de-identified derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "MRIDeIdentify",
                "Version": __version__,
                "Description": how,
                "CodeURL": "https://github.com/mrideidentify/SlicerMRIDeIdentify",
            }
        ],
    }


def write_dataset_description(output: Path, settings: Settings) -> None:
    """Create ``output/dataset_description.json`` once: an atomic hard link of a complete file, so concurrent
    shards never see it half-written or overwrite it. One that exists must describe the same method and
    settings (InputError otherwise: one derivatives dataset, one way of making it)."""
    target = output / "dataset_description.json"
    text = json.dumps(dataset_description(settings), indent=2) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".dataset_description.", dir=output)
    staged = Path(name)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    try:
        os.link(staged, target)
    except FileExistsError:
        pass
    finally:
        staged.unlink()
    existing = _read_json(target)
    if existing.get("GeneratedBy") != json.loads(text)["GeneratedBy"]:
        found = (existing.get("GeneratedBy") or [{}])[0]
        raise InputError(
            f"{output}: these derivatives were made by {found.get('Name')} {found.get('Version')} "
            f"({found.get('Description')}); write this batch into another folder"
        )


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot be read as JSON ({error})") from None


def plan(
    root: Path,
    output: Path,
    participants: Sequence[str] = (),
    sessions: Sequence[str] = (),
    shard: Optional[str] = None,
    qa: Optional[Path] = None,
) -> Tuple[List[Task], bool, Dict[str, int]]:
    """The tasks of one batch (this shard's only), whether the input is BIDS, and the skipped BIDS images by
    suffix. Output paths depend on the whole dataset, never on the shard, so shards agree on them."""
    found = inventory(root, participants, sessions)
    # DICOM series are written to folders named by position: export folder names often carry the patient's name.
    numbers = {scan: n for n, scan in enumerate(s for s in found.scans if s.is_dicom)}
    tasks = []
    for scan in found.scans:
        relative = Path(f"dicom-series-{numbers[scan]:04d}") if scan in numbers else scan.path.relative_to(root)
        qa_dir = qa / relative.parent / image_stem(relative) if qa else None
        tasks.append(Task(scan, output / relative, qa_dir, scan.describe(root)))
    if shard:
        index, count = parse_shard(shard)
        tasks = tasks[index::count]
    return tasks, found.bids, found.skipped


def run_batch(
    root: Path,
    output: Path,
    settings: Settings,
    *,
    qa: Optional[Path] = None,
    shard: Optional[str] = None,
    jobs: Optional[int] = 1,
    participants: Sequence[str] = (),
    sessions: Sequence[str] = (),
) -> int:
    """The ``batch`` command. ``jobs``: worker processes (None = auto). Exit 0 when every scan succeeded or was
    already done; 1 when any failed; 130 when interrupted (Ctrl-C, SIGTERM); InputError (exit 2) before any
    work for unusable arguments."""
    tasks, bids, skipped_images = plan(root, output, participants, sessions, shard, qa)
    if not tasks:
        raise InputError(
            f"{root}: no scans found (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders"
            f"{'; BIDS: sub-*/[ses-*/]anat/*_T1w.*' if bids else ''})"
        )
    if output.resolve() == root.resolve() or root.resolve() in output.resolve().parents:
        raise InputError(f"{output}: the output folder may not be the input folder or inside it")
    # A bad method or model would fail every scan alike: say so once, before writing anything.
    check_method(settings)
    if bids:
        write_dataset_description(output, settings)
    dicom_run = DicomRun.new(settings.shift_dates) if any(t.scan.is_dicom for t in tasks) else None
    pending = [t for t in tasks if not t.target.exists()]
    workers = min(auto_jobs(len(pending)) if jobs is None else jobs, max(len(pending), 1))

    counts = {"done": 0, "skipped": len(tasks) - len(pending), "failed": 0}
    failures: List[Tuple[str, str]] = []
    bar = tqdm(
        total=len(tasks), initial=counts["skipped"], desc="de-identifying", unit="scan", file=sys.stderr, disable=None
    )
    interrupted = False
    try:
        with _sigterm_interrupts():
            for task, status, reason in _results(pending, settings, dicom_run, workers):
                counts[status] += 1
                bar.update()
                bar.set_postfix_str(task.described)
                if status == "failed":
                    failures.append((task.described, reason))
                    tqdm.write(f"{PROG}: {task.described}: {reason}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
    bar.close()
    line = (
        f"{PROG}: batch: {counts['done']} de-identified, {counts['skipped']} already done, "
        f"{counts['failed']} failed (of {len(tasks)} scans)"
    )
    if interrupted:
        line += "; interrupted: the scans in progress left nothing, a rerun finishes the rest"
    if workers > 1:
        line += f"; {workers} worker processes"
    if skipped_images:
        line += "; not T1-weighted, skipped: " + ", ".join(f"{n} {kind}" for kind, n in skipped_images.items())
    print(line, file=sys.stderr)
    for described, reason in failures:
        print(f"  failed: {described}: {reason}", file=sys.stderr)
    return 130 if interrupted else 1 if failures else 0


def _results(
    tasks: List[Task], settings: Settings, dicom_run: Optional[DicomRun], workers: int
) -> Iterator[Tuple[Task, str, str]]:
    """(task, "done" | "skipped" | "failed", reason) for every task, in the order they finish."""
    if workers <= 1:
        for task in tasks:
            yield task, *process(task, settings, dicom_run)
        return
    import multiprocessing

    threads = max(1, thread_budget() // workers)
    # spawn, not fork: a forked child inherits the parent's torch/OpenMP thread pools mid-state. The workers
    # start during the submissions below, with these variables, so numpy's BLAS and ITK take their share too.
    with (
        _environment(**{name: str(threads) for name in _THREAD_VARIABLES}),
        ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(settings, dicom_run, threads),
        ) as pool,
    ):
        futures = {pool.submit(_work, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                task = futures[future]
                try:
                    yield task, *future.result()
                except BrokenProcessPool:
                    yield task, "failed", "internal error: a worker process died (out of memory?)"
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def process(task: Task, settings: Settings, dicom_run: Optional[DicomRun]) -> Tuple[str, str]:
    """De-identify one task's scan unless its output exists (another shard may have finished it since the
    batch started); ("done" | "skipped" | "failed", reason). A failing scan never stops the batch."""
    if task.target.exists():
        return "skipped", ""
    try:
        run_one(
            task.scan.path,
            task.target,
            settings.replace(series=task.scan.series),
            quiet=True,
            qa_dir=task.qa,
            dicom_run=dicom_run,
        )
        return "done", ""
    except InputError as error:
        return "failed", str(error)
    except Exception as error:  # one broken scan must not stop a night's batch
        return "failed", f"internal error: {type(error).__name__}: {error}"


_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (for the child processes it starts), then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit or scancel) stops the batch as Ctrl-C does, so the scan in progress
    removes its staged files instead of leaving them in the output folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# What each worker process keeps between its tasks (set once by _start_worker).
_WORKER: Dict[str, Any] = {}


def _start_worker(settings: Settings, dicom_run: Optional[DicomRun], threads: int) -> None:
    """Give the worker its share of the CPU threads and load its models once, before its first scan."""
    import SimpleITK as sitk
    import torch

    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    check_method(settings)
    _WORKER.update(settings=settings, dicom_run=dicom_run)


def _work(task: Task) -> Tuple[str, str]:
    return process(task, _WORKER["settings"], _WORKER["dicom_run"])
