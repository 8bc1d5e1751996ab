"""NIfTI and NRRD header hygiene: identifying text planted in every text field of the input never reaches the output.

The input is a real head (P06, 2 mm) rewritten with a planted string in each free-text field (NIfTI descrip,
aux_file, intent_name, db_name, data_type, a comment extension; NRRD comment, content, key/value pairs) and
a file name holding a patient's name. ``mri-deidentify run`` de-identifies it and every byte written (the image,
decompressed, the brain mask and the JSON sidecar) is searched for each planted string.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Dict, List

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from MRIDeIdentifyLib import cli
from MRIDeIdentifyLib.reader import image_like

NAME_IN_PATH = "DoeJohnPatientName"
NIFTI_FIELDS = {"descrip": 80, "aux_file": 24, "intent_name": 16, "db_name": 18, "data_type": 10}


def _plant(field: str) -> str:
    return f"PLANT{field.replace('_', '')}"


def _brain_box(image_path: Path, out: Path) -> Path:
    """A central box as the user-supplied brain mask: the run then skips the learned extractor (fast)."""
    image = sitk.ReadImage(str(image_path))
    mask = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    k, j, i = mask.shape
    mask[k // 3 : 2 * k // 3, j // 3 : 2 * j // 3, i // 3 : 2 * i // 3] = 1
    mask_image = image_like(mask, image)
    sitk.WriteImage(mask_image, str(out))
    return out


def _planted_nifti(head: Path, folder: Path) -> tuple:
    source = nib.load(str(head))
    header = source.header.copy()
    planted = []
    for field, size in NIFTI_FIELDS.items():
        header[field] = _plant(field).encode()[:size]
        planted.append(_plant(field)[:size])
    comment = "PLANTextension Doe^John MRN 0012345 Example Hospital"
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", comment.encode()))
    planted += ["PLANTextension", "0012345"]
    path = folder / f"sub-{NAME_IN_PATH}_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine, header), str(path))
    reread = nib.load(str(path)).header
    assert reread["descrip"].item().decode() == _plant("descrip") and reread.extensions
    return path, planted


def _planted_nrrd(head: Path, folder: Path) -> tuple:
    image = sitk.ReadImage(str(head))
    image.SetMetaData("PatientName", "PLANTkeyvalue")
    path = folder / f"sub-{NAME_IN_PATH}_T1w.nrrd"
    sitk.WriteImage(image, str(path), useCompression=False)
    data = path.read_bytes()
    magic, rest = data.split(b"\n", 1)
    path.write_bytes(magic + b"\n# PLANTcomment Doe^John\ncontent: PLANTcontent\n" + rest)
    keys = {key: sitk.ReadImage(str(path)).GetMetaData(key) for key in sitk.ReadImage(str(path)).GetMetaDataKeys()}
    assert "PLANTkeyvalue" in keys.values()
    return path, ["PLANTkeyvalue", "PLANTcomment", "PLANTcontent"]


def _written_bytes(paths: List[Path]) -> Dict[str, bytes]:
    blobs = {}
    for path in paths:
        data = path.read_bytes()
        blobs[path.name] = gzip.decompress(data) if path.name.endswith(".gz") else data
        if path.name.endswith(".nrrd"):  # gzip-encoded voxels after a plain-text header
            header, _, payload = data.partition(b"\n\n")
            blobs[path.name] = header + gzip.decompress(payload)
    return blobs


@pytest.mark.parametrize("kind", ["nifti", "nrrd"])
def test_planted_header_text_never_reaches_the_output(kind, head_path, tmp_path, capsys):
    inputs = tmp_path / NAME_IN_PATH
    inputs.mkdir()
    source, planted = (_planted_nifti if kind == "nifti" else _planted_nrrd)(head_path, inputs)
    suffix = ".nii.gz" if kind == "nifti" else ".nrrd"
    out, mask = tmp_path / "out" / f"deid{suffix}", tmp_path / "out" / f"brain{suffix}"
    brain = _brain_box(source, tmp_path / "box.nii.gz")
    argv = [
        "run",
        str(source),
        str(out),
        "--method",
        "blur",
        "--brain-mask",
        str(brain),
        "--save-brain-mask",
        str(mask),
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    written = sorted(p for p in out.parent.iterdir())
    assert {p.name for p in written} == {out.name, mask.name, "deid.json"}
    blobs = _written_bytes(written)
    for text in planted + [NAME_IN_PATH, str(inputs)]:
        for name, blob in blobs.items():
            assert text.encode() not in blob, f"{text!r} reached {name}"
    image_bytes = blobs[out.name]
    assert b"MRIDeIdentify" in image_bytes  # the de-identification marker replaces the free text
    if kind == "nifti":
        header = nib.load(str(out)).header
        assert not header.extensions
        assert header["descrip"].item().startswith(b"de-identified by MRIDeIdentify")
        for field in ("aux_file", "intent_name", "db_name", "data_type"):
            assert header[field].item() == b""
