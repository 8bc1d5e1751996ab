"""Reading every format and orientation into the same 3-D image; writing them back without loss."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import head_files, params
from MRIDeIdentifyLib.reader import ras_affine, read_volume
from MRIDeIdentifyLib.writer import OutputSet, write_image


@pytest.mark.parametrize("path", params(head_files()))
def test_every_shared_head_reads_as_3d_scalar_with_nibabel_geometry(path):
    image = read_volume(path).image
    assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1
    reference = nib.load(str(path))
    assert tuple(image.GetSize()) == reference.shape[:3]
    # Same voxel->RAS mapping as nibabel up to float32 header precision.
    np.testing.assert_allclose(ras_affine(image), reference.affine, atol=2e-3)
    data = np.asanyarray(reference.dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f":  # scaled data: ITK scales in float32, nibabel in float64
        np.testing.assert_allclose(voxels, data.transpose(2, 1, 0), rtol=1e-6, atol=1e-4)
    else:
        assert np.array_equal(voxels, data.transpose(2, 1, 0))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz"])
def test_write_then_read_is_lossless_in_every_format(head_path, tmp_path, suffix):
    image = read_volume(head_path).image
    if suffix == ".mgz":  # MGH stores no uint16; the same head as int16 (its values fit)
        image = sitk.Cast(image, sitk.sitkInt16)
    target = tmp_path / f"head{suffix}"
    with OutputSet() as outputs:
        write_image(image, outputs.path(target), "de-identified by test")
    back = read_volume(target).image
    assert back.GetPixelID() == image.GetPixelID()
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_nifti_marker_written_and_input_text_fields_dropped(head_path, tmp_path):
    image = read_volume(head_path).image
    target = tmp_path / "out.nii.gz"
    with OutputSet() as outputs:
        write_image(image, outputs.path(target), "de-identified by MRIDeIdentify 0 (blur)")
    header = nib.load(str(target)).header
    assert header["descrip"].tobytes().rstrip(b"\0") == b"de-identified by MRIDeIdentify 0 (blur)"
    assert header["aux_file"].tobytes().strip(b"\0 ") == b""
    assert header["intent_name"].tobytes().strip(b"\0 ") == b""
    assert len(header.extensions) == 0


def test_failed_output_set_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputSet() as outputs:
            outputs.path(tmp_path / "a.nii.gz").write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
