"""Whole archives: shard processes running at the same time into one output folder, ``batch --jobs``, and the
cluster recipes in examples/, each compared scan for scan with one plain ``batch`` run.

Real processes on the small shared heads of test_batch (a BIDS dataset of links, its stand-in brain mask,
``--method blur``): what is tested is who writes what and when, not the de-identification itself. "Equal"
means the same files, the same voxels byte for byte, the same sidecars but for their timings, and the same
``dataset_description.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import SimpleITK as sitk

from test_batch import BROKEN, SUMMARY, make_bids, make_mask
from MRIDeIdentifyLib import cli
from MRIDeIdentifyLib.reader import read_volume

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
ENGINE = REPO / "MRIDeIdentify"


def contents(out: Path) -> Dict[str, object]:
    """Relative path -> what must be equal: voxel digest and grid for images, the JSON (timings dropped)."""
    assert not [p for p in out.rglob(".*")], "a hidden staging file or folder was left behind"
    found: Dict[str, object] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = str(path.relative_to(out))
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            record.pop("timings_s", None)
            found[relative] = record
        else:
            image = read_volume(path).image
            found[relative] = (
                hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes()).hexdigest(),
                image.GetPixelIDTypeAsString(),
                image.GetSize(),
                image.GetSpacing(),
                image.GetOrigin(),
                image.GetDirection(),
            )
    return found


def environment(**extra: str) -> Dict[str, str]:
    """The child processes run this checkout's engine with one thread each (the machine is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MRI_DEIDENTIFY=f"{sys.executable} -m MRIDeIdentifyLib")
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def summaries(stderr: str) -> List[tuple]:
    return [tuple(int(v) for v in m.groups()) for m in map(SUMMARY.search, stderr.splitlines()) if m]


def blur_batch(bids: Path, out: Path, mask: Path, *extra: str) -> List[str]:
    """The command line of ``mri-deidentify batch`` (this checkout) with blur and a given brain mask."""
    blur = ["--method", "blur", "--brain-mask", str(mask)]
    return [sys.executable, "-m", "MRIDeIdentifyLib", "batch", str(bids), str(out), *blur, *extra]


def run(command: List[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("archive")
    return make_bids(root / "bids", shared_data / "heads", broken=False), make_mask(root / "ball.nii.gz")


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """One plain batch run, in this process, one scan after the other."""
    bids, mask = dataset
    out = tmp_path_factory.mktemp("reference") / "out"
    with contextlib.redirect_stderr(io.StringIO()) as stream:
        code = cli.main(["batch", str(bids), str(out), "--method", "blur", "--brain-mask", str(mask)])
    assert code == 0, stream.getvalue()
    found = contents(out)
    assert sum(1 for name in found if name.endswith((".nii.gz", ".mgz"))) == 4
    return found


def test_slurm_array_tasks_running_together_equal_one_batch(dataset, reference, tmp_path):
    """Every index of a 3-task array (submitted as --array=1-3), started at once into one folder."""
    bids, mask = dataset
    out = tmp_path / "out"
    # --jobs 1 after the script's --jobs auto: three tasks on this shared machine keep one process each.
    children = [
        subprocess.Popen(
            [
                "bash",
                str(EXAMPLES / "slurm_array.sh"),
                str(bids),
                str(out),
                "--method",
                "blur",
                "--brain-mask",
                str(mask),
                "--jobs",
                "1",
            ],
            env=environment(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_COUNT="3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in (1, 2, 3)
    ]
    results = [child.communicate(timeout=600) for child in children]
    for child, (_, err) in zip(children, results):
        assert child.returncode == 0, err
    # Shards 0/3, 1/3, 2/3 of four scans: 2, 1 and 1 scans, none done twice.
    assert sorted(summaries(err)[0][0] for _, err in results) == [1, 1, 2]
    assert contents(out) == reference


def test_parallel_shards_script_equals_one_batch_and_a_rerun_skips_everything(dataset, reference, tmp_path):
    bids, mask = dataset
    out = tmp_path / "out"
    script = [str(EXAMPLES / "parallel_shards.sh"), str(bids), str(out), "2", "--method", "blur"]
    done = run(["bash", *script, "--brain-mask", str(mask)])
    assert done.returncode == 0, done.stderr
    assert sorted(summaries(done.stderr)) == [(2, 0, 0, 2), (2, 0, 0, 2)]
    assert contents(out) == reference
    # An unsharded rerun (say, to finish failures) finds every scan done by the shards.
    rerun = run(blur_batch(bids, out, mask))
    assert rerun.returncode == 0 and summaries(rerun.stderr) == [(0, 4, 0, 4)], rerun.stderr
    assert contents(out) == reference


def test_two_worker_processes_equal_one_batch_and_report_a_failure(dataset, reference, shared_data, tmp_path):
    """--jobs 2 over the same dataset but with sub-04 broken: that scan fails in its worker, is reported, and
    the three others come out as in the plain run."""
    _, mask = dataset
    bids = make_bids(tmp_path / "bids", shared_data / "heads", broken=True)
    out = tmp_path / "out"
    done = run(blur_batch(bids, out, mask, "--jobs", "2"))
    assert done.returncode == 1, done.stderr
    assert summaries(done.stderr) == [(3, 0, 1, 4)] and "2 worker processes" in done.stderr
    assert f"mri-deidentify: {BROKEN}: " in done.stderr and f"failed: {BROKEN}: " in done.stderr
    assert contents(out) == {name: value for name, value in reference.items() if not name.startswith("sub-04")}


def test_a_terminated_batch_leaves_nothing_partial_and_a_rerun_finishes(dataset, reference, tmp_path):
    """SIGTERM (a SLURM time limit, scancel) while a scan is being written: that scan's staged files go, the
    finished ones stay complete, and a rerun of the same command finishes the dataset as one plain batch."""
    bids, mask = dataset
    out, qa = tmp_path / "out", tmp_path / "qa"
    command = blur_batch(bids, out, mask)
    # --qa makes the write phase seconds long (offscreen renders), so the staging folder is there to be caught.
    child = subprocess.Popen(
        command + ["--qa", str(qa)], env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("sub-*/**/.mrideidentify-*")):
        assert child.poll() is None and time.monotonic() < deadline, "no scan was caught while being written"
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130 and "interrupted" in err, err
    for folder in (out, qa):
        assert not list(folder.rglob(".mrideidentify-*")), "staged files were left behind"
    images = [p for p in out.rglob("*_T1w.*") if not p.name.endswith(".json")]
    assert len(images) < 4 and all(p.with_name(p.name.split(".")[0] + ".json").is_file() for p in images)

    rerun = run(command)
    assert rerun.returncode == 0 and summaries(rerun.stderr) == [(4 - len(images), len(images), 0, 4)], rerun.stderr
    assert contents(out) == reference
