"""The bad-input corpus: real scans damaged in many ways, each refused by `mri-deidentify run` the same way.

Every case is made in the test's tmp_path from a real shared head (or DICOM series) and must end with
exit status 2, one line on stderr naming the problem, nothing written anywhere (no output, no hidden
staging folder) and the input bytes unchanged. A snapshot of the whole case folder (every path, hidden
ones included, with the sha256 of each file and the target of each link) is taken before and after the
command, which checks "nothing written" and "input unchanged" at once. A control run on the undamaged
input checks that the snapshot does see a successful write.

Cases run in-process through ``cli.main`` (fast: most fail while reading); a few also run as a real
``python -m MRIDeIdentifyLib`` subprocess, the rest of those are marked slow.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DICOM_DIR, HEADS_DIR, SKIP_REASON
from MRIDeIdentifyLib import cli
from MRIDeIdentifyLib.reader import image_like

ENHANCED_DICOM = DICOM_DIR / "S06_xa30_enhanced_T1w"
CLASSIC_DICOM = DICOM_DIR / "S01_decubitus_HFS_T1_sag"
MGZ_HEAD = HEADS_DIR / "S05_mne_sample_T1_3mm.mgz"
# Stage announcements ("mri-deidentify: head mask...") are progress, not part of the error report.
PROGRESS_LINE = re.compile(r"^mri-deidentify: [a-z][a-z -]*\.\.\.$")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Setup:
    """Where a case lives: ``input`` folder for the damaged files, ``output`` the run's output file."""

    root: Path
    head_file: Path
    head: sitk.Image

    @property
    def input(self) -> Path:
        return self.root / "in"

    @property
    def output(self) -> Path:
        return self.root / "out" / "deid.nii.gz"

    def write(self, image: sitk.Image, name: str, compress: bool = True) -> Path:
        path = self.input / name
        clean = sitk.Image(image)
        for key in clean.GetMetaDataKeys():  # NIfTI keys make ITK warn when written as MetaImage
            clean.EraseMetaData(key)
        sitk.WriteImage(clean, str(path), useCompression=compress)
        return path

    def mask_args(self) -> List[str]:
        """``--brain-mask`` with the stand-in ball: a case the engine wrongly accepts then fails fast."""
        return ["--brain-mask", str(self.write(self.sphere_mask(), "mask.nii.gz"))]

    def blur_with_mask(self, mask: sitk.Image) -> List[str]:
        """``blur`` on a copy of the head with ``mask`` as the user's brain mask."""
        masked = ["--brain-mask", str(self.write(mask, "mask.nii.gz"))]
        return [str(self.copy_head()), str(self.output), "--method", "blur", *masked]

    def remodel_args(self) -> List[str]:
        """``remodel`` on a copy of the head with the generator weights at ``input/g.safetensors``."""
        model = ["--model", str(self.input / "g.safetensors")]
        return [str(self.copy_head()), str(self.output), "--method", "remodel", *model, *self.mask_args()]

    def copy_head(self, name: str = "scan.nii.gz") -> Path:
        path = self.input / name
        shutil.copyfile(self.head_file, path)
        return path

    def like_head(self, array: np.ndarray) -> sitk.Image:
        image = image_like(array, self.head)
        return image

    def sphere_mask(self, radius_mm: float = 50.0) -> sitk.Image:
        """A ball at the head's centre on the head's grid: a stand-in brain mask that skips deepbet."""
        size = np.array(self.head.GetSize())
        centre = np.array(self.head.TransformContinuousIndexToPhysicalPoint((size / 2.0).tolist()))
        k, j, i = np.indices(size[::-1])
        points = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
        direction = np.asarray(self.head.GetDirection()).reshape(3, 3)
        physical = np.asarray(self.head.GetOrigin()) + (points * self.head.GetSpacing()) @ direction.T
        inside = np.linalg.norm(physical - centre, axis=1) <= radius_mm
        return self.like_head(inside.reshape(size[::-1]).astype(np.uint8))


Builder = Callable[[Setup], List[str]]


@dataclass(frozen=True)
class Case:
    build: Builder  # makes the damaged input(s) under setup.input; returns the arguments after `run`
    reason: str  # a regular expression the one-line reason must match (case-insensitive)


def _float_head(s: Setup) -> np.ndarray:
    return sitk.GetArrayFromImage(s.head).astype(np.float32)


def truncated_gzip(s: Setup) -> List[str]:
    data = s.head_file.read_bytes()
    (s.input / "scan.nii.gz").write_bytes(data[: len(data) // 2])
    return [str(s.input / "scan.nii.gz"), str(s.output), "--method", "blur"]


def empty_file(s: Setup) -> List[str]:
    (s.input / "scan.nii.gz").touch()
    return [str(s.input / "scan.nii.gz"), str(s.output), "--method", "blur"]


def _non_finite(value: float, name: str) -> Builder:
    def build(s: Setup) -> List[str]:
        array = _float_head(s)
        array[44:48, 60:64, 60:64] = value  # inside the brain, where the output must equal the input
        return [str(s.write(s.like_head(array), name)), str(s.output), "--method", "blur", *s.mask_args()]

    return build


def all_zero(s: Setup) -> List[str]:
    array = np.zeros_like(sitk.GetArrayFromImage(s.head))
    return [str(s.write(s.like_head(array), "scan.nii.gz")), str(s.output), "--method", "blur"]


def two_d(s: Setup) -> List[str]:
    return [str(s.write(s.head[:, :, s.head.GetSize()[2] // 2], "slice.nii.gz")), str(s.output), "--method", "blur"]


def one_voxel_thick(s: Setup) -> List[str]:
    middle = s.head.GetSize()[2] // 2
    return [str(s.write(s.head[:, :, middle : middle + 1], "slab.nii.gz")), str(s.output), "--method", "blur"]


def four_d_three_volumes(s: Setup) -> List[str]:
    crop = s.head[32:96, 32:96, 24:72]
    series = sitk.JoinSeries([crop, crop, crop])
    return [str(s.write(series, "series.nii.gz")), str(s.output), "--method", "blur"]


def five_d(s: Setup) -> List[str]:
    import nibabel as nib

    crop = sitk.GetArrayFromImage(s.head[32:96, 32:96, 24:72]).transpose(2, 1, 0)
    data = np.stack([crop, crop], axis=-1)[:, :, :, None, :]  # (x, y, z, t=1, u=2)
    path = s.input / "five.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return [str(path), str(s.output), "--method", "blur"]


def rgb(s: Setup) -> List[str]:
    scaled = sitk.Cast(sitk.RescaleIntensity(s.head, 0, 255), sitk.sitkUInt8)
    return [str(s.write(sitk.Compose(scaled, scaled, scaled), "colour.nii.gz")), str(s.output), "--method", "blur"]


def text_named_nii_gz(s: Setup) -> List[str]:
    (s.input / "scan.nii.gz").write_text("Patient: Jane Doe\nthis is a text file, not an image\n")
    return [str(s.input / "scan.nii.gz"), str(s.output), "--method", "blur"]


def gzipped_text_named_nii_gz(s: Setup) -> List[str]:
    (s.input / "scan.nii.gz").write_bytes(gzip.compress(b"valid gzip, but the content is not a NIfTI header\n" * 20))
    return [str(s.input / "scan.nii.gz"), str(s.output), "--method", "blur"]


def header_promises_more_data(s: Setup) -> List[str]:
    path = s.write(s.head, "scan.nii", compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: 352 + (len(data) - 352) // 2])  # the 348-byte header and extender, half the voxels
    return [str(path), str(s.output), "--method", "blur", *s.mask_args()]


def gzip_stream_shorter_than_header(s: Setup) -> List[str]:
    # A complete gzip stream whose content is cut: the gzip check passes, the voxels are missing.
    data = s.write(s.head, "full.nii", compress=False).read_bytes()
    (s.input / "full.nii").unlink()
    (s.input / "scan.nii.gz").write_bytes(gzip.compress(data[: 352 + (len(data) - 352) // 2]))
    return [str(s.input / "scan.nii.gz"), str(s.output), "--method", "blur", *s.mask_args()]


def nrrd_short_data_file(s: Setup) -> List[str]:
    header = s.write(s.head, "scan.nhdr", compress=False)
    data = s.input / "scan.raw"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return [str(header), str(s.output), "--method", "blur"]


def mha_short_data(s: Setup) -> List[str]:
    path = s.write(s.head, "scan.mha", compress=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [str(path), str(s.output), "--method", "blur"]


def nrrd_missing_data_file(s: Setup) -> List[str]:
    header = s.write(s.head, "scan.nhdr", compress=False)
    data_files = [p for p in s.input.iterdir() if p != header]
    assert data_files, "ITK wrote no detached data file beside the .nhdr"
    for path in data_files:
        path.unlink()
    return [str(header), str(s.output), "--method", "blur"]


def mhd_missing_data_file(s: Setup) -> List[str]:
    header = s.write(s.head, "scan.mhd", compress=False)
    (s.input / "scan.raw").unlink()
    return [str(header), str(s.output), "--method", "blur"]


def corrupted_mgz(s: Setup) -> List[str]:
    data = MGZ_HEAD.read_bytes()
    path = s.input / "scan.mgz"
    path.write_bytes(data[: len(data) // 2])
    return [str(path), str(s.output), "--method", "blur"]


def dicom_two_series(s: Setup) -> List[str]:
    folder = s.input / "dicom"
    shutil.copytree(ENHANCED_DICOM, folder)
    return [str(folder), str(s.output), "--method", "blur"]


def dicom_unknown_series(s: Setup) -> List[str]:
    folder = s.input / "dicom"
    shutil.copytree(ENHANCED_DICOM, folder)
    return [str(folder), str(s.output), "--method", "blur", "--series", "1.2.3.4.5"]


def dicom_truncated_pixels(s: Setup) -> List[str]:
    folder = s.input / "dicom"
    folder.mkdir()
    for source in sorted(CLASSIC_DICOM.iterdir())[:6]:
        shutil.copyfile(source, folder / source.name)
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-40000])
    return [str(folder), str(s.output), "--method", "blur"]


def empty_folder(s: Setup) -> List[str]:
    (s.input / "series").mkdir()
    return [str(s.input / "series"), str(s.output), "--method", "blur"]


def folder_without_dicom(s: Setup) -> List[str]:
    (s.input / "series").mkdir()
    (s.input / "series" / "notes.txt").write_text("not a DICOM file\n")
    return [str(s.input / "series"), str(s.output), "--method", "blur"]


def mask_on_distant_grid(s: Setup) -> List[str]:
    mask = s.sphere_mask()
    mask.SetOrigin([o + 1000.0 for o in mask.GetOrigin()])
    return s.blur_with_mask(mask)


def mask_outside_head(s: Setup) -> List[str]:
    array = np.zeros(s.head.GetSize()[::-1], np.uint8)
    array[:6, :6, :6] = 1  # a corner of the field of view: air
    return s.blur_with_mask(s.like_head(array))


def missing_mask(s: Setup) -> List[str]:
    return [str(s.copy_head()), str(s.output), "--method", "blur", "--brain-mask", str(s.input / "mask.nii.gz")]


def output_under_a_file(s: Setup) -> List[str]:
    # Root ignores permission bits, so "unwritable" is made with a path whose parent is a regular file.
    (s.root / "out").mkdir()
    (s.root / "out" / "notes.txt").write_text("a file, not a folder\n")
    return [str(s.copy_head()), str(s.root / "out" / "notes.txt" / "deid.nii.gz"), "--method", "blur"]


def output_under_an_executable_file(s: Setup) -> List[str]:
    # Same, with an executable file: os.access(X_OK) then succeeds even for root, so only a type check catches it.
    (s.root / "out").mkdir()
    blocker = s.root / "out" / "run.sh"
    blocker.write_text("#!/bin/sh\n")
    blocker.chmod(0o755)
    return [str(s.copy_head()), str(blocker / "deid.nii.gz"), "--method", "blur", *s.mask_args()]


def read_only_output_folder(s: Setup) -> List[str]:
    (s.root / "out").mkdir()
    (s.root / "out").chmod(0o555)
    return [str(s.copy_head()), str(s.output), "--method", "blur"]


def output_is_a_folder(s: Setup) -> List[str]:
    (s.root / "out" / "deid.nii.gz").mkdir(parents=True)
    return [str(s.copy_head()), str(s.output), "--method", "blur"]


def output_is_input(s: Setup) -> List[str]:
    path = s.copy_head()
    return [str(path), str(path), "--method", "blur"]


def output_links_to_input(s: Setup) -> List[str]:
    path = s.copy_head()
    (s.root / "out").mkdir()
    s.output.symlink_to(path)
    return [str(path), str(s.output), "--method", "blur"]


def saved_mask_overwrites_input(s: Setup) -> List[str]:
    path = s.copy_head()
    return [str(path), str(s.output), "--method", "blur", "--save-brain-mask", str(path)]


def output_inside_dicom_input(s: Setup) -> List[str]:
    folder = s.input / "dicom"
    folder.mkdir()
    shutil.copyfile(next(ENHANCED_DICOM.iterdir()), folder / "series.dcm")
    return [str(folder), str(folder / "deid.nii.gz"), "--method", "blur"]


def nonexistent_input(s: Setup) -> List[str]:
    return [str(s.input / "missing.nii.gz"), str(s.output), "--method", "blur"]


def unknown_method(s: Setup) -> List[str]:
    return [str(s.copy_head()), str(s.output), "--method", "no-such-method"]


def unknown_input_extension(s: Setup) -> List[str]:
    return [str(s.write(s.head, "scan.vtk", compress=False)), str(s.output), "--method", "blur"]


def unknown_output_extension(s: Setup) -> List[str]:
    return [str(s.copy_head()), str(s.root / "out" / "deid.png"), "--method", "blur"]


def missing_model_weights(s: Setup) -> List[str]:
    return s.remodel_args()


def corrupted_model_weights(s: Setup) -> List[str]:
    # A damaged download: the weights no longer match the sha256 their model card records.
    (s.input / "g.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + bytes(64))
    (s.input / "g.json").write_text('{"sha256": "%s", "config": {}}' % ("0" * 64))
    return s.remodel_args()


def model_card_not_json(s: Setup) -> List[str]:
    (s.input / "g.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + bytes(64))
    (s.input / "g.json").write_text("sha256: not JSON\n")
    return s.remodel_args()


def negative_margin(s: Setup) -> List[str]:
    return [str(s.copy_head()), str(s.output), "--method", "blur", "--margin-mm", "-2"]


def non_numeric_margin(s: Setup) -> List[str]:
    return [str(s.copy_head()), str(s.output), "--method", "blur", "--margin-mm", "3mm"]


def unknown_device(s: Setup) -> List[str]:
    return [str(s.copy_head()), str(s.output), "--method", "blur", "--device", "tpu"]


def missing_output_argument(s: Setup) -> List[str]:
    return [str(s.copy_head()), "--method", "blur"]


CASES: Dict[str, Case] = {
    "truncated-gzip": Case(truncated_gzip, "gzip"),
    "empty-file": Case(empty_file, "empty"),
    "nan-voxels-nrrd": Case(_non_finite(np.nan, "scan.nrrd"), "NaN"),
    "inf-voxels-mha": Case(_non_finite(np.inf, "scan.mha"), "infinite"),
    "nan-voxels-nifti": Case(_non_finite(np.nan, "scan.nii.gz"), "NaN"),
    "inf-voxels-nifti": Case(_non_finite(-np.inf, "scan.nii"), "infinite"),
    "all-zero": Case(all_zero, "same value"),
    "2-d-image": Case(two_d, "2-D"),
    "one-voxel-thick": Case(one_voxel_thick, "thick"),
    "4-d-three-volumes": Case(four_d_three_volumes, "3 volumes"),
    "5-d-image": Case(five_d, "5-D"),
    "rgb-image": Case(rgb, "colour"),
    "text-named-nii-gz": Case(text_named_nii_gz, "gzip"),
    "gzipped-text-named-nii-gz": Case(gzipped_text_named_nii_gz, "cannot be read"),
    "header-promises-more-data": Case(header_promises_more_data, "truncated"),
    "gzip-stream-shorter-than-header": Case(gzip_stream_shorter_than_header, "truncated"),
    "nrrd-short-data-file": Case(nrrd_short_data_file, "cannot be read"),
    "mha-short-data": Case(mha_short_data, "not read completely"),
    "nrrd-missing-data-file": Case(nrrd_missing_data_file, "cannot be read"),
    "mhd-missing-data-file": Case(mhd_missing_data_file, "data file"),
    "corrupted-mgz": Case(corrupted_mgz, "MGZ"),
    "dicom-two-series": Case(dicom_two_series, "2 series"),
    "dicom-unknown-series": Case(dicom_unknown_series, "no series 1.2.3.4.5"),
    "dicom-truncated-pixels": Case(dicom_truncated_pixels, "truncated"),
    "empty-folder": Case(empty_folder, "no files"),
    "folder-without-dicom": Case(folder_without_dicom, "DICOM"),
    "mask-on-distant-grid": Case(mask_on_distant_grid, "overlap"),
    "mask-outside-head": Case(mask_outside_head, "overlap the head"),
    "missing-mask": Case(missing_mask, "no such file"),
    "output-under-a-file": Case(output_under_a_file, "not a folder"),
    "output-under-an-executable-file": Case(output_under_an_executable_file, "not a folder"),
    "read-only-output-folder": Case(read_only_output_folder, "writable"),
    "output-is-a-folder": Case(output_is_a_folder, "is a folder"),
    "output-is-input": Case(output_is_input, "input path"),
    "output-links-to-input": Case(output_links_to_input, "input path"),
    "saved-mask-overwrites-input": Case(saved_mask_overwrites_input, "input path"),
    "output-inside-dicom-input": Case(output_inside_dicom_input, "inside the input"),
    "nonexistent-input": Case(nonexistent_input, "no such file"),
    "unknown-method": Case(unknown_method, "unknown method"),
    "unknown-input-extension": Case(unknown_input_extension, "unsupported file type"),
    "unknown-output-extension": Case(unknown_output_extension, "DICOM output"),
    "missing-model-weights": Case(missing_model_weights, "not found"),
    "corrupted-model-weights": Case(corrupted_model_weights, "sha256"),
}
NEEDS_DICOM = {"dicom-two-series", "dicom-unknown-series", "dicom-truncated-pixels", "output-inside-dicom-input"}
# Engine bugs this corpus found; the lead flips them by fixing the engine (see the test report).
KNOWN_BUGS: Dict[str, str] = {}
# Run in a real subprocess by default (the rest only with -m slow): one per reading path.
SUBPROCESS_FAST = {"empty-file", "text-named-nii-gz", "unknown-method"}


def snapshot(root: Path) -> Dict[str, str]:
    """Every path under ``root`` (hidden ones included) -> sha256 of a file, 'dir', or 'link:<target>'."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def error_lines(stderr: str) -> List[str]:
    """The lines of ``stderr`` that are not stage progress."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]


@pytest.fixture(scope="module")
def head(head_path: Path) -> sitk.Image:
    return sitk.ReadImage(str(head_path))


def make_case(name: str, root: Path, head_path: Path, head: sitk.Image) -> List[str]:
    if name in NEEDS_DICOM and not DICOM_DIR.is_dir():
        pytest.skip(SKIP_REASON)
    if name == "read-only-output-folder" and IS_ROOT:
        pytest.skip("runs as root, which writes into read-only folders; the file-parent cases cover root")
    setup = Setup(root, head_path, head)
    setup.input.mkdir(parents=True)
    return ["run", *CASES[name].build(setup)]


def case_params(names) -> list:
    marks = {name: [pytest.mark.xfail(strict=True, reason=reason)] for name, reason in KNOWN_BUGS.items()}
    return [pytest.param(name, id=name, marks=marks.get(name, [])) for name in names]


def check_refusal(
    name: str, code: int, stdout: str, stderr: str, before: Dict[str, str], after: Dict[str, str]
) -> None:
    lines = error_lines(stderr)
    assert code == 2, f"exit {code}; stderr: {stderr!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    assert lines[0].startswith("mri-deidentify: error: "), lines[0]
    assert re.search(CASES[name].reason, lines[0], re.IGNORECASE), lines[0]
    assert stderr.splitlines()[-1] == lines[0], "the reason must be the last line"
    assert stdout == ""
    assert after == before, "the command wrote, removed or changed files"


@pytest.mark.parametrize("name", case_params(CASES))
def test_bad_input_is_refused(name, tmp_path, head_path, head, capfd, monkeypatch):
    monkeypatch.delenv("MRIDEIDENTIFY_DEBUG", raising=False)
    argv = make_case(name, tmp_path, head_path, head)
    capfd.readouterr()
    before = snapshot(tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's way of refusing usage
        code = exit_.code
    captured = capfd.readouterr()
    check_refusal(name, code, captured.out, captured.err, before, snapshot(tmp_path))


def subprocess_params() -> list:
    return [
        param
        if param.values[0] in SUBPROCESS_FAST
        else pytest.param(*param.values, id=param.id, marks=[*param.marks, pytest.mark.slow])
        for param in case_params(CASES)
    ]


@pytest.mark.parametrize("name", subprocess_params())
def test_bad_input_is_refused_by_the_command(name, tmp_path, head_path, head):
    argv = make_case(name, tmp_path, head_path, head)
    before = snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MRIDEIDENTIFY_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "MRIDeIdentifyLib", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    check_refusal(name, done.returncode, done.stdout, done.stderr, before, snapshot(tmp_path))


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


def test_control_run_writes_and_keeps_input(tmp_path, head_path, head, capfd):
    """The harness sees writes: the undamaged input (with a stand-in brain mask) succeeds and only out/ grows."""
    setup = Setup(tmp_path, head_path, head)
    setup.input.mkdir()
    source = setup.copy_head()
    mask = setup.write(setup.sphere_mask(), "mask.nii.gz")
    before = snapshot(tmp_path)
    code = cli.main(["run", str(source), str(setup.output), "--method", "blur", "--brain-mask", str(mask)])
    err = capfd.readouterr().err
    after = snapshot(tmp_path)
    assert code == 0, err
    added = set(after) - set(before)
    assert added == {"out", "out/deid.nii.gz", "out/deid.json"}, added
    assert {k: after[k] for k in before} == before


def test_internal_error_is_one_line_exit_1_and_writes_nothing(tmp_path, head_path, head, capfd, monkeypatch):
    """A failure in the middle of writing (the disk fills up) is an internal error: exit 1, one line, no files."""
    from MRIDeIdentifyLib import writer

    def write_then_fail(image, target, marker):
        Path(target).write_bytes(b"partial")
        raise OSError(28, "No space left on device\n(second line that must not be printed)")

    monkeypatch.delenv("MRIDEIDENTIFY_DEBUG", raising=False)
    monkeypatch.setattr(writer, "write_image", write_then_fail)
    setup = Setup(tmp_path, head_path, head)
    setup.input.mkdir()
    source = setup.copy_head()
    mask = setup.write(setup.sphere_mask(), "mask.nii.gz")
    before = snapshot(tmp_path)
    code = cli.main(["run", str(source), str(setup.output), "--method", "blur", "--brain-mask", str(mask)])
    captured = capfd.readouterr()
    after = snapshot(tmp_path)
    lines = error_lines(captured.err)
    assert code == 1, captured.err
    assert len(lines) == 1 and lines[0].startswith("mri-deidentify: internal error: OSError"), captured.err
    assert "No space left" in lines[0]
    # The output folder was created for staging, but nothing is left inside it.
    assert {k: v for k, v in after.items() if k != "out"} == before
