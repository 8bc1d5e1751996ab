"""`mri-deidentify batch` over a BIDS dataset and a plain folder: derivatives layout, failures, resume, shards.

The datasets are made in tmp_path from small (2-3 mm) shared heads linked in, plus one broken scan made
there. Every run passes one stand-in brain mask (a 45 mm ball at the LPS origin, on its own 2 mm grid, which
each head's grid resamples): batch behaviour does not depend on the brain extractor, and deepbet would
cost ~10 s a scan (test_pipeline covers it on every head).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DICOM_DIR, SKIP_REASON
from MRIDeIdentifyLib import __version__, cli
from MRIDeIdentifyLib.reader import read_volume

# Relative path in the BIDS dataset -> the shared head it links to (None: the broken scan).
BIDS_SCANS: Dict[str, str] = {
    "sub-01/anat/sub-01_T1w.nii.gz": "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz",
    "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": "S06_dcmqa_xa30_T1w_ser6_2mm.nii.gz",
    "sub-03/ses-1/anat/sub-03_ses-1_T1w.mgz": "S05_mne_sample_T1_3mm.mgz",
}
BROKEN = "sub-04/anat/sub-04_T1w.nii.gz"
# Files a BIDS batch must leave alone: not T1w, or not an image.
NOT_SCANS = ("sub-01/anat/sub-01_T2w.nii.gz", "sub-01/anat/sub-01_T1w.json", "participants.tsv")
SUMMARY = re.compile(r"batch: (\d+) de-identified, (\d+) already done, (\d+) failed \(of (\d+) scans\)")


def make_bids(root: Path, heads: Path, broken: bool = True) -> Path:
    """A BIDS dataset of links to shared heads, a truncated-gzip sub-04 (or a good one) and some non-scans."""
    for relative, name in BIDS_SCANS.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).symlink_to(heads / name)
    (root / BROKEN).parent.mkdir(parents=True)
    good = (heads / BIDS_SCANS["sub-01/anat/sub-01_T1w.nii.gz"]).read_bytes()
    (root / BROKEN).write_bytes(good[: len(good) // 2] if broken else good)
    (root / NOT_SCANS[0]).symlink_to(heads / "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz")
    (root / NOT_SCANS[1]).write_text('{"RepetitionTime": 2.3}\n')
    (root / NOT_SCANS[2]).write_text("participant_id\nsub-01\nsub-02\nsub-03\nsub-04\n")
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}\n')
    return root


def make_mask(path: Path) -> Path:
    """A 45 mm ball at the LPS origin on a 2 mm cube: inside every small shared head, on none of their grids."""
    size, spacing = 70, 2.0
    centre = (size - 1) / 2.0
    k, j, i = np.indices((size, size, size))
    ball = ((i - centre) ** 2 + (j - centre) ** 2 + (k - centre) ** 2) * spacing**2 <= 45.0**2
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    mask.SetSpacing([spacing] * 3)
    mask.SetOrigin([-centre * spacing] * 3)
    sitk.WriteImage(mask, str(path))
    return path


def batch(capfd, *args: str) -> tuple:
    """Run ``mri-deidentify batch ARGS`` in-process; returns (exit status, stderr lines)."""
    capfd.readouterr()
    code = cli.main(["batch", *args])
    captured = capfd.readouterr()
    assert captured.out == ""
    return code, captured.err.splitlines()


def summary(lines: List[str]) -> tuple:
    found = [SUMMARY.search(line) for line in lines]
    found = [m for m in found if m]
    assert len(found) == 1, lines
    return tuple(int(v) for v in found[0].groups())


def files_under(root: Path) -> Dict[str, int]:
    """Relative path -> mtime (ns) of every file under ``root``, hidden ones included."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def assert_deidentified_copy(source: Path, output: Path) -> None:
    """Same grid and pixel type as the source, and changed somewhere (not a plain copy)."""
    a, b = read_volume(source).image, read_volume(output).image
    assert a.GetSize() == b.GetSize() and a.GetPixelID() == b.GetPixelID()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert not np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


@pytest.fixture(scope="module")
def heads(shared_data: Path) -> Path:
    return shared_data / "heads"


@pytest.fixture(scope="module")
def mask(tmp_path_factory) -> Path:
    return make_mask(tmp_path_factory.mktemp("mask") / "ball.nii.gz")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, heads, mask):
    """One batch over the BIDS dataset with its broken scan: (bids, out, exit status, stderr lines)."""
    root = tmp_path_factory.mktemp("batch")
    bids = make_bids(root / "bids", heads)
    out = root / "out"
    stream = io.StringIO()  # a module fixture cannot use capfd
    with contextlib.redirect_stderr(stream):
        code = cli.main(["batch", str(bids), str(out), "--method", "blur", "--brain-mask", str(mask)])
    return bids, out, code, stream.getvalue().splitlines()


def test_bids_batch_writes_a_derivatives_dataset(first_run):
    bids, out, _, _ = first_run
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "MRIDeIdentify" and generated["Version"] == __version__
    assert "method blur" in generated["Description"] and "3 mm" in generated["Description"]
    assert "BIDSVersion" in description
    for relative in BIDS_SCANS:
        assert_deidentified_copy(bids / relative, out / relative)
        sidecar = json.loads((out / re.sub(r"\.(nii\.gz|mgz)$", ".json", relative)).read_text())
        assert sidecar["method"] == "blur" and sidecar["brain_mask"] == "user"
    # Exactly the three T1w scans, their sidecars and the description: no T2w, no copied sidecar, no staging.
    expected = {"dataset_description.json", *BIDS_SCANS, *(re.sub(r"\.(nii\.gz|mgz)$", ".json", r) for r in BIDS_SCANS)}
    assert set(files_under(out)) == expected
    assert not [p for p in out.rglob(".*")], "a hidden staging folder was left behind"


def test_bids_batch_reports_the_broken_scan_and_goes_on(first_run):
    _, out, code, lines = first_run
    assert code == 1
    assert summary(lines) == (3, 0, 1, 4)
    assert "not T1-weighted, skipped: 1 T2w" in next(line for line in lines if SUMMARY.search(line))
    reports = [line for line in lines if BROKEN in line]
    assert reports and all("gzip" in line for line in reports), lines
    assert not (out / BROKEN).exists() and not (out / "sub-04").exists()


def test_rerun_skips_existing_outputs_and_finishes_what_failed(tmp_path, first_run, heads, mask, capfd):
    _, done_out, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(done_out, out, copy_function=shutil.copy2)
    bids = make_bids(tmp_path / "bids", heads)
    before = files_under(out)

    code, lines = batch(capfd, str(bids), str(out), "--method", "blur", "--brain-mask", str(mask))
    assert (code, summary(lines)) == (1, (0, 3, 1, 4))
    after = files_under(out)
    assert {k: after[k] for k in before if k != "dataset_description.json"} == {
        k: v for k, v in before.items() if k != "dataset_description.json"
    }, "a finished scan was redone"

    (bids / BROKEN).unlink()
    (bids / BROKEN).symlink_to(heads / BIDS_SCANS["sub-01/anat/sub-01_T1w.nii.gz"])
    code, lines = batch(capfd, str(bids), str(out), "--method", "blur", "--brain-mask", str(mask))
    assert (code, summary(lines)) == (0, (1, 3, 0, 4))
    assert_deidentified_copy(bids / BROKEN, out / BROKEN)
    final = files_under(out)
    assert all(final[k] == v for k, v in after.items() if k != "dataset_description.json")


def test_shards_cover_every_scan_exactly_once(tmp_path, heads, mask, capfd):
    bids = make_bids(tmp_path / "bids", heads, broken=False)
    out = tmp_path / "out"
    scans = {*BIDS_SCANS, BROKEN}
    written = []
    for shard in ("0/2", "1/2"):
        before = set(files_under(out)) if out.exists() else set()
        code, lines = batch(capfd, str(bids), str(out), "--method", "blur", "--brain-mask", str(mask), "--shard", shard)
        assert code == 0, lines
        assert summary(lines) == (2, 0, 0, 2)
        written.append({p for p in set(files_under(out)) - before if p in scans})
    assert len(written[0]) == len(written[1]) == 2
    assert not written[0] & written[1]
    assert written[0] | written[1] == scans


@pytest.mark.parametrize("shard", ["2/2", "1/0", "one/two"])
def test_bad_shard_is_refused(tmp_path, heads, shard, capfd):
    bids = make_bids(tmp_path / "bids", heads)
    code, lines = batch(capfd, str(bids), str(tmp_path / "out"), "--method", "blur", "--shard", shard)
    assert code == 2 and len(lines) == 1 and "--shard" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_output_inside_the_input_is_refused(tmp_path, heads, capfd):
    bids = make_bids(tmp_path / "bids", heads)
    code, lines = batch(capfd, str(bids), str(bids / "derivatives" / "deid"), "--method", "blur")
    assert code == 2 and len(lines) == 1 and "inside" in lines[0], lines
    assert not (bids / "derivatives").exists()


def test_a_dicom_folder_holding_two_series_gives_two_outputs(tmp_path, mask, capfd):
    """An export folder often holds several series of a patient: each is its own scan and its own output."""
    if not DICOM_DIR.is_dir():
        pytest.skip(SKIP_REASON)
    from MRIDeIdentifyLib.dicom import list_series

    source = tmp_path / "scans" / "DOE^JANE"
    source.mkdir(parents=True)
    for name in ("5_anat-T1w_acq-tfl.dcm", "6_anat-T1w_acq-tfl.dcm"):
        shutil.copyfile(DICOM_DIR / "S06_xa30_enhanced_T1w" / name, source / name)
    uids = [info.uid for info in list_series(source)]
    assert len(uids) == 2
    out = tmp_path / "out"
    code, lines = batch(capfd, str(tmp_path / "scans"), str(out), "--method", "blur", "--brain-mask", str(mask))
    assert code == 0 and summary(lines) == (2, 0, 0, 2), lines
    assert sorted(p.name for p in out.iterdir()) == [
        "dicom-series-0000",
        "dicom-series-0000.json",
        "dicom-series-0001",
        "dicom-series-0001.json",
    ]
    written = []
    for number, uid in enumerate(uids):
        source_image = read_volume(source, uid).image
        output = out / f"dicom-series-{number:04d}"
        written.append(list_series(output)[0].uid)
        image = read_volume(output).image
        assert image.GetSize() == source_image.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), source_image.GetOrigin(), atol=1e-4)
        assert not np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(source_image))
    assert len(set(written)) == 2 and not set(written) & set(uids), "new, distinct series UIDs"


def test_a_bad_model_fails_once_before_any_scan(tmp_path, heads, capfd):
    """A damaged --model would fail every scan alike: the batch stops at once with one line, writing nothing."""
    bids = make_bids(tmp_path / "bids", heads)
    (tmp_path / "g.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + bytes(64))
    (tmp_path / "g.json").write_text('{"sha256": "%s", "config": {"size": 64}}' % ("0" * 64))
    code, lines = batch(capfd, str(bids), str(tmp_path / "out"), "--model", str(tmp_path / "g.safetensors"))
    assert code == 2 and len(lines) == 1 and "sha256" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_plain_folder_with_a_dicom_series(tmp_path, heads, mask, capfd):
    if not DICOM_DIR.is_dir():
        pytest.skip(SKIP_REASON)
    from MRIDeIdentifyLib import dicom

    if not hasattr(dicom, "write_series"):
        pytest.skip("the DICOM writer (dicom.write_series) is not available yet")
    source = tmp_path / "scans"
    (source / "series-a").mkdir(parents=True)
    shutil.copyfile(DICOM_DIR / "S06_xa30_enhanced_T1w" / "5_anat-T1w_acq-tfl.dcm", source / "series-a" / "im.dcm")
    (source / "nested").mkdir()
    (source / "nested" / "head.nii.gz").symlink_to(heads / "S06_dcmqa_xa30_T1w_ser6_2mm.nii.gz")
    (source / "README.txt").write_text("not a scan\n")
    out = tmp_path / "out"
    code, lines = batch(capfd, str(source), str(out), "--method", "blur", "--brain-mask", str(mask))
    assert code == 0, lines
    assert summary(lines) == (2, 0, 0, 2)
    assert not (out / "dataset_description.json").exists(), "a plain folder is not made a BIDS dataset"
    assert_deidentified_copy(source / "nested" / "head.nii.gz", out / "nested" / "head.nii.gz")
    # DICOM folders are renamed by position: export folder names often carry the patient's name.
    assert_deidentified_copy(source / "series-a", out / "dicom-series-0000")
    assert not (out / "series-a").exists()
    assert (out / "dicom-series-0000.json").is_file() and not (out / "README.txt").exists()
    before = files_under(out)
    code, lines = batch(capfd, str(source), str(out), "--method", "blur", "--brain-mask", str(mask))
    assert (code, summary(lines)) == (0, (0, 2, 0, 2))
    assert files_under(out) == before


def test_participant_labels_select_subjects(tmp_path, heads, mask, capfd):
    """The BIDS-app convention: labels with or without their sub- prefix; the others are not touched."""
    bids = make_bids(tmp_path / "bids", heads)
    out = tmp_path / "out"
    code, lines = batch(
        capfd, str(bids), str(out), "--method", "blur", "--brain-mask", str(mask), "--participant-label", "01", "sub-03"
    )
    assert code == 0 and summary(lines) == (2, 0, 0, 2), lines
    written = {p for p in files_under(out) if p.endswith((".nii.gz", ".mgz"))}
    assert written == {"sub-01/anat/sub-01_T1w.nii.gz", "sub-03/ses-1/anat/sub-03_ses-1_T1w.mgz"}


def test_session_labels_select_sessions(tmp_path, heads):
    from MRIDeIdentifyLib.batch import plan

    bids = make_bids(tmp_path / "bids", heads)
    tasks, is_bids, skipped = plan(bids, tmp_path / "out", sessions=["1"])
    assert is_bids and skipped == {}
    assert [str(t.target.relative_to(tmp_path / "out")) for t in tasks] == [
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "sub-03/ses-1/anat/sub-03_ses-1_T1w.mgz",
    ]


@pytest.mark.parametrize("option, label", [("--participant-label", "07"), ("--session-label", "ses-2")])
def test_a_label_that_selects_nothing_is_refused(tmp_path, heads, option, label, capfd):
    bids = make_bids(tmp_path / "bids", heads)
    code, lines = batch(capfd, str(bids), str(tmp_path / "out"), "--method", "blur", option, label)
    assert code == 2 and len(lines) == 1 and option in lines[0] and "not in this dataset" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_labels_on_a_plain_folder_are_refused(tmp_path, heads, capfd):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "head.nii.gz").symlink_to(heads / BIDS_SCANS["sub-01/anat/sub-01_T1w.nii.gz"])
    code, lines = batch(capfd, str(tmp_path / "scans"), str(tmp_path / "out"), "--participant-label", "01")
    assert code == 2 and len(lines) == 1 and "not one" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_derivatives_made_another_way_are_refused(tmp_path, first_run, heads, mask, capfd):
    """One derivatives folder, one method: resuming with other settings would mix two kinds of output."""
    _, done_out, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(done_out, out)
    before = files_under(out)
    bids = make_bids(tmp_path / "bids", heads)
    code, lines = batch(capfd, str(bids), str(out), "--method", "blur", "--brain-mask", str(mask), "--seed", "7")
    assert code == 2 and len(lines) == 1 and "another folder" in lines[0] and "seed 0" in lines[0], lines
    assert files_under(out) == before
