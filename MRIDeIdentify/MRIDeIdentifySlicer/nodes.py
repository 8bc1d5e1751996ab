"""Volume and segmentation nodes <-> the engine's SimpleITK images.

A volume node's IJK->RAS matrix is the voxel->RAS affine that the engine's reader already converts to and from
SimpleITK's LPS geometry (``MRIDeIdentifyLib.reader.set_ras_affine`` / ``ras_affine``): this file uses those, so the
RAS/LPS convention lives in one place. Voxels are copied in KJI order with their type. A node's parent transform is
never applied to the voxels: outputs are put under the same transform as the input instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Tuple

import numpy as np
import vtk

import slicer


def ijkToRas(volumeNode) -> np.ndarray:
    """The node's 4x4 IJK->RAS matrix (its parent transform not included)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def imageFromVolumeNode(volumeNode):
    """A SimpleITK image with the node's voxels (copied, same type) and its exact IJK->RAS geometry."""
    import SimpleITK as sitk
    from MRIDeIdentifyLib.reader import set_ras_affine

    array = slicer.util.arrayFromVolume(volumeNode) if volumeNode.GetImageData() is not None else None
    if array is None or array.ndim != 3:
        raise ValueError(f"'{volumeNode.GetName()}' is not a 3-D scalar volume.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    set_ras_affine(image, ijkToRas(volumeNode))
    return image


def fillVolumeNode(volumeNode, image, referenceNode) -> None:
    """Put ``image``'s voxels into ``volumeNode`` on ``referenceNode``'s grid, under its parent transform.

    ``image`` must lie on that grid (the engine keeps the input's grid); its matrix is copied from the reference,
    so the output's geometry is the input's to the last bit.
    """
    import SimpleITK as sitk
    from MRIDeIdentifyLib.reader import ras_affine

    reference = ijkToRas(referenceNode)
    dimensions = tuple(referenceNode.GetImageData().GetDimensions())
    tolerance = 1e-6 * max(1.0, float(np.abs(reference).max()))
    if tuple(image.GetSize()) != dimensions or not np.allclose(ras_affine(image), reference, atol=tolerance):
        raise RuntimeError(f"The result is not on the grid of '{referenceNode.GetName()}'; nothing was written.")
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(reference))
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
    volumeNode.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())


def forgetIdentity(volumeNode) -> None:
    """Detach a reused output node from any patient: DICOM attributes removed, subject hierarchy item moved to the
    scene root (a DICOM export of it would otherwise take the patient and study of its parent folders)."""
    for name in list(volumeNode.GetAttributeNames() or []):
        if name.startswith("DICOM"):
            volumeNode.RemoveAttribute(name)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
    item = shNode.GetItemByDataNode(volumeNode) if shNode else 0
    if item:
        shNode.SetItemParent(item, shNode.GetSceneItemID())


@contextmanager
def _nodesAddedAreRemoved(scene) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block (a labelmap export also adds display and colour nodes)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in before and scene.IsNodePresent(node):
                scene.RemoveNode(node)


def brainMaskImage(brainMaskNode, inputVolumeNode):
    """The user's brain mask (labelmap or segmentation node) as a SimpleITK image, or None when there is none."""
    if brainMaskNode is None:
        return None
    if brainMaskNode.GetTransformNodeID() != inputVolumeNode.GetTransformNodeID():
        raise ValueError(
            f"The brain mask '{brainMaskNode.GetName()}' and the input volume are under different "
            "transforms: harden the transforms first (Data module, right-click, Harden transform)."
        )
    if brainMaskNode.IsA("vtkMRMLSegmentationNode"):
        scene = inputVolumeNode.GetScene()
        with _nodesAddedAreRemoved(scene):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MRIDeIdentify_brain_mask__")
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
                brainMaskNode, labelmap, inputVolumeNode
            ):
                raise ValueError(f"The segmentation '{brainMaskNode.GetName()}' could not be exported as a mask.")
            return imageFromVolumeNode(labelmap)
    if brainMaskNode.IsA("vtkMRMLVolumeNode"):
        return imageFromVolumeNode(brainMaskNode)
    raise ValueError(f"'{brainMaskNode.GetName()}' is neither a segmentation nor a labelmap volume.")


def fillSegmentation(
    segmentationNode, mask, referenceNode, segmentName: str, color: Tuple[float, float, float]
) -> None:
    """Replace the segments of ``segmentationNode`` by one segment from ``mask`` (uint8 image on the reference grid),
    placed where the reference volume is, parent transform included."""
    scene = referenceNode.GetScene()
    # The segmentation goes under the reference's transform BEFORE the import: the import resamples the labelmap
    # (under that transform) into the segmentation's frame, so moving the segmentation afterwards would apply the
    # transform twice.
    segmentationNode.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
    with _nodesAddedAreRemoved(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MRIDeIdentify_mask__")
        fillVolumeNode(labelmap, mask, referenceNode)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise RuntimeError(f"Could not write the mask into '{segmentationNode.GetName()}'.")
    segment = segmentation.GetNthSegment(0)
    if segment is not None:
        segment.SetName(segmentName)
        segment.SetColor(*color)
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
