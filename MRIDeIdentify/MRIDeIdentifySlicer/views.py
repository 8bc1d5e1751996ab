"""The before/after check in the application's 3-D views.

A dual 3-D layout: the input volume-rendered in the left view, the output in the right, both with the same transfer
functions fitted to the input's intensities, both cameras in front of the face and linked. Slicer's MR preset was
drawn for one 8-bit-like scan (MRHead): copied unchanged it renders nothing for a float scan in [0, 1] and a fog of
noise for a 12-bit one. Its scalar axis is therefore mapped onto the scan's own levels: the preset's ramp start onto
the engine's head threshold (the skin level), its bright-tissue point onto the scan's bright tissue. The views'
linking is put back as it was when the layout is changed away from the dual 3-D view.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import vtk

import slicer

from .nodes import ijkToRas, imageFromVolumeNode

PRESET = "MR-Default"
# Where MR-Default's opacity ramp starts (about MRHead's skin level) and where its colour reaches bright tissue.
PRESET_SKIN, PRESET_TISSUE = 20.0, 220.0
# Share of the head's voxels darker than the "bright tissue" level the preset's PRESET_TISSUE is mapped to.
TISSUE_PERCENTILE = 99.0


def intensityLevels(image) -> Tuple[float, float]:
    """(skin, tissue) of a scan in its own units: the engine's head threshold, and the 99th percentile of the voxels
    above it."""
    import SimpleITK as sitk
    from MRIDeIdentifyLib.headmask import head_threshold

    skin = head_threshold(image)
    voxels = sitk.GetArrayViewFromImage(image)
    above = voxels[voxels > skin]
    tissue = float(np.percentile(above, TISSUE_PERCENTILE)) if above.size else skin
    if not tissue > skin:
        tissue = skin + max(abs(skin), 1e-6)
    return float(skin), tissue


def fitVolumeProperty(propertyNode, presetNode, skin: float, tissue: float) -> None:
    """``propertyNode`` := ``presetNode`` with its scalar axis mapped linearly so that the preset's skin and tissue
    points land on ``skin`` and ``tissue`` (gradient magnitudes are scaled by the same factor)."""
    propertyNode.Copy(presetNode)
    scale = (tissue - skin) / (PRESET_TISSUE - PRESET_SKIN)
    volumeProperty = propertyNode.GetVolumeProperty()
    _mapPoints(volumeProperty.GetScalarOpacity(), lambda x: skin + (x - PRESET_SKIN) * scale, 4)
    _mapPoints(volumeProperty.GetGradientOpacity(), lambda x: x * scale, 4)
    _mapPoints(volumeProperty.GetRGBTransferFunction(), lambda x: skin + (x - PRESET_SKIN) * scale, 6)
    propertyNode.Modified()


def _points(function, width: int) -> List[List[float]]:
    """The points of a vtkPiecewiseFunction (width 4: x, y, midpoint, sharpness) or vtkColorTransferFunction (6)."""
    points = []
    for index in range(function.GetSize()):
        values = [0.0] * width
        function.GetNodeValue(index, values)
        points.append(values)
    return points


def _mapPoints(function, mapping, width: int) -> None:
    """Move every point of a transfer function along its scalar axis by ``mapping``."""
    points = _points(function, width)
    function.RemoveAllPoints()
    for x, *rest in points:
        if width == 4:
            function.AddPoint(mapping(x), *rest)
        else:
            function.AddRGBPoint(mapping(x), *rest)


def transferFunctionPoints(propertyNode) -> Dict[str, List[List[float]]]:
    """The scalar opacity, gradient opacity and colour points of a volume property node (to compare two views)."""
    volumeProperty = propertyNode.GetVolumeProperty()
    return {
        "opacity": _points(volumeProperty.GetScalarOpacity(), 4),
        "gradient": _points(volumeProperty.GetGradientOpacity(), 4),
        "colour": _points(volumeProperty.GetRGBTransferFunction(), 6),
    }


class BeforeAfterViews:
    """Shows the before/after layout and remembers what it changed in the views, to put it back afterwards."""

    def __init__(self, volumeRenderingLogic=None):
        # The application's volume rendering logic unless given (a headless scene brings its own).
        self.volumeRenderingLogic = volumeRenderingLogic
        self._layoutNode = None
        self._observer: Optional[int] = None
        self._linkedBefore: Dict[str, int] = {}

    def show(self, inputVolumeNode, outputVolumeNode) -> List:
        """Dual 3-D layout, the input left and the output right, fitted rendering, cameras on the face, linked.
        Returns the two view nodes (left, right)."""
        if inputVolumeNode is None or outputVolumeNode is None:
            raise ValueError("Select an input volume and a de-identified output volume first.")
        scene = inputVolumeNode.GetScene()
        layoutNode = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layoutNode is None:
            raise RuntimeError("The scene has no layout node (no 3-D views to show the volumes in).")
        # Creates the second 3-D view node when it does not exist yet, as the application's layout manager does.
        layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView)
        views = {}
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLViewNode")):
            view = scene.GetNthNodeByClass(index, "vtkMRMLViewNode")
            views[view.GetLayoutName()] = view
        if "1" not in views or "2" not in views:
            raise RuntimeError("The dual 3-D layout did not create its two 3-D views.")
        left, right = views["1"], views["2"]

        vrLogic = self.volumeRenderingLogic or slicer.modules.volumerendering.logic()
        preset = vrLogic.GetPresetByName(PRESET)
        if preset is None:
            raise RuntimeError(f"The volume rendering preset '{PRESET}' was not found.")
        inputImage = imageFromVolumeNode(inputVolumeNode)
        skin, tissue = intensityLevels(inputImage)
        for volumeNode, view in ((inputVolumeNode, left), (outputVolumeNode, right)):
            for otherVolume in (inputVolumeNode, outputVolumeNode):
                hidden = vrLogic.GetFirstVolumeRenderingDisplayNode(otherVolume)
                if otherVolume is not volumeNode and hidden is not None:
                    hidden.RemoveViewNodeID(view.GetID())
            displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
            if displayNode is None:
                displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
            # Both views get the input's levels: the same transfer functions, so that they compare.
            fitVolumeProperty(displayNode.GetVolumePropertyNode(), preset, skin, tissue)
            if displayNode.GetViewNodeIDs():
                displayNode.RemoveAllViewNodeIDs()
            displayNode.AddViewNodeID(view.GetID())
            displayNode.SetVisibility(True)

        lookAtFace(inputVolumeNode, inputImage, [left, right])
        self._link(layoutNode, [left, right])
        return [left, right]

    def _link(self, layoutNode, viewNodes) -> None:
        if self._observer is None:
            self._linkedBefore = {view.GetID(): view.GetLinkedControl() for view in viewNodes}
            self._layoutNode = layoutNode
            self._observer = layoutNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onLayoutModified)
        for view in viewNodes:
            view.SetLinkedControl(True)

    def _onLayoutModified(self, layoutNode, event) -> None:
        if layoutNode.GetViewArrangement() != slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView:
            self.restore()

    def restore(self) -> None:
        """Put the views' linking back as it was before :meth:`show` (also when the layout is left)."""
        if self._observer is None:
            return
        layoutNode, self._layoutNode = self._layoutNode, None
        layoutNode.RemoveObserver(self._observer)
        self._observer = None
        scene = layoutNode.GetScene()
        for viewID, linked in self._linkedBefore.items():
            view = scene.GetNodeByID(viewID) if scene is not None else None
            if view is not None:
                view.SetLinkedControl(linked)
        self._linkedBefore = {}


def faceDirectionsRas(volumeNode, image) -> Tuple[np.ndarray, np.ndarray]:
    """Anterior and superior unit vectors of the head in world RAS: the engine's ``render.face_direction`` (in the
    scan's LPS frame) written in the scan's voxel axes, carried to RAS through the node's IJK->RAS directions, then
    through the node's parent transform when it is linear."""
    from MRIDeIdentifyLib.render import face_direction

    lpsAxes = np.asarray(image.GetDirection(), float).reshape(3, 3)
    rasAxes = ijkToRas(volumeNode)[:3, :3] / np.asarray(image.GetSpacing(), float)
    toWorld = np.eye(3)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None and transformNode.IsTransformToWorldLinear():
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(matrix)
        toWorld = slicer.util.arrayFromVTKMatrix(matrix)[:3, :3]
    directions = []
    for vector in face_direction(image):
        world = toWorld @ rasAxes @ (lpsAxes.T @ vector)
        directions.append(world / np.linalg.norm(world))
    return directions[0], directions[1]


def lookAtFace(volumeNode, image, viewNodes) -> None:
    """Place every view's camera in front of the face of ``volumeNode`` (``image`` its voxels), the head in the field."""
    anterior, superior = faceDirectionsRas(volumeNode, image)
    bounds = np.zeros(6)
    volumeNode.GetRASBounds(bounds)
    centre = (bounds[0::2] + bounds[1::2]) / 2
    # The view angle is 30 degrees: this distance fits the head's largest extent with a margin.
    distance = 3.0 * float(np.max(bounds[1::2] - bounds[0::2]))
    for view in viewNodes:
        camera = cameraOf(view)
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre + distance * anterior))
        camera.SetViewUp(*superior)
        camera.ResetClippingRange()


def cameraOf(viewNode):
    """The camera node of a 3-D view (created when the view has none yet, as the application does)."""
    scene = viewNode.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLCameraNode")):
        camera = scene.GetNthNodeByClass(index, "vtkMRMLCameraNode")
        if camera.GetLayoutName() == viewNode.GetLayoutName():
            return camera
    camera = scene.AddNewNodeByClass("vtkMRMLCameraNode")
    camera.SetLayoutName(viewNode.GetLayoutName())
    return camera
