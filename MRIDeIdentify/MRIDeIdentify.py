"""3D Slicer module: de-identify a head MRI volume by remodeling everything outside the brain.

Four classes in order: the module description, the Widget (the Qt panel, wiring only), the Logic (the steps of a
run in order, no Qt) and the Test (run inside the application). The work is done by the engine package
``MRIDeIdentifyLib`` beside this file, which knows nothing of Slicer; ``MRIDeIdentifySlicer`` beside it holds the
Slicer-side pieces the Logic uses (dependency installation, node <-> image conversion, the child process, the views).
"""

from __future__ import annotations

import logging
import os
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

# The engine's defaults come from their one owner, which imports nothing heavy (no torch, no SimpleITK).
from MRIDeIdentifyLib.settings import DEFAULT_FACETS, DEFAULT_MARGIN_MM, DEFAULT_METHOD, DEFAULT_ROTATIONS
from MRIDeIdentifySlicer import dependencies, nodes
from MRIDeIdentifySlicer.childprocess import ChildRun
from MRIDeIdentifySlicer.messages import inPanelTerms
from MRIDeIdentifySlicer.views import BeforeAfterViews

# How often the panel reads the child's progress (ms).
POLL_INTERVAL_MS = 100


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
        self._run: Optional[ChildRun] = None
        self._pollTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRIDeIdentify.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top widget's mrmlSceneChanged to every node combobox's setMRMLScene.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MRIDeIdentifyLogic()

        for value, label in self.logic.availableDevices():
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
        self._abandonRun()
        self.logic.leaveBeforeAfter()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self._abandonRun():
            self.ui.statusLabel.text = "Cancelled: the scene was closed."
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
            self.ui.methodDescriptionLabel.text = (
                self.ui.methodComboBox.itemData(self.ui.methodComboBox.currentIndex, qt.Qt.ToolTipRole) or ""
            )
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
            self.ui.applyButton.toolTip = (
                "Stop the running de-identification"
                if self._running
                else "De-identify the input volume"
                if inputVolume
                else "Select an input volume"
            )
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
        return self._run is not None

    def _setRunning(self, run: Optional[ChildRun]) -> None:
        self._run = run
        running = run is not None
        self.ui.applyButton.text = "Cancel" if running else "De-identify"
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.methodCollapsibleButton,
            self.ui.advancedCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        self.updateGUIFromParameterNode()

    def _status(self, text: str) -> None:
        """Show a step in the status line at once (before a long call blocks the event loop)."""
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    def onApplyButton(self):
        if self._running:
            self._abandonRun()
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
            return
        # No wait cursor around the question; the status line says what is being installed while it is.
        with slicer.util.tryWithErrorDisplay("Could not install what MRIDeIdentify needs."):
            if not self.logic.setupPythonRequirements(
                confirm=slicer.util.confirmOkCancelDisplay, status=self._status, busy=slicer.util.WaitCursor
            ):
                self.ui.statusLabel.text = "Not run: the required Python packages were not installed."
                return
            self._populateMethods()
            self.updateGUIFromParameterNode()

        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                run = self.logic.startProcess(
                    p.GetNodeReference("InputVolume"),
                    p.GetNodeReference("OutputVolume"),
                    p.GetParameter("Method"),
                    brainMaskNode=p.GetNodeReference("BrainMask"),
                    marginMm=float(p.GetParameter("MarginMm")),
                    seed=int(p.GetParameter("Seed")),
                    device=p.GetParameter("Device"),
                    modelPath=p.GetParameter("ModelPath"),
                    rotations=int(p.GetParameter("Rotations")),
                    facets=int(p.GetParameter("Facets")),
                    outputBrainMaskNode=p.GetNodeReference("OutputBrainMask"),
                    outputFaceMaskNode=p.GetNodeReference("OutputFaceMask"),
                )
        except Exception as error:
            self._showFailure(error)
            return
        self._setRunning(run)
        self.ui.statusLabel.text = "Running..."
        # The engine runs in a child process; the panel reads its progress ten times a second.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollRun)
        self._pollTimer.start()

    def _pollRun(self):
        run = self._run
        if run is None:
            return
        run.poll()
        self.ui.progressBar.value = int(round(100 * run.fraction))
        self.ui.progressBar.format = f"{run.stage}: %p%"
        if not run.finished():
            return
        self._pollTimer.stop()
        self._setRunning(None)
        from MRIDeIdentifyLib.errors import Cancelled

        try:
            with slicer.util.WaitCursor():
                outcome = self.logic.finishProcess(run)
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
            return
        except Exception as error:
            self._showFailure(error)
            return
        self._parameterNode.SetNodeReferenceID("OutputVolume", outcome.outputVolumeNode.GetID())
        slicer.util.setSliceViewerLayers(background=outcome.outputVolumeNode, fit=True)
        self.ui.statusLabel.text = f"Done in {outcome.seconds:.1f} s on {outcome.device} ({outcome.method})."

    def _showFailure(self, error: Exception) -> None:
        import traceback

        # A failure in the child carries the child's traceback after a blank line: details, not the message.
        message, _, childDetails = inPanelTerms(str(error)).partition("\n\n")
        details = childDetails + "".join(traceback.format_exception(type(error), error, error.__traceback__))
        logging.error("MRIDeIdentify failed: %s\n%s", message, details)
        self.ui.statusLabel.text = f"Failed: {message}"
        slicer.util.errorDisplay(f"De-identification failed:\n{message}", detailedText=details)

    def _abandonRun(self) -> bool:
        """End a running child at once (Cancel, scene or module closing): its result is not wanted. True if one ran."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._run is None:
            return False
        self.logic.cancelProcess()
        self._setRunning(None)
        return True

    def onShowBeforeAfter(self):
        with slicer.util.tryWithErrorDisplay("Could not show the before/after renderings.", waitCursor=True):
            self.logic.showBeforeAfter(
                self._parameterNode.GetNodeReference("InputVolume"),
                self._parameterNode.GetNodeReference("OutputVolume"),
            )

    def onSaveQARenders(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder for the QA renderings")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the QA renderings.", waitCursor=True):
            paths = self.logic.saveQARenders(
                self._parameterNode.GetNodeReference("InputVolume"),
                self._parameterNode.GetNodeReference("OutputVolume"),
                folder,
            )
            self.ui.statusLabel.text = f"Saved {len(paths)} renderings; summary: {paths[-1]}"


#
# MRIDeIdentifyLogic
#


class ProcessOutcome(NamedTuple):
    outputVolumeNode: object
    method: str
    device: str
    seconds: float  # from the click to the output nodes filled
    provenance: dict
    startupSeconds: Optional[float] = None  # child process start to the engine imported in it (panel runs only)


class _Request(NamedTuple):
    """One de-identification as asked for, read from the nodes in the main thread."""

    inputVolumeNode: object
    outputVolumeNode: object
    method: Optional[str]
    image: object
    brainMask: object
    settings: dict  # pipeline.deidentify's keyword arguments (margin_mm, seed, device, options)
    outputBrainMaskNode: object
    outputFaceMaskNode: object
    start: float


class MRIDeIdentifyLogic(ScriptedLoadableModuleLogic):
    """Nodes in, nodes out; the engine (``MRIDeIdentifyLib``) does the work. Usable from the Python console.

    :meth:`process` runs the engine in this process (scripts); the panel uses :meth:`startProcess` /
    :meth:`finishProcess`, which run it in a child process (``MRIDeIdentifySlicer.childprocess``). One run at a time.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.beforeAfter = BeforeAfterViews()
        self._activeRun: Optional[ChildRun] = None
        self._activeRequest: Optional[_Request] = None

    @property
    def volumeRenderingLogic(self):
        """The application's volume rendering logic unless set (a headless scene brings its own)."""
        return self.beforeAfter.volumeRenderingLogic

    @volumeRenderingLogic.setter
    def volumeRenderingLogic(self, logic) -> None:
        self.beforeAfter.volumeRenderingLogic = logic

    # --- parameters and dependencies ---------------------------------------------------------------------------

    def setDefaultParameters(self, parameterNode) -> None:
        defaults = {
            "Method": DEFAULT_METHOD,
            "Device": "auto",
            "ModelPath": "",
            "Seed": "0",
            "MarginMm": str(DEFAULT_MARGIN_MM),
            "Rotations": str(DEFAULT_ROTATIONS),
            "Facets": str(DEFAULT_FACETS),
        }
        for name, value in defaults.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    @staticmethod
    def outputName(inputVolumeNode) -> str:
        return f"{inputVolumeNode.GetName()} deidentified"

    @staticmethod
    def availableDevices() -> List[Tuple[str, str]]:
        """(value, label) of the engine's device choices, in its order (``devices.py`` imports no torch, so the
        panel fills before torch is installed)."""
        from MRIDeIdentifyLib.devices import DEVICE_LABELS

        return list(DEVICE_LABELS.items())

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
        """What is not installed yet ("PyTorch" first)."""
        return dependencies.missing()

    @staticmethod
    def setupPythonRequirements(confirm: Callable[[str], bool], **options) -> bool:
        """Install what is missing after one ``confirm(question)``; False when the user declines
        (``MRIDeIdentifySlicer.dependencies.install``)."""
        return dependencies.install(confirm, **options)

    # --- processing --------------------------------------------------------------------------------------------

    def process(
        self,
        inputVolumeNode,
        outputVolumeNode=None,
        method: Optional[str] = None,
        *,
        progress: Optional[Callable[[str, float], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
        **options,
    ) -> ProcessOutcome:
        """De-identify ``inputVolumeNode`` into ``outputVolumeNode`` (created, named after the input, when None), the
        engine running in this process. Options: ``brainMaskNode``, ``marginMm``, ``seed``, ``device``,
        ``modelPath``, ``rotations``, ``facets``, ``outputBrainMaskNode``, ``outputFaceMaskNode``.

        The output has the input's IJK->RAS geometry, parent transform and voxel type; inside the (dilated) brain
        mask its voxels equal the input's. Nothing else of the input node is copied (no name, attributes, DICOM
        references or subject hierarchy placement), so the output carries no identity. The optional segmentation
        nodes receive the region copied exactly and the region remodeled. Raises ValueError /
        ``errors.InputError`` for unusable inputs and ``errors.Cancelled`` when ``cancel()`` returns True (the
        output node is then unchanged).
        """
        if self._activeRun is not None:
            raise RuntimeError("A de-identification is already running: wait for it to finish or cancel it.")
        request = self._prepare(inputVolumeNode, outputVolumeNode, method, **options)
        from MRIDeIdentifyLib.pipeline import deidentify

        result = deidentify(
            request.image,
            request.method,
            brain_mask=request.brainMask,
            progress=progress,
            cancel=cancel,
            **request.settings,
        )
        return self._fillOutputs(request, result)

    def startProcess(self, inputVolumeNode, outputVolumeNode=None, method: Optional[str] = None, **options) -> ChildRun:
        """:meth:`process` with the engine in a child process: checks the inputs (errors are raised here), writes
        the input to temporary files and returns the started :class:`ChildRun` at once. Call its ``poll()`` from a
        timer, then :meth:`finishProcess` once ``finished()``; :meth:`cancelProcess` ends it."""
        if self._activeRun is not None:
            raise RuntimeError("A de-identification is already running: wait for it to finish or cancel it.")
        request = self._prepare(inputVolumeNode, outputVolumeNode, method, **options)
        self._activeRun = ChildRun.start(request.image, request.method, request.settings, request.brainMask)
        self._activeRequest = request
        return self._activeRun

    def finishProcess(self, run: ChildRun) -> ProcessOutcome:
        """Fill the output nodes from a finished child (main thread); raises its error, or ``errors.Cancelled``."""
        if run is not self._activeRun:
            raise RuntimeError("This run was not started by this logic, or was already finished.")
        if not run.finished():
            raise RuntimeError("The de-identification is still running.")
        request = self._activeRequest
        try:
            outcome = self._fillOutputs(request, run.result())
        finally:
            self._activeRun = self._activeRequest = None
            run.close()
        return outcome._replace(startupSeconds=run.startupSeconds())

    def cancelProcess(self) -> None:
        """End the running child at once; nothing is written."""
        run, self._activeRun, self._activeRequest = self._activeRun, None, None
        if run is not None:
            run.cancel()
            run.close()

    def _prepare(
        self,
        inputVolumeNode,
        outputVolumeNode=None,
        method: Optional[str] = None,
        *,
        brainMaskNode=None,
        marginMm: float = DEFAULT_MARGIN_MM,
        seed: int = 0,
        device: str = "auto",
        modelPath: str = "",
        rotations: int = DEFAULT_ROTATIONS,
        facets: int = DEFAULT_FACETS,
        outputBrainMaskNode=None,
        outputFaceMaskNode=None,
    ) -> _Request:
        """Check the inputs (before anything needs PyTorch) and read the nodes into the engine's images."""
        if inputVolumeNode is None:
            raise ValueError("Select an input volume.")
        if not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"'{inputVolumeNode.GetName()}' is not a scalar (grey-level) volume.")
        if inputVolumeNode.GetImageData() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' has no voxels.")
        if outputVolumeNode is not None and outputVolumeNode is inputVolumeNode:
            raise ValueError("Choose an output volume other than the input: the input is never overwritten.")
        from MRIDeIdentifyLib.methods import get_method

        start = time.perf_counter()
        get_method(method or None)  # an unknown or uninstalled method fails at the click
        options = {"rotations": int(rotations), "facets": int(facets)}
        if modelPath:
            options["model"] = modelPath
        settings = {"margin_mm": float(marginMm), "seed": int(seed), "device": device, "options": options}
        return _Request(
            inputVolumeNode,
            outputVolumeNode,
            method,
            nodes.imageFromVolumeNode(inputVolumeNode),
            nodes.brainMaskImage(brainMaskNode, inputVolumeNode),
            settings,
            outputBrainMaskNode,
            outputFaceMaskNode,
            start,
        )

    def _fillOutputs(self, request: _Request, result) -> ProcessOutcome:
        """The engine's result (``pipeline.Result`` or ``ChildResult``) into the output nodes (main thread)."""
        inputVolumeNode, outputVolumeNode = request.inputVolumeNode, request.outputVolumeNode
        scene = inputVolumeNode.GetScene()
        created = outputVolumeNode is None
        if created:
            outputVolumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self.outputName(inputVolumeNode))
        try:
            nodes.fillVolumeNode(outputVolumeNode, result.image, inputVolumeNode)
        except Exception:
            if created:
                scene.RemoveNode(outputVolumeNode)
            raise
        nodes.forgetIdentity(outputVolumeNode)
        if outputVolumeNode.GetDisplayNode() is None:
            outputVolumeNode.CreateDefaultDisplayNodes()
        inputDisplay, outputDisplay = inputVolumeNode.GetDisplayNode(), outputVolumeNode.GetDisplayNode()
        if inputDisplay is not None and outputDisplay is not None:
            outputDisplay.SetAutoWindowLevel(False)
            outputDisplay.SetWindowLevel(inputDisplay.GetWindow(), inputDisplay.GetLevel())
        if request.outputBrainMaskNode is not None:
            nodes.fillSegmentation(
                request.outputBrainMaskNode,
                result.brain_mask,
                inputVolumeNode,
                "brain (copied exactly)",
                (0.9, 0.8, 0.2),
            )
        if request.outputFaceMaskNode is not None:
            nodes.fillSegmentation(
                request.outputFaceMaskNode,
                result.face_mask,
                inputVolumeNode,
                "face region (remodeled)",
                (0.3, 0.6, 0.9),
            )
        provenance = dict(result.provenance)
        return ProcessOutcome(
            outputVolumeNode,
            str(provenance.get("method", request.method)),
            str(result.device),
            time.perf_counter() - request.start,
            provenance,
        )

    # --- checking the result -----------------------------------------------------------------------------------

    def showBeforeAfter(self, inputVolumeNode, outputVolumeNode) -> list:
        """Dual 3-D layout: the input volume-rendered on the left, the output on the right, the same transfer
        functions fitted to the input, cameras linked and on the face. Returns the two view nodes (left, right).
        The views' previous linking comes back when the layout is changed (``MRIDeIdentifySlicer.views``)."""
        return self.beforeAfter.show(inputVolumeNode, outputVolumeNode)

    def leaveBeforeAfter(self) -> None:
        self.beforeAfter.restore()

    def saveQARenders(self, inputVolumeNode, outputVolumeNode, folder: str) -> List[str]:
        """Write the engine's before/after face renderings (frontal and 45 degrees, and one side-by-side summary)
        of the two volumes into ``folder``; returns the paths, the summary last."""
        from MRIDeIdentifyLib.render import write_qa

        if inputVolumeNode is None or outputVolumeNode is None:
            raise ValueError("Select an input volume and a de-identified output volume first.")
        os.makedirs(folder, exist_ok=True)
        paths = write_qa(
            nodes.imageFromVolumeNode(inputVolumeNode), nodes.imageFromVolumeNode(outputVolumeNode), folder
        )
        return [str(path) for path in paths]


#
# MRIDeIdentifyTest
#


class MRIDeIdentifyTest(ScriptedLoadableModuleTest):
    """Runs inside the application (Developer mode: Reload and Test, or ``--testing``).

    Without PyTorch (the extension build servers) it checks the panel and the Logic's input checks only and says
    that it skipped the rest: it never installs PyTorch or downloads data there. With PyTorch it downloads MRHead.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_input_checks()
        if hasattr(slicer, "app"):
            self.setUp()
            self.test_panel()
        if not dependencies.torchReady():
            self.delayDisplay(
                "PyTorch is not installed: skipped the de-identification and rendering tests "
                "(they would install PyTorch and download a sample head)."
            )
            return
        self.setUp()
        self.test_process_keeps_grid_and_brain()
        self.setUp()
        self.test_before_after_views()

    def test_input_checks(self):
        """The Logic refuses unusable inputs with a message, before anything needs PyTorch."""
        logic = MRIDeIdentifyLogic()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
        slicer.util.updateVolumeFromArray(volume, np.zeros((4, 5, 6), np.int16))
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(labelmap, np.zeros((4, 5, 6), np.uint8))
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        for arguments, expected in (
            ((None,), "Select an input volume"),
            ((labelmap,), "not a scalar"),
            ((empty,), "has no voxels"),
            ((volume, volume), "never overwritten"),
        ):
            with self.assertRaises(ValueError) as raised:
                logic.process(*arguments)
            self.assertIn(expected, str(raised.exception))
        self.delayDisplay("Input checks passed")

    def test_panel(self):
        """The panel opens: its lists are filled and De-identify waits for an input volume."""
        widget = slicer.modules.mrideidentify.widgetRepresentation().self()
        self.assertEqual(widget.ui.deviceComboBox.count, len(MRIDeIdentifyLogic.availableDevices()))
        self.assertGreaterEqual(widget.ui.methodComboBox.count, 1)
        self.assertFalse(widget.ui.applyButton.enabled)
        self.delayDisplay("Panel checks passed")

    def _loadHead(self):
        import SampleData

        return SampleData.downloadSample("MRHead")

    def test_process_keeps_grid_and_brain(self):
        self.delayDisplay("De-identifying MRHead in a child process (blur control, CPU)")
        logic = MRIDeIdentifyLogic()
        self.assertTrue(logic.setupPythonRequirements(confirm=lambda message: True))
        inputVolume = self._loadHead()
        brain = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
        run = logic.startProcess(inputVolume, None, "blur", device="cpu", outputBrainMaskNode=brain)
        self.assertTrue(run.wait(timeout=600))
        outcome = logic.finishProcess(run)
        outputVolume = outcome.outputVolumeNode
        np.testing.assert_array_equal(nodes.ijkToRas(inputVolume), nodes.ijkToRas(outputVolume))
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
        firstView = slicer.app.layoutManager().threeDWidget(0).mrmlViewNode()
        linkedBefore = bool(firstView.GetLinkedControl())
        left, right = logic.showBeforeAfter(inputVolume, outputVolume)
        vrLogic = slicer.modules.volumerendering.logic()
        self.assertEqual(list(vrLogic.GetFirstVolumeRenderingDisplayNode(inputVolume).GetViewNodeIDs()), [left.GetID()])
        self.assertEqual(
            list(vrLogic.GetFirstVolumeRenderingDisplayNode(outputVolume).GetViewNodeIDs()), [right.GetID()]
        )
        self.assertEqual(slicer.app.layoutManager().layout, slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView)
        self.assertTrue(left.GetLinkedControl() and right.GetLinkedControl())
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        self.assertEqual(bool(left.GetLinkedControl()), linkedBefore)
        self.delayDisplay("Test passed")
