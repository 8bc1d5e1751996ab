"""Behaviour kept through refactoring: ``run`` with each method and a fixed seed gives the recorded outputs.

Each case runs the real command (in process: the same ``main`` the console script calls) on a shared head
or DICOM series and hashes what it wrote: the voxels and geometry of the output and of both saved masks,
the sidecar without what depends on the machine or the release (timings, tool and Python versions), and
for DICOM output every header with the per-run secrets (new UIDs, the patient pseudonym) replaced by their
order of first appearance, so the hash still sees which UIDs are shared.

The recorded hashes live in ``data/regression_hashes.json``. After an intended change of output, record them
again with ``MRIDEIDENTIFY_RECORD_HASHES=1 pytest test_regression.py`` and say why in the commit.

``remodel``'s values outside the brain come from a torch network whose float sums depend on the thread count
and the CPU's vector instructions, so its voxels there cannot be hashed: its case hashes the brain's voxels
(copied bit for bit), the masks, the grid and the sidecar, and compares the rest with the recorded means of
4x4x4 blocks of the output within 0.2 % of its range.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import DICOM_DIR, HEADS_DIR, SKIP_REASON
from MRIDeIdentifyLib import __version__
from MRIDeIdentifyLib.cli import main
from MRIDeIdentifyLib.reader import read_volume

HASHES = Path(__file__).with_name("data") / "regression_hashes.json"
RECORD = os.environ.get("MRIDEIDENTIFY_RECORD_HASHES") == "1"
SEED = 7

# id -> (input under shared/data, output name, method). Every method but remodel at least once; every reading
# and writing path (NIfTI, MGZ, NRRD out, classic and enhanced DICOM: one file of a folder of two series
# reads that file's series) once. The brain mask is deepbet's, as a
# user gets it: about 4 s a case on a CPU, so each head carries two methods at most.
CASES = {
    "S06-nifti-blur": ("heads/S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz", "out.nii.gz", "blur"),
    "S06-nifti-reface": ("heads/S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz", "out.nii.gz", "reface"),
    "S05-mgz-deface": ("heads/S05_mne_sample_T1_3mm.mgz", "out.mgz", "deface"),
    "T02-nrrd-quickshear": ("heads/T02_MNI152_T1_2mmEXT.nii.gz", "out.nrrd", "quickshear"),
    "S01-dicom-classic-skullstrip": ("dicom/S01_decubitus_HFS_T1_sag", "out_dicom", "skullstrip"),
    "S06-dicom-enhanced-blur": ("dicom/S06_xa30_enhanced_T1w/5_anat-T1w_acq-tfl.dcm", "out_dicom", "blur"),
    "S06-nifti-reface-prior": ("heads/S06_dcmqa_xa30_T1w_ser6_2mm.nii.gz", "out.nii.gz", "reface-prior"),
    "S06-nifti-remodel": ("heads/S06_dcmqa_xa30_T1w_ser6_2mm.nii.gz", "out.nii.gz", "remodel"),
}
# Methods whose voxels outside the brain come from a network (see the module's docstring).
NETWORK_METHODS = ("remodel",)
BLOCKS = 4
BLOCK_TOLERANCE = 0.002
# Sidecar fields that say when, where and with which release a run happened, not what it produced; and
# tissue_gain, a ratio of medians of the network's output, compared within BLOCK_TOLERANCE.
MACHINE_FIELDS = ("timings_s", "version", "python", "tissue_gain")


def image_digest(path: Path) -> str:
    """sha256 of the voxels (stored type, KJI bytes) and the grid of the image at ``path``."""
    image = read_volume(path).image
    array = sitk.GetArrayViewFromImage(image)
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [str(array.dtype), array.shape, image.GetSpacing(), image.GetOrigin(), image.GetDirection()]
        ).encode()
    )
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def sidecar_digest(path: Path) -> str:
    record = json.loads(path.read_text(encoding="utf-8"))
    for name in MACHINE_FIELDS:
        record.pop(name, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def dicom_digest(folder: Path) -> str:
    """sha256 of every file's header and pixel data, per-run secrets replaced by their order of appearance."""
    secrets: Dict[str, str] = {}
    lines: List[str] = []

    def walk(ds: pydicom.Dataset, depth: int) -> None:
        for element in ds:
            if element.VR == "SQ":
                lines.append(f"{depth} {element.tag} SQ {len(element.value)}")
                for item in element.value:
                    walk(item, depth + 1)
                continue
            value = element.value
            if element.tag == 0x7FE00010:
                value = hashlib.sha256(value).hexdigest()
            elif element.VR == "UI" and not str(value).startswith("1.2.840.10008."):  # not a DICOM-defined UID
                value = secrets.setdefault(str(value), f"uid{len(secrets)}")
            elif element.keyword in ("PatientID", "PatientName"):
                value = secrets.setdefault(str(value), f"pseudonym{len(secrets)}")
            lines.append(f"{depth} {element.tag} {element.VR} {str(value).replace(__version__, '<version>')}")

    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path))
        lines.append(f"file {path.name} {ds.file_meta.TransferSyntaxUID}")
        walk(ds, 0)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_case(tmp_path: Path, source: Path, output_name: str, method: str) -> Dict[str, str]:
    output = tmp_path / output_name
    argv = [
        "run",
        str(source),
        str(output),
        "--method",
        method,
        "--seed",
        str(SEED),
        "--device",
        "cpu",
        "--save-brain-mask",
        str(tmp_path / "brain.nii.gz"),
        "--save-face-mask",
        str(tmp_path / "face.nii.gz"),
    ]
    assert main(argv) == 0
    digests: Dict[str, object] = {
        "output": dicom_digest(output) if output.is_dir() else image_digest(output),
        "brain_mask": image_digest(tmp_path / "brain.nii.gz"),
        "face_mask": image_digest(tmp_path / "face.nii.gz"),
    }
    sidecars = sorted(p for p in tmp_path.glob("*.json"))
    assert len(sidecars) == 1, sidecars
    digests["sidecar"] = sidecar_digest(sidecars[0])
    if method in NETWORK_METHODS:
        digests.update(network_digests(output, tmp_path / "brain.nii.gz", sidecars[0]))
    return digests


def network_digests(output: Path, brain_mask: Path, sidecar: Path) -> Dict[str, object]:
    """The brain's voxels and the grid hashed, the rest of the output as block means (see the module's docstring)."""
    image = read_volume(output).image
    array = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayFromImage(read_volume(brain_mask).image) > 0
    digest = hashlib.sha256(
        json.dumps(
            [str(array.dtype), array.shape, image.GetSpacing(), image.GetOrigin(), image.GetDirection()]
        ).encode()
    )
    digest.update(np.ascontiguousarray(array[brain]).tobytes())
    values = array.astype(np.float64)
    blocks = [
        float(block.mean())
        for slab in np.array_split(values, BLOCKS, axis=0)
        for row in np.array_split(slab, BLOCKS, axis=1)
        for block in np.array_split(row, BLOCKS, axis=2)
    ]
    gain = json.loads(sidecar.read_text(encoding="utf-8"))["tissue_gain"]
    return {
        "output": digest.hexdigest(),
        "block_means": [round(v, 3) for v in blocks],
        "range": float(np.ptp(values)),
        "tissue_gain": gain,
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_output_is_unchanged(case, tmp_path):
    relative, output_name, method = CASES[case]
    source = HEADS_DIR.parent / relative
    if not source.exists():
        pytest.skip(SKIP_REASON if not (HEADS_DIR.is_dir() or DICOM_DIR.is_dir()) else f"{source} is absent")
    digests = run_case(tmp_path, source, output_name, method)
    recorded = json.loads(HASHES.read_text(encoding="utf-8")) if HASHES.is_file() else {}
    if RECORD:
        recorded[case] = digests
        HASHES.parent.mkdir(exist_ok=True)
        HASHES.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    assert case in recorded, f"no recorded hashes for {case}: record them with MRIDEIDENTIFY_RECORD_HASHES=1"
    expected = dict(recorded[case])
    if method in NETWORK_METHODS:
        tolerance = BLOCK_TOLERANCE * float(expected.pop("range"))
        blocks = np.array(digests.pop("block_means"))
        wanted = np.array(expected.pop("block_means"))
        assert np.abs(blocks - wanted).max() <= tolerance, np.abs(blocks - wanted).max()
        assert abs(float(digests.pop("tissue_gain")) - float(expected.pop("tissue_gain"))) <= BLOCK_TOLERANCE
        digests.pop("range")
    assert digests == expected
