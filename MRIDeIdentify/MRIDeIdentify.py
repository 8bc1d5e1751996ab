"""3D Slicer module: de-identify a head MRI volume by remodeling everything outside the brain.

Four classes in order: the module description, the Widget (the Qt panel, wiring only), the Logic (nodes to the
engine's inputs and back, no Qt) and the Test (run inside the application). The work itself is done by the
engine package ``MRIDeIdentifyLib`` beside this file, which knows nothing of Slicer.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np
import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# What the panel offers, in the order shown: (parameter value, label). "cuda" is the GPU: the engine never picks
# MPS on its own because some of its 3-D operators are missing there.
DEVICES: Tuple[Tuple[str, str], ...] = (("auto", "Auto (GPU if available)"), ("cuda", "GPU (CUDA)"), ("cpu", "CPU"))
DEFAULT_METHOD = "remodel"
DEFAULT_MARGIN_MM = 3.0
# The privacy transform's defaults (MRIDeIdentifyLib/privacy.py); a test keeps them equal.
DEFAULT_ROTATIONS = 8
DEFAULT_FACETS = 100
MINIMUM_TORCH_VERSION = "2.1"
# Python packages the engine needs beyond what Slicer ships (numpy, scipy, SimpleITK, vtk, Pillow) and torch:
# (import name, pip arguments, what for). deepbet goes in without its dependencies, which pull a GUI toolkit;
# the engine only loads its TorchScript weights.
PIP_REQUIREMENTS: Tuple[Tuple[str, str, str], ...] = (
    ("safetensors", "safetensors>=0.4", "reads the remodeling model's weights"),
    ("deepbet", "deepbet --no-deps", "the learned brain extractor (its weights)"),
    ("pydeface", "pydeface --no-deps", "the average head that 'reface' and 'deface' register to the subject"),
    ("nibabel", "nibabel>=5.0", "image headers for the quickshear baseline"),
    ("quickshear", "quickshear>=1.2", "the quickshear removal baseline"),
)


#
# MRIDeIdentify
#


class MRIDeIdentify(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MRI De-identify"
        self.parent.categories = ["Utilities"]
        self.parent.dependencies = []
        self.parent.contributors = ["MRIDeIdentify contributors"]
        self.parent.helpText = """
De-identify a head MRI: the face, ears, scalp and skull are remodeled by a conditional generative model
(C-DeID-GAN) while every voxel of the brain (plus a safety margin) is copied bit for bit. The output keeps the
input's grid, orientation, resolution and voxel type. Check the result with "Show before/after".
See the <a href="https://github.com/mrideidentify/SlicerMRIDeIdentify">extension documentation</a>.
"""
        self.parent.acknowledgementText = """
Implements and extends C-DeID-GAN (conditional de-identification GAN for head MRI). Brain extraction by
deepbet (MIT). Volume rendering and scene handling by 3D Slicer.
"""


#
# MRIDeIdentifyWidget
#


class MRIDeIdentifyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: every control is mirrored in the parameter node, so a saved scene restores it."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job = None
        self._pollTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRIDeIdentify.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top widget's mrmlSceneChanged to every node combobox's setMRMLScene.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MRIDeIdentifyLogic()

        for value, label in DEVICES:
            self.ui.deviceComboBox.addItem(label, value)
        self._populateMethods()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.brainMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputBrainMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputFaceMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.seedSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.marginSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.rotationsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.facetsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showBeforeAfterButton.connect("clicked(bool)", self.onShowBeforeAfter)
        self.ui.saveQARendersButton.connect("clicked(bool)", self.onSaveQARenders)
        self.ui.progressBar.hide()

        self.initializeParameterNode()

    def _populateMethods(self):
        """Fill the method list from the engine's registry (it needs torch; before installation only the default)."""
        # Refilling must not write a transient selection into the parameter node (it would replace the user's).
        wasBlocked = self.ui.methodComboBox.blockSignals(True)
        self.ui.methodComboBox.clear()
        for name, summary in self.logic.availableMethods():
            self.ui.methodComboBox.addItem(name, name)
            self.ui.methodComboBox.setItemData(self.ui.methodComboBox.count - 1, summary, qt.Qt.ToolTipRole)
        self.ui.methodComboBox.blockSignals(wasBlocked)

    def cleanup(self):
        self._abandonJob(resetPanel=False)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self._abandonJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.SetNodeReferenceID("InputVolume", firstVolumeNode.GetID())

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            node = self._parameterNode
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.brainMaskSelector.setCurrentNode(node.GetNodeReference("BrainMask"))
            self.ui.outputVolumeSelector.setCurrentNode(node.GetNodeReference("OutputVolume"))
            self.ui.outputBrainMaskSelector.setCurrentNode(node.GetNodeReference("OutputBrainMask"))
            self.ui.outputFaceMaskSelector.setCurrentNode(node.GetNodeReference("OutputFaceMask"))
            methodIndex = self.ui.methodComboBox.findData(node.GetParameter("Method"))
            self.ui.methodComboBox.setCurrentIndex(max(methodIndex, 0))
            self.ui.methodDescriptionLabel.text = self.ui.methodComboBox.itemData(
                self.ui.methodComboBox.currentIndex, qt.Qt.ToolTipRole) or ""
            self.ui.deviceComboBox.setCurrentIndex(max(self.ui.deviceComboBox.findData(node.GetParameter("Device")), 0))
            self.ui.modelPathLineEdit.currentPath = node.GetParameter("ModelPath")
            self.ui.seedSpinBox.value = int(node.GetParameter("Seed"))
            self.ui.marginSpinBox.value = float(node.GetParameter("MarginMm"))
            self.ui.rotationsSpinBox.value = int(node.GetParameter("Rotations"))
            self.ui.facetsSpinBox.value = int(node.GetParameter("Facets"))

            inputVolume = node.GetNodeReference("InputVolume")
            outputVolume = node.GetNodeReference("OutputVolume")
            if inputVolume:
                self.ui.outputVolumeSelector.baseName = self.logic.outputName(inputVolume)
            # The model file and the privacy-transform settings only matter to the learned remodeling.
            remodel = node.GetParameter("Method") == DEFAULT_METHOD
            for widget in (self.ui.modelPathLineEdit, self.ui.rotationsSpinBox, self.ui.facetsSpinBox):
                widget.enabled = remodel and not self._running
            self.ui.applyButton.enabled = bool(inputVolume) or self._running
            self.ui.applyButton.toolTip = ("Stop the running de-identification" if self._running else
                                           "De-identify the input volume" if inputVolume else "Select an input volume")
            canCompare = bool(inputVolume and outputVolume and outputVolume.GetImageData()) and not self._running
            self.ui.showBeforeAfterButton.enabled = canCompare
            self.ui.saveQARendersButton.enabled = canCompare
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        wasModified = node.StartModify()
        node.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
        node.SetNodeReferenceID("BrainMask", self.ui.brainMaskSelector.currentNodeID)
        node.SetNodeReferenceID("OutputVolume", self.ui.outputVolumeSelector.currentNodeID)
        node.SetNodeReferenceID("OutputBrainMask", self.ui.outputBrainMaskSelector.currentNodeID)
        node.SetNodeReferenceID("OutputFaceMask", self.ui.outputFaceMaskSelector.currentNodeID)
        node.SetParameter("Method", self.ui.methodComboBox.currentData or DEFAULT_METHOD)
        node.SetParameter("Device", self.ui.deviceComboBox.currentData or "auto")
        node.SetParameter("ModelPath", self.ui.modelPathLineEdit.currentPath)
        node.SetParameter("Seed", str(self.ui.seedSpinBox.value))
        node.SetParameter("MarginMm", str(self.ui.marginSpinBox.value))
        node.SetParameter("Rotations", str(self.ui.rotationsSpinBox.value))
        node.SetParameter("Facets", str(self.ui.facetsSpinBox.value))
        node.EndModify(wasModified)

    @property
    def _running(self) -> bool:
        return self._job is not None

    def _setRunning(self, job) -> None:
        self._job = job
        running = job is not None
        self.ui.applyButton.text = "Cancel" if running else "De-identify"
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        self.updateGUIFromParameterNode()

    def onApplyButton(self):
        if self._running:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling after the current step..."
            return
        with slicer.util.tryWithErrorDisplay("Could not install what MRIDeIdentify needs.", waitCursor=True):
            if not self.logic.setupPythonRequirements(confirm=slicer.util.confirmOkCancelDisplay):
                self.ui.statusLabel.text = "Not run: the required Python packages were not installed."
                return
            self._populateMethods()
            self.updateGUIFromParameterNode()

        p = self._parameterNode
        try:
            job = self.logic.startProcess(
                p.GetNodeReference("InputVolume"), p.GetNodeReference("OutputVolume"), p.GetParameter("Method"),
                brainMaskNode=p.GetNodeReference("BrainMask"), marginMm=float(p.GetParameter("MarginMm")),
                seed=int(p.GetParameter("Seed")), device=p.GetParameter("Device"),
                modelPath=p.GetParameter("ModelPath"), rotations=int(p.GetParameter("Rotations")),
                facets=int(p.GetParameter("Facets")),
                outputBrainMaskNode=p.GetNodeReference("OutputBrainMask"),
                outputFaceMaskNode=p.GetNodeReference("OutputFaceMask"))
        except Exception as error:
            self._showFailure(error)
            return
        self._setRunning(job)
        self.ui.statusLabel.text = "Running..."
        # The engine works in a thread; the GUI thread only looks at its progress a few times a second.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self._pollJob)
        self._pollTimer.start()

    def _pollJob(self):
        job = self._job
        if job is None:
            return
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.progressBar.format = f"{job.stage}: %p%"
        if not job.done():
            return
        self._pollTimer.stop()
        self._setRunning(None)
        from MRIDeIdentifyLib.errors import Cancelled

        try:
            outcome = self.logic.finishProcess(job)
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
            return
        except Exception as error:
            self._showFailure(error, job.traceback)
            return
        self._parameterNode.SetNodeReferenceID("OutputVolume", outcome.outputVolumeNode.GetID())
        slicer.util.setSliceViewerLayers(background=outcome.outputVolumeNode, fit=True)
        self.ui.statusLabel.text = f"Done in {outcome.seconds:.1f} s on {outcome.device} ({outcome.method})."

    def _showFailure(self, error: Exception, details: str = "") -> None:
        logging.error("MRIDeIdentify failed: %s\n%s", error, details or _traceback())
        self.ui.statusLabel.text = f"Failed: {error}"
        slicer.util.errorDisplay(f"De-identification failed:\n{error}", detailedText=details or _traceback())

    def _abandonJob(self, resetPanel: bool = True) -> None:
        """Stop polling and ask a running job to stop: its result is not wanted (module or scene closing)."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._job is not None:
            self._job.cancel()
            if resetPanel:
                self._setRunning(None)
                self.ui.statusLabel.text = "Cancelled: the scene was closed."
            self._job = None

    def onShowBeforeAfter(self):
        with slicer.util.tryWithErrorDisplay("Could not show the before/after renderings.", waitCursor=True):
            self.logic.showBeforeAfter(self._parameterNode.GetNodeReference("InputVolume"),
                                       self._parameterNode.GetNodeReference("OutputVolume"))

    def onSaveQARenders(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder for the QA renderings")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the QA renderings.", waitCursor=True):
            paths = self.logic.saveQARenders(self._parameterNode.GetNodeReference("InputVolume"),
                                             self._parameterNode.GetNodeReference("OutputVolume"), folder)
            self.ui.statusLabel.text = f"Saved {len(paths)} renderings; summary: {paths[-1]}"


def _nodeIDs(scene) -> List[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


#
# MRIDeIdentifyLogic
#


class DeidentifyJob:
    """The engine's work for one de-identification, run in a worker thread so that the application stays
    responsive (the Widget polls it); :meth:`run` does the same work in the calling thread.

    Only the engine runs in the thread: the input node is converted before and the output nodes are filled
    after, in the main thread, because MRML and Qt are not thread-safe. ``stage``/``fraction`` are the last
    progress report; :meth:`cancel` stops the engine at its next stage boundary.
    """

    def __init__(self, work: Callable, finish: Callable, progress: Optional[Callable[[str, float], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None):
        self._work, self.finish, self._progress, self._cancel = work, finish, progress, cancel
        self._cancelled = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stage, self.fraction = "starting", 0.0
        self.result, self.error, self.traceback = None, None, ""
        self.worker: Optional[int] = None   # ident of the thread that ran the engine

    def _report(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, fraction
        if self._progress is not None:
            self._progress(stage, fraction)

    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self._cancel is not None and bool(self._cancel()))

    def run(self) -> None:
        self.worker = threading.get_ident()
        try:
            self.result = self._work(self._report, self.cancelled)
        except BaseException as error:  # handed to finishProcess, which raises it in the main thread
            self.error, self.traceback = error, _traceback()

    def start(self) -> "DeidentifyJob":
        self._thread = threading.Thread(target=self.run, name="MRIDeIdentify", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancelled.set()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done()


class ProcessOutcome(NamedTuple):
    outputVolumeNode: object
    method: str
    device: str
    seconds: float
    provenance: dict


class MRIDeIdentifyLogic(ScriptedLoadableModuleLogic):
    """Nodes in, nodes out; the engine (``MRIDeIdentifyLib``) does the work. Usable from the Python console.

    Geometry: Slicer nodes are RAS, the engine's SimpleITK images LPS; voxel arrays are KJI in both.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        # The application's volume rendering logic unless set (a headless scene brings its own).
        self.volumeRenderingLogic = None

    # --- parameters and dependencies ---------------------------------------------------------------------------

    def setDefaultParameters(self, parameterNode) -> None:
        defaults = {"Method": DEFAULT_METHOD, "Device": "auto", "ModelPath": "", "Seed": "0",
                    "MarginMm": str(DEFAULT_MARGIN_MM), "Rotations": str(DEFAULT_ROTATIONS),
                    "Facets": str(DEFAULT_FACETS)}
        for name, value in defaults.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    @staticmethod
    def outputName(inputVolumeNode) -> str:
        return f"{inputVolumeNode.GetName()} deidentified"

    @staticmethod
    def availableMethods() -> List[Tuple[str, str]]:
        """(name, summary) of the engine's methods, the default first; only the default while torch is missing."""
        try:
            from MRIDeIdentifyLib.methods import METHODS, default_method
        except Exception as error:  # torch missing, or a broken install: the panel must still open
            logging.info(f"MRIDeIdentify: the method registry is not available yet ({error})")
            return [(DEFAULT_METHOD, "learned remodeling (install the dependencies to list every method)")]
        first = default_method()
        names = sorted(METHODS, key=lambda name: name != first)
        return [(name, METHODS[name].summary) for name in names]

    @staticmethod
    def missingRequirements() -> List[str]:
        """Human-readable names of what is not installed yet ("PyTorch" first)."""
        import importlib.util

        missing = [] if importlib.util.find_spec("torch") else ["PyTorch"]
        return missing + [name for name, _, _ in PIP_REQUIREMENTS if importlib.util.find_spec(name) is None]

    def setupPythonRequirements(self, confirm: Callable[[str], bool]) -> bool:
        """Install what is missing after one ``confirm(message)``; False when the user declines.

        torch comes from the PyTorch extension's PyTorchUtils (it picks a CUDA or CPU build for this computer);
        the rest through ``slicer.util.pip_install``. Raises RuntimeError with the next step when an install fails.
        """
        missing = self.missingRequirements()
        if not missing:
            return True
        reasons = {name: why for name, _, why in PIP_REQUIREMENTS}
        reasons["PyTorch"] = "runs the models, on the GPU when there is one"
        listing = "\n".join(f"- {name}: {reasons[name]}" for name in missing)
        if not confirm("MRIDeIdentify needs these Python packages, which are not installed yet:\n"
                       f"{listing}\n\nDownload and install them now (this can take several minutes)?"):
            return False
        if "PyTorch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError("MRIDeIdentify needs the PyTorch extension: install 'PyTorch' from the "
                                   "Extensions Manager, restart Slicer and try again.") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise RuntimeError("PyTorch was not installed. Install it from the 'PyTorch Utils' module, then retry.")
        for name, arguments, _ in PIP_REQUIREMENTS:
            if name in missing:
                try:
                    slicer.util.pip_install(arguments)
                except Exception as error:
                    raise RuntimeError(f"Installing {name} failed ({error}). Check the network connection, or "
                                       f"run in the Python console: slicer.util.pip_install('{arguments}')") from error
        return True

    # --- nodes <-> engine images -----------------------------------------------------------------------------

    @staticmethod
    def volumeNodeToImage(volumeNode):
        """A SimpleITK image (LPS) with the node's voxels (copied, original type, KJI) and exact IJK->RAS geometry.

        The node's parent transform is not applied: the output is placed under the same transform instead.
        """
        import SimpleITK as sitk

        array = slicer.util.arrayFromVolume(volumeNode)
        if array is None or array.ndim != 3:
            raise ValueError(f"'{volumeNode.GetName()}' is not a 3-D scalar volume")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        directions = np.zeros((3, 3))
        volumeNode.GetIJKToRASDirections(directions)
        rasToLps = np.diag([-1.0, -1.0, 1.0])
        image.SetOrigin(tuple(rasToLps @ np.asarray(volumeNode.GetOrigin(), float)))
        image.SetSpacing(tuple(float(s) for s in volumeNode.GetSpacing()))
        image.SetDirection(tuple((rasToLps @ directions).ravel()))
        return image

    @staticmethod
    def _fillVolumeNode(volumeNode, image, referenceNode) -> None:
        """Put ``image``'s voxels (KJI, copied) into ``volumeNode`` on ``referenceNode``'s exact grid."""
        import SimpleITK as sitk

        ijkToRas = vtk.vtkMatrix4x4()
        referenceNode.GetIJKToRASMatrix(ijkToRas)
        volumeNode.SetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
        volumeNode.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())

    @staticmethod
    def _forgetIdentity(volumeNode) -> None:
        """Detach a reused output node from any patient: DICOM attributes removed, subject hierarchy item moved to
        the scene root (a DICOM export of it would otherwise take the patient and study of its parent folders)."""
        for name in list(volumeNode.GetAttributeNames() or []):
            if name.startswith("DICOM"):
                volumeNode.RemoveAttribute(name)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
        item = shNode.GetItemByDataNode(volumeNode) if shNode else 0
        if item:
            shNode.SetItemParent(item, shNode.GetSceneItemID())

    def _brainMaskImage(self, brainMaskNode, inputVolumeNode):
        """The user's brain mask (labelmap or segmentation node) as a SimpleITK image, or None."""
        if brainMaskNode is None:
            return None
        if brainMaskNode.GetTransformNodeID() != inputVolumeNode.GetTransformNodeID():
            raise ValueError(f"The brain mask '{brainMaskNode.GetName()}' and the input volume are under different "
                             "transforms: harden the transforms first.")
        if brainMaskNode.IsA("vtkMRMLSegmentationNode"):
            scene = inputVolumeNode.GetScene()
            before = set(_nodeIDs(scene))
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MRIDeIdentify_brain_mask__")
            try:
                if not slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
                        brainMaskNode, labelmap, inputVolumeNode):
                    raise ValueError(f"The segmentation '{brainMaskNode.GetName()}' could not be exported as a mask.")
                return self.volumeNodeToImage(labelmap)
            finally:
                # The export also adds a display node and a colour table: remove everything it added.
                for nodeID in set(_nodeIDs(scene)) - before:
                    node = scene.GetNodeByID(nodeID)
                    if node is not None:
                        scene.RemoveNode(node)
        if brainMaskNode.IsA("vtkMRMLVolumeNode"):
            return self.volumeNodeToImage(brainMaskNode)
        raise ValueError(f"'{brainMaskNode.GetName()}' is neither a segmentation nor a labelmap volume.")

    def _fillSegmentation(self, segmentationNode, mask, referenceNode, segmentName: str, color) -> None:
        """Replace the segments of ``segmentationNode`` by one segment from ``mask`` (uint8 image, reference grid)."""
        scene = referenceNode.GetScene()
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MRIDeIdentify_mask__")
        try:
            self._fillVolumeNode(labelmap, mask, referenceNode)
            segmentation = segmentationNode.GetSegmentation()
            segmentation.RemoveAllSegments()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap,
                                                                                             segmentationNode):
                raise RuntimeError(f"Could not write the mask into '{segmentationNode.GetName()}'.")
            segment = segmentation.GetNthSegment(0)
            if segment is not None:
                segment.SetName(segmentName)
                segment.SetColor(*color)
            segmentationNode.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
            if segmentationNode.GetDisplayNode() is None:
                segmentationNode.CreateDefaultDisplayNodes()
        finally:
            scene.RemoveNode(labelmap)

    # --- processing --------------------------------------------------------------------------------------------

    def process(self, inputVolumeNode, outputVolumeNode=None, method: Optional[str] = None, *,
                brainMaskNode=None, marginMm: float = DEFAULT_MARGIN_MM, seed: int = 0, device: str = "auto",
                modelPath: str = "", rotations: int = DEFAULT_ROTATIONS, facets: int = DEFAULT_FACETS,
                outputBrainMaskNode=None, outputFaceMaskNode=None,
                progress: Optional[Callable[[str, float], None]] = None,
                cancel: Optional[Callable[[], bool]] = None) -> ProcessOutcome:
        """De-identify ``inputVolumeNode`` into ``outputVolumeNode`` (created, named after the input, when None).

        The output has the input's IJK->RAS geometry, parent transform and voxel type; inside the (dilated)
        brain mask its voxels equal the input's. Nothing else of the input node is copied (no name, attributes,
        DICOM references or subject hierarchy placement), so the output carries no identity. The optional
        segmentation nodes receive the region copied exactly and the region remodeled.
        Raises ValueError / MRIDeIdentifyLib.errors.InputError for unusable inputs (the message says what to do)
        and MRIDeIdentifyLib.errors.Cancelled when ``cancel()`` returns True; the output node is then unchanged.
        Runs in the calling thread; :meth:`startProcess` runs the engine in a worker thread instead.
        """
        job = self._prepareJob(inputVolumeNode, outputVolumeNode, method, brainMaskNode=brainMaskNode,
                               marginMm=marginMm, seed=seed, device=device, modelPath=modelPath,
                               rotations=rotations, facets=facets, outputBrainMaskNode=outputBrainMaskNode,
                               outputFaceMaskNode=outputFaceMaskNode, progress=progress, cancel=cancel)
        job.run()
        return self.finishProcess(job)

    def startProcess(self, inputVolumeNode, outputVolumeNode=None, method: Optional[str] = None,
                     **options) -> DeidentifyJob:
        """:meth:`process` with the engine in a worker thread: returns the started job at once (input errors
        are raised here). Poll ``job.done()``, then call :meth:`finishProcess` from the main thread."""
        return self._prepareJob(inputVolumeNode, outputVolumeNode, method, **options).start()

    def finishProcess(self, job: DeidentifyJob) -> ProcessOutcome:
        """Fill the output nodes from a finished job (main thread only); re-raises the job's error or Cancelled."""
        if not job.done():
            raise RuntimeError("The de-identification is still running.")
        if job.error is not None:
            raise job.error
        return job.finish(job.result)

    def _prepareJob(self, inputVolumeNode, outputVolumeNode=None, method: Optional[str] = None, *,
                    brainMaskNode=None, marginMm: float = DEFAULT_MARGIN_MM, seed: int = 0, device: str = "auto",
                    modelPath: str = "", rotations: int = DEFAULT_ROTATIONS, facets: int = DEFAULT_FACETS,
                    outputBrainMaskNode=None, outputFaceMaskNode=None,
                    progress: Optional[Callable[[str, float], None]] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> DeidentifyJob:
        """Check the inputs and read the nodes (main thread); the job's work touches no node."""
        if inputVolumeNode is None:
            raise ValueError("Select an input volume.")
        if not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"'{inputVolumeNode.GetName()}' is not a scalar (grey-level) volume.")
        if inputVolumeNode.GetImageData() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' has no voxels.")
        if outputVolumeNode is not None and outputVolumeNode is inputVolumeNode:
            raise ValueError("Choose an output volume other than the input: the input is never overwritten.")
        from MRIDeIdentifyLib.methods import get_method
        from MRIDeIdentifyLib.pipeline import deidentify

        get_method(method or None)  # an unknown or uninstalled method fails at the click, not in the thread
        start = time.perf_counter()
        image = self.volumeNodeToImage(inputVolumeNode)
        brainMask = self._brainMaskImage(brainMaskNode, inputVolumeNode)
        options = {"rotations": int(rotations), "facets": int(facets)}
        if modelPath:
            options["model"] = modelPath

        def work(report, cancelled):
            return deidentify(image, method, brain_mask=brainMask, margin_mm=float(marginMm), seed=int(seed),
                              device=device, options=options, progress=report, cancel=cancelled)

        def finish(result) -> ProcessOutcome:
            return self._fillOutputs(result, image, inputVolumeNode, outputVolumeNode, method, start,
                                     outputBrainMaskNode, outputFaceMaskNode)

        return DeidentifyJob(work, finish, progress, cancel)

    def _fillOutputs(self, result, image, inputVolumeNode, outputVolumeNode, method, start,
                     outputBrainMaskNode, outputFaceMaskNode) -> ProcessOutcome:
        if result.image.GetSize() != image.GetSize():
            raise RuntimeError("The engine returned an image on another grid; the output was not written.")
        scene = inputVolumeNode.GetScene()
        if outputVolumeNode is None:
            outputVolumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self.outputName(inputVolumeNode))
        self._fillVolumeNode(outputVolumeNode, result.image, inputVolumeNode)
        self._forgetIdentity(outputVolumeNode)
        if outputVolumeNode.GetDisplayNode() is None:
            outputVolumeNode.CreateDefaultDisplayNodes()
        inputDisplay, outputDisplay = inputVolumeNode.GetDisplayNode(), outputVolumeNode.GetDisplayNode()
        if inputDisplay is not None and outputDisplay is not None:
            outputDisplay.SetAutoWindowLevel(False)
            outputDisplay.SetWindowLevel(inputDisplay.GetWindow(), inputDisplay.GetLevel())
        if outputBrainMaskNode is not None:
            self._fillSegmentation(outputBrainMaskNode, result.brain_mask, inputVolumeNode,
                                   "brain (copied exactly)", (0.9, 0.8, 0.2))
        if outputFaceMaskNode is not None:
            self._fillSegmentation(outputFaceMaskNode, result.face_mask, inputVolumeNode,
                                   "face region (remodeled)", (0.3, 0.6, 0.9))
        provenance = dict(result.provenance)
        return ProcessOutcome(outputVolumeNode, str(provenance.get("method", method)), str(result.device),
                              time.perf_counter() - start, provenance)

    # --- checking the result -----------------------------------------------------------------------------------

    def _volumeRenderingLogic(self):
        return self.volumeRenderingLogic or slicer.modules.volumerendering.logic()

    def showBeforeAfter(self, inputVolumeNode, outputVolumeNode, preset: str = "MR-Default") -> list:
        """Dual 3-D layout: ``inputVolumeNode`` volume-rendered in the left view, ``outputVolumeNode`` in the right,
        both with ``preset``, cameras linked and looking at the face. Returns the two view nodes (left, right)."""
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

        vrLogic = self._volumeRenderingLogic()
        volumeProperty = vrLogic.GetPresetByName(preset)
        if volumeProperty is None:
            raise RuntimeError(f"The volume rendering preset '{preset}' was not found.")
        for volumeNode, view in ((inputVolumeNode, left), (outputVolumeNode, right)):
            for otherVolume in (inputVolumeNode, outputVolumeNode):
                if otherVolume is not volumeNode:
                    hidden = vrLogic.GetFirstVolumeRenderingDisplayNode(otherVolume)
                    if hidden is not None:
                        hidden.RemoveViewNodeID(view.GetID())
            displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
            if displayNode is None:
                displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
            displayNode.GetVolumePropertyNode().Copy(volumeProperty)
            if displayNode.GetViewNodeIDs():
                displayNode.RemoveAllViewNodeIDs()
            displayNode.AddViewNodeID(view.GetID())
            displayNode.SetVisibility(True)

        self._lookAtFace(inputVolumeNode, [left, right])
        for view in (left, right):
            view.SetLinkedControl(True)
        return [left, right]

    def _lookAtFace(self, volumeNode, viewNodes) -> None:
        """Place every view's camera in front of the face of ``volumeNode``, the whole head in the field."""
        from MRIDeIdentifyLib.render import face_direction

        anteriorLps, superiorLps = face_direction(self.volumeNodeToImage(volumeNode))
        lpsToRas = np.array([-1.0, -1.0, 1.0])
        anterior, superior = anteriorLps * lpsToRas, superiorLps * lpsToRas
        bounds = np.zeros(6)
        volumeNode.GetRASBounds(bounds)
        centre = (bounds[0::2] + bounds[1::2]) / 2
        # The view angle is 30 degrees: this distance fits the head's largest extent with a margin.
        distance = 3.0 * float(np.max(bounds[1::2] - bounds[0::2]))
        scene = volumeNode.GetScene()
        for view in viewNodes:
            camera = self._cameraOf(view, scene)
            camera.SetFocalPoint(*centre)
            camera.SetPosition(*(centre + distance * anterior))
            camera.SetViewUp(*superior)
            camera.ResetClippingRange()

    @staticmethod
    def _cameraOf(viewNode, scene):
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLCameraNode")):
            camera = scene.GetNthNodeByClass(index, "vtkMRMLCameraNode")
            if camera.GetLayoutName() == viewNode.GetLayoutName():
                return camera
        camera = scene.AddNewNodeByClass("vtkMRMLCameraNode")
        camera.SetLayoutName(viewNode.GetLayoutName())
        return camera

    def saveQARenders(self, inputVolumeNode, outputVolumeNode, folder: str) -> List[str]:
        """Write the engine's before/after face renderings (frontal and 45 degrees, and one side-by-side summary)
        of the two volumes into ``folder``; returns the paths, the summary last."""
        from MRIDeIdentifyLib.render import write_qa

        if inputVolumeNode is None or outputVolumeNode is None:
            raise ValueError("Select an input volume and a de-identified output volume first.")
        os.makedirs(folder, exist_ok=True)
        paths = write_qa(self.volumeNodeToImage(inputVolumeNode), self.volumeNodeToImage(outputVolumeNode), folder)
        return [str(path) for path in paths]


#
# MRIDeIdentifyTest
#


class MRIDeIdentifyTest(ScriptedLoadableModuleTest):
    """Runs inside the application (Developer mode: Reload and Test, or ``--testing``). Downloads MRHead."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_process_keeps_grid_and_brain()
        self.setUp()
        self.test_before_after_views()

    def _loadHead(self):
        import SampleData

        return SampleData.downloadSample("MRHead")

    def test_process_keeps_grid_and_brain(self):
        self.delayDisplay("De-identifying MRHead (blur control, CPU)")
        logic = MRIDeIdentifyLogic()
        self.assertTrue(logic.setupPythonRequirements(confirm=lambda message: True))
        inputVolume = self._loadHead()
        brain = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
        outcome = logic.process(inputVolume, None, "blur", device="cpu", outputBrainMaskNode=brain)
        outputVolume = outcome.outputVolumeNode
        inputMatrix, outputMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        outputVolume.GetIJKToRASMatrix(outputMatrix)
        for row in range(4):
            for column in range(4):
                self.assertAlmostEqual(inputMatrix.GetElement(row, column), outputMatrix.GetElement(row, column))
        before = slicer.util.arrayFromVolume(inputVolume)
        after = slicer.util.arrayFromVolume(outputVolume)
        self.assertEqual(before.shape, after.shape)
        self.assertEqual(before.dtype, after.dtype)
        segmentId = brain.GetSegmentation().GetNthSegmentID(0)
        kept = slicer.util.arrayFromSegmentBinaryLabelmap(brain, segmentId, inputVolume) > 0
        self.assertGreater(kept.sum(), 0)
        self.assertTrue(np.array_equal(before[kept], after[kept]))
        self.assertFalse(np.array_equal(before[~kept], after[~kept]))
        self.delayDisplay(f"Done in {outcome.seconds:.1f} s on {outcome.device}")

    def test_before_after_views(self):
        self.delayDisplay("Before/after volume renderings")
        logic = MRIDeIdentifyLogic()
        inputVolume = self._loadHead()
        outputVolume = logic.process(inputVolume, None, "blur", device="cpu").outputVolumeNode
        left, right = logic.showBeforeAfter(inputVolume, outputVolume)
        vrLogic = slicer.modules.volumerendering.logic()
        self.assertEqual(list(vrLogic.GetFirstVolumeRenderingDisplayNode(inputVolume).GetViewNodeIDs()), [left.GetID()])
        self.assertEqual(list(vrLogic.GetFirstVolumeRenderingDisplayNode(outputVolume).GetViewNodeIDs()),
                         [right.GetID()])
        self.assertEqual(slicer.app.layoutManager().layout, slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView)
        self.delayDisplay("Test passed")
