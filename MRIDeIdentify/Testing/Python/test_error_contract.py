"""One error contract for every subcommand, and a header fuzz on a real head.

Bad usage and bad input exit 2 with one line ``mri-deidentify: error: ...`` in the user's terms; nothing
else ever crashes (exit 1) on a damaged NIfTI header. The fuzz damages the header of a real head in many
seeded ways (random bytes, dimensions, voxel sizes NaN/inf/0/negative, orientation, truncation, gzip) and
checks, for each, exit 0 or 2, the input untouched and nothing partial left beside the output.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

from MRIDeIdentifyLib import cli
from MRIDeIdentifyLib.reader import image_like
from test_bad_input import error_lines, snapshot

# What ITK and the libraries say about themselves, never about the user's file.
LIBRARY_WORDS = re.compile(r"ITK|\.cxx|\.hxx|0x[0-9a-f]{6,}|SimpleITK-build|Traceback|nibabel", re.IGNORECASE)
FUZZ_SEED = 20261129
FUZZ_RANDOM_CASES = 16
# Compressed too: the damages whose reading differs through gzip (each case costs a second or three).
GZIP_CASES = ("cut-in-header", "cut-in-data", "dim1-huge", "pixdim-nan", "random-00", "random-01")
Damage = Callable[[bytearray], bytes]


def run_cli(argv: List[str], capfd) -> tuple:
    capfd.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses usage by exiting
        code = exit_.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_one_line_refusal(code: int, err: str) -> str:
    lines = error_lines(err)
    assert code == 2, f"exit {code}; stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("mri-deidentify: error: "), err
    assert not LIBRARY_WORDS.search(lines[0]), lines[0]
    return lines[0]


def test_train_without_data_is_bad_usage(capfd):
    code, out, err = run_cli(["train", "--steps", "1"], capfd)
    assert "--data is required" in assert_one_line_refusal(code, err)
    assert out == ""


def test_evaluate_speaks_like_run(tmp_path, capfd):
    code, _, err = run_cli(
        ["evaluate", "--data", str(tmp_path / "absent"), "--methods", "blur", "--out", str(tmp_path / "report")], capfd
    )
    assert "not a folder" in assert_one_line_refusal(code, err)
    code, _, err = run_cli(["evaluate", "--data", str(tmp_path)], capfd)
    assert "--methods" in assert_one_line_refusal(code, err)
    assert not (tmp_path / "report").exists()


def test_every_subcommand_refuses_an_unknown_option_the_same_way(capfd):
    for command in ("run", "batch", "demo", "train", "evaluate"):
        code, _, err = run_cli([command, "--no-such-option"], capfd)
        assert_one_line_refusal(code, err)


# ------------------------------------------------------------------------------------------------ fuzz


def _set(offset: int, fmt: str, *values) -> Damage:
    def damage(header: bytearray) -> bytes:
        struct.pack_into(fmt, header, offset, *values)
        return bytes(header)

    return damage


def _cut(length: int) -> Damage:
    return lambda data: bytes(data[:length])


# Named damages at the NIfTI-1 offsets: dim at 40 (int16), pixdim at 76 (float32), vox_offset 108, scl_slope
# 112, datatype 70, qform_code 252, quatern_b 256, srow_x 280, magic 344.
NAMED: Dict[str, Damage] = {
    "dim0-zero": _set(40, "<h", 0),
    "dim0-nine": _set(40, "<h", 9),
    "dim1-negative": _set(42, "<h", -5),
    "dim2-zero": _set(44, "<h", 0),
    "dim3-one": _set(46, "<h", 1),
    "dim1-huge": _set(42, "<h", 32000),
    "dim4-many-volumes": lambda h: _set(48, "<h", 3)(bytearray(_set(40, "<h", 4)(h))),
    "pixdim-nan": _set(80, "<f", float("nan")),
    "pixdim-inf": _set(84, "<f", float("inf")),
    "pixdim-zero": _set(88, "<f", 0.0),
    "pixdim-negative": _set(80, "<f", -2.0),
    "pixdim-tiny": _set(80, "<f", 1e-30),
    "datatype-unknown": _set(70, "<h", 77),
    "datatype-float64": _set(70, "<h", 64),
    "vox-offset-nan": _set(108, "<f", float("nan")),
    "vox-offset-past-end": _set(108, "<f", 1e9),
    "scl-slope-nan": _set(112, "<f", float("nan")),
    "scl-slope-inf": _set(112, "<f", float("inf")),
    "quatern-nan": _set(256, "<f", float("nan")),
    "qform-code-unknown": _set(252, "<h", 99),
    "srow-nan": _set(280, "<f", float("nan")),
    "srow-singular": _set(280, "<4f", 0.0, 0.0, 0.0, 0.0),
    "magic-broken": lambda h: bytes(h[:344]) + b"xxxx" + bytes(h[348:]),
    "sizeof-hdr-wrong": _set(0, "<i", 12),
    "cut-in-header": _cut(200),
    "cut-before-data": _cut(348),
    "cut-in-data": lambda data: bytes(data[: len(data) // 2]),
}


def _random_damage(index: int) -> Damage:
    """Random bytes over a random stretch of the header (seeded: the same cases on every run)."""
    rng = np.random.default_rng([FUZZ_SEED, index])

    def damage(header: bytearray) -> bytes:
        start = int(rng.integers(0, 348))
        length = int(rng.integers(1, 9))
        header[start : start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        return bytes(header)

    return damage


FUZZ: Dict[str, Damage] = {**NAMED, **{f"random-{i:02d}": _random_damage(i) for i in range(FUZZ_RANDOM_CASES)}}


@pytest.fixture(scope="module")
def raw_head(head_path: Path) -> bytes:
    """The S06 head's uncompressed NIfTI bytes (header, then voxels)."""
    return gzip.decompress(head_path.read_bytes())


@pytest.fixture(scope="module")
def brain_mask(head_path: Path, tmp_path_factory) -> Path:
    """A brain mask for the undamaged head so that accepted cases skip deepbet: a ball of the head's middle."""
    import SimpleITK as sitk

    head = sitk.ReadImage(str(head_path))
    size = np.array(head.GetSize())[::-1]
    k, j, i = np.indices(size)
    ball = ((k - size[0] / 2) ** 2 + (j - size[1] / 2) ** 2 + (i - size[2] / 2) ** 2) < (size.min() / 4) ** 2
    mask = image_like(ball.astype(np.uint8), head)
    path = tmp_path_factory.mktemp("mask") / "brain.nii.gz"
    sitk.WriteImage(mask, str(path))
    return path


FUZZ_PARAMS = [pytest.param(name, False, id=f"{name}-nii") for name in sorted(FUZZ)] + [
    pytest.param(name, True, id=f"{name}-nii.gz") for name in GZIP_CASES
]


@pytest.mark.parametrize("name, compressed", FUZZ_PARAMS)
def test_damaged_header_is_refused_or_read_never_crashes(
    name, compressed, raw_head, brain_mask, tmp_path, capfd, monkeypatch
):
    monkeypatch.delenv("MRIDEIDENTIFY_DEBUG", raising=False)
    damaged = FUZZ[name](bytearray(raw_head))
    source = tmp_path / "in" / ("scan.nii.gz" if compressed else "scan.nii")
    source.parent.mkdir()
    source.write_bytes(gzip.compress(damaged, mtime=0) if compressed else damaged)
    output = tmp_path / "out" / "deid.nii.gz"
    before = snapshot(tmp_path)
    code, out, err = run_cli(
        ["run", str(source), str(output), "--method", "skullstrip", "--brain-mask", str(brain_mask)], capfd
    )
    after = snapshot(tmp_path)
    assert {key: after.get(key) for key in before} == before, "the input changed"
    if code == 2:
        assert_one_line_refusal(code, err)
        assert out == "" and after == before, "a refusal wrote files"
    else:
        assert code == 0, f"exit {code}: {err!r}"
        assert set(after) - set(before) == {"out", "out/deid.nii.gz", "out/deid.json"}


def test_fuzz_reaches_both_outcomes_and_names_the_damage(raw_head, brain_mask, tmp_path, capfd):
    """The fuzz is not vacuous: some damages are read, and the named ones are refused in the user's terms."""
    expected = {
        "pixdim-nan": "voxel sizes",
        "pixdim-zero": "voxel sizes",
        "dim0-nine": "number of dimensions",
        "srow-nan": "orientation matrix",
        "cut-in-header": "ends inside the NIfTI header",
        "cut-in-data": "truncated",
        "datatype-unknown": "header is damaged",
    }
    for name, words in expected.items():
        source = tmp_path / f"{name}.nii"
        source.write_bytes(FUZZ[name](bytearray(raw_head)))
        code, _, err = run_cli(
            [
                "run",
                str(source),
                str(tmp_path / "out.nii.gz"),
                "--method",
                "skullstrip",
                "--brain-mask",
                str(brain_mask),
            ],
            capfd,
        )
        assert words in assert_one_line_refusal(code, err), name
    source = tmp_path / "scl.nii"
    source.write_bytes(FUZZ["scl-slope-nan"](bytearray(raw_head)))
    code, _, err = run_cli(
        ["run", str(source), str(tmp_path / "ok.nii.gz"), "--method", "skullstrip", "--brain-mask", str(brain_mask)],
        capfd,
    )
    assert code == 0, err


def test_every_subcommand_offers_the_same_devices(tmp_path, capfd):
    from MRIDeIdentifyLib.devices import DEVICE_CHOICES

    listed = ", ".join(f"'{name}'" for name in DEVICE_CHOICES)
    for argv in (
        ["run", "in.nii.gz", "out.nii.gz"],
        ["batch", "in", "out"],
        ["demo"],
        ["train", "--data", "d"],
        ["evaluate", "--data", "d", "--methods", "blur", "--out", "o"],
    ):
        code, _, err = run_cli([*argv, "--device", "tpu"], capfd)
        assert listed in assert_one_line_refusal(code, err), argv


def test_device_list_needs_no_torch():
    """The Slicer panel lists the devices before torch is installed."""
    import subprocess
    import sys

    code = (
        "import sys, MRIDeIdentifyLib.devices as d; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert list(d.DEVICE_LABELS) == list(d.DEVICE_CHOICES)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
