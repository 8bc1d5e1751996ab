"""The module's Logic on real Slicer core code (slicer-core): real heads in volume nodes, processed, shown, rendered.

The scene, the volumes, volume-rendering, layout and segmentation logics and the displayable managers are Slicer's
own C++ classes; only the Qt layer is absent (see slicer_scene.py). Renders go to ``out/slicer-tests/`` so a
person can look at them.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, head_files, params

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core==5.13.31053.0)")
vtk = pytest.importorskip("vtk")

from slicer_scene import HeadlessSlicer, import_module_file, presets_directory  # noqa: E402

RENDER_DIR = REPO / "out" / "slicer-tests"
# Slicer's volume reader cannot open FreeSurfer .mgz without the application's FreeSurfer importer.
SLICER_READABLE = [p for p in head_files() if not p.name.endswith(".mgz")]


@pytest.fixture(scope="module")
def module():
    return import_module_file()


@pytest.fixture(scope="module")
def headless():
    scene = HeadlessSlicer()
    yield scene
    scene.close()


@pytest.fixture(scope="module")
def logic(module, headless):
    logic = module.MRIDeIdentifyLogic()
    logic.volumeRenderingLogic = headless.volume_rendering_logic
    return logic


@pytest.fixture(scope="module")
def processed(headless, logic, head_path):
    """One real head de-identified by the Logic (blur control, deepbet brain mask, CPU), with both mask outputs."""
    import torch

    torch.set_num_threads(2)
    inputNode = headless.load_volume(head_path)
    brain = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain kept")
    face = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "face region")
    stages = []
    outcome = logic.process(inputNode, None, "blur", device="cpu", outputBrainMaskNode=brain, outputFaceMaskNode=face,
                            progress=lambda stage, fraction: stages.append((stage, fraction)))
    return {"input": inputNode, "outcome": outcome, "brain": brain, "face": face, "stages": stages}


def _matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, array[r, c])
    return matrix


def _segment_array(segmentationNode, referenceNode) -> np.ndarray:
    """The segmentation's visible segments as a bool KJI array on ``referenceNode``'s grid."""
    scene = referenceNode.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__test__")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
            segmentationNode, labelmap, referenceNode)
        assert np.allclose(_matrix(labelmap), _matrix(referenceNode))
        return slicer.util.arrayFromVolume(labelmap).copy() > 0
    finally:
        scene.RemoveNode(labelmap)


# --- node <-> SimpleITK geometry -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", params(SLICER_READABLE))
def test_volume_node_to_image_is_the_same_physical_volume(path, headless, module):
    """Slicer (RAS) and SimpleITK (LPS) read the file independently; the converted node must match voxel for voxel
    at the same physical points, whatever the file's orientation."""
    node = headless.load_volume(path)
    try:
        image = module.MRIDeIdentifyLogic.volumeNodeToImage(node)
        reference = sitk.ReadImage(str(path))
        if reference.GetDimension() == 4:
            reference = reference[:, :, :, 0]
        assert image.GetSize() == reference.GetSize()
        assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        assert image.GetPixelID() == reference.GetPixelID()
        same_grid = sitk.Resample(reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                  reference.GetPixelID())
        assert np.array_equal(sitk.GetArrayFromImage(same_grid), sitk.GetArrayFromImage(image))
        # The array is a copy: editing the node afterwards does not change the image.
        before = sitk.GetArrayFromImage(image).copy()
        slicer.util.arrayFromVolume(node)[:] = 0
        assert np.array_equal(sitk.GetArrayFromImage(image), before)
    finally:
        headless.scene.RemoveNode(node)


# --- process -------------------------------------------------------------------------------------------------------

def test_output_node_has_the_input_grid_type_and_no_identity(processed):
    inputNode, outputNode = processed["input"], processed["outcome"].outputVolumeNode
    assert outputNode is not inputNode and outputNode.IsA("vtkMRMLScalarVolumeNode")
    assert outputNode.GetName() == f"{inputNode.GetName()} deidentified"
    assert np.array_equal(_matrix(outputNode), _matrix(inputNode))
    assert outputNode.GetImageData().GetDimensions() == inputNode.GetImageData().GetDimensions()
    before, after = slicer.util.arrayFromVolume(inputNode), slicer.util.arrayFromVolume(outputNode)
    assert after.dtype == before.dtype and after.shape == before.shape
    assert outputNode.GetStorageNode() is None, "the output must not point at the input's file"
    assert list(outputNode.GetAttributeNames() or []) == []
    assert outputNode.GetDisplayNode() is not None
    assert processed["outcome"].device == "cpu" and processed["outcome"].method == "blur"
    assert processed["outcome"].provenance["brain_mask"] == "deepbet"


def test_brain_is_bit_identical_through_the_node_arrays(processed):
    inputNode, outputNode = processed["input"], processed["outcome"].outputVolumeNode
    kept = _segment_array(processed["brain"], inputNode)
    before, after = slicer.util.arrayFromVolume(inputNode), slicer.util.arrayFromVolume(outputNode)
    assert 0.02 < kept.mean() < 0.5, f"implausible brain fraction {kept.mean():.3f}"
    assert np.array_equal(before[kept], after[kept])
    assert not np.array_equal(before[~kept], after[~kept])


def test_face_region_is_outside_the_brain_and_changed(processed):
    inputNode, outputNode = processed["input"], processed["outcome"].outputVolumeNode
    kept = _segment_array(processed["brain"], inputNode)
    face = _segment_array(processed["face"], inputNode)
    assert face.sum() > 1000 and not (face & kept).any()
    before, after = slicer.util.arrayFromVolume(inputNode), slicer.util.arrayFromVolume(outputNode)
    assert (before[face] != after[face]).mean() > 0.5
    segment = processed["face"].GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "face region (remodeled)"


def test_a_reused_output_node_is_detached_from_the_patient(processed, headless, logic):
    """An output node picked from the scene loses its DICOM attributes and leaves the patient's study folder."""
    inputNode = processed["input"]
    scene = headless.scene
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Doe^Jane"), "MR brain 2024-01-02")
    reused = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "previous series")
    reused.SetAttribute("DICOM.instanceUIDs", "1.2.826.0.1.3680043.2.1125.1")
    item = sh.CreateItem(study, reused)
    assert sh.GetItemParent(item) == study
    brain = _segment_array(processed["brain"], inputNode).astype(np.uint8)
    mask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    mask.SetIJKToRASMatrix(_vtk_matrix(_matrix(inputNode)))
    slicer.util.updateVolumeFromArray(mask, brain)
    outcome = logic.process(inputNode, reused, "blur", brainMaskNode=mask, marginMm=0.0, device="cpu")
    assert outcome.outputVolumeNode is reused
    assert not [name for name in reused.GetAttributeNames() or [] if name.startswith("DICOM")]
    assert sh.GetItemParent(sh.GetItemByDataNode(reused)) == sh.GetSceneItemID()
    assert np.array_equal(_matrix(reused), _matrix(inputNode))
    for node in (reused, mask):
        scene.RemoveNode(node)


def test_progress_reports_each_stage_start_and_end(processed):
    stages = processed["stages"]
    names = [stage for stage, _ in stages]
    assert {"head mask", "brain mask", "composite"} <= set(names)
    for name in set(names):
        fractions = [fraction for stage, fraction in stages if stage == name]
        assert fractions[0] == 0.0 and fractions[-1] == 1.0


def test_user_brain_mask_from_a_labelmap_or_a_segmentation(processed, headless, logic):
    """A mask the user supplies is used as is (margin 0): the region copied exactly is that mask."""
    inputNode = processed["input"]
    mask = _segment_array(processed["brain"], inputNode)
    labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "user brain")
    labelmap.SetIJKToRASMatrix(_vtk_matrix(_matrix(inputNode)))
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    for brainMaskNode in (labelmap, processed["brain"]):
        kept = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept")
        outcome = logic.process(inputNode, None, "blur", brainMaskNode=brainMaskNode, marginMm=0.0, device="cpu",
                                outputBrainMaskNode=kept)
        assert outcome.provenance["brain_mask"] == "user"
        assert np.array_equal(_segment_array(kept, inputNode), mask)
        before, after = slicer.util.arrayFromVolume(inputNode), slicer.util.arrayFromVolume(outcome.outputVolumeNode)
        assert np.array_equal(before[mask], after[mask])
        for node in (kept, outcome.outputVolumeNode):
            headless.scene.RemoveNode(node)
    headless.scene.RemoveNode(labelmap)


def test_default_method_through_the_logic(processed, headless, logic):
    """The registry's default (the learned remodeling once its weights ship) runs from the Logic like the controls:
    brain exact through the node arrays, the rest regenerated. The brain comes from the first run (no deepbet)."""
    from MRIDeIdentifyLib.methods import default_method
    from MRIDeIdentifyLib.model import DEFAULT_WEIGHTS

    if default_method() is None:
        pytest.skip("no default method registered yet (the learned remodel is not installed)")
    if default_method() == "remodel" and not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"the remodeling weights are not in the module yet ({DEFAULT_WEIGHTS.name})")
    inputNode = processed["input"]
    mask = _segment_array(processed["brain"], inputNode)
    labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "user brain")
    labelmap.SetIJKToRASMatrix(_vtk_matrix(_matrix(inputNode)))
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    outcome = logic.process(inputNode, None, None, brainMaskNode=labelmap, marginMm=0.0, device="cpu")
    before, after = slicer.util.arrayFromVolume(inputNode), slicer.util.arrayFromVolume(outcome.outputVolumeNode)
    assert outcome.method == default_method()
    assert np.array_equal(_matrix(outcome.outputVolumeNode), _matrix(inputNode)) and after.dtype == before.dtype
    assert np.array_equal(before[mask], after[mask])
    assert (before[~mask] != after[~mask]).mean() > 0.3
    for node in (labelmap, outcome.outputVolumeNode):
        headless.scene.RemoveNode(node)


def test_cancel_raises_and_adds_nothing(processed, headless, logic):
    from MRIDeIdentifyLib.errors import Cancelled

    count = headless.scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        logic.process(processed["input"], None, "blur", device="cpu", cancel=lambda: True)
    assert headless.scene.GetNumberOfNodes() == count


def test_started_job_runs_the_engine_in_a_worker_thread_and_matches_process(processed, headless, logic):
    """The panel's path: the engine in a thread, the nodes filled in the main thread, the same result."""
    import threading

    inputNode, brain = processed["input"], processed["brain"]
    common = dict(brainMaskNode=brain, marginMm=0.0, device="cpu", seed=3)
    job = logic.startProcess(inputNode, None, "blur", **common)
    assert job.wait(timeout=300)
    assert job.worker is not None and job.worker != threading.get_ident()
    assert job.stage == "composite" and job.fraction == 1.0
    threaded = logic.finishProcess(job)
    direct = logic.process(inputNode, None, "blur", **common)
    assert threaded.method == direct.method == "blur"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(threaded.outputVolumeNode),
                                  slicer.util.arrayFromVolume(direct.outputVolumeNode))
    for outcome in (threaded, direct):
        headless.scene.RemoveNode(outcome.outputVolumeNode)


def test_cancelling_a_started_job_adds_nothing(processed, headless, logic):
    import threading

    from MRIDeIdentifyLib.errors import Cancelled

    count = headless.scene.GetNumberOfNodes()
    gate = threading.Event()
    # The first progress report holds the worker until the test has asked to cancel: no race with a fast run.
    job = logic.startProcess(processed["input"], None, "blur", brainMaskNode=processed["brain"], device="cpu",
                             progress=lambda stage, fraction: gate.wait(timeout=60))
    job.cancel()
    gate.set()
    assert job.wait(timeout=300)
    with pytest.raises(Cancelled):
        logic.finishProcess(job)
    assert headless.scene.GetNumberOfNodes() == count


def test_unusable_inputs_give_clear_errors(processed, headless, logic):
    from MRIDeIdentifyLib.errors import InputError

    inputNode = processed["input"]
    with pytest.raises(ValueError, match="Select an input volume"):
        logic.process(None)
    with pytest.raises(ValueError, match="never overwritten"):
        logic.process(inputNode, inputNode, "blur")
    labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="not a scalar"):
        logic.process(labelmap, None, "blur")
    with pytest.raises(InputError, match="unknown method 'nonsense'.*blur"):
        logic.process(inputNode, None, "nonsense")
    with pytest.raises(InputError, match="unknown method 'nonsense'"):
        logic.startProcess(inputNode, None, "nonsense")     # at the click, before any thread
    model = headless.scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(ValueError, match="neither a segmentation nor a labelmap"):
        logic.process(inputNode, None, "blur", brainMaskNode=model)
    for node in (labelmap, model):
        headless.scene.RemoveNode(node)


# --- before/after --------------------------------------------------------------------------------------------------

def _foreground_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that differ from the view's background (Slicer's background is a vertical gradient, so
    each row's background colour is that of its first pixel)."""
    difference = np.abs(rgb.astype(int) - rgb[:, :1, :].astype(int)).sum(axis=2)
    return float((difference > 30).mean())


@pytest.mark.skipif(presets_directory() is None, reason="presets.xml not found: pip install --no-deps trame-slicer")
def test_before_after_views_render_the_two_volumes(processed, headless, logic):
    inputNode, outputNode = processed["input"], processed["outcome"].outputVolumeNode
    left, right = logic.showBeforeAfter(inputNode, outputNode)
    scene = headless.scene
    displays = scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode")
    assert [view.GetID() for view in logic.showBeforeAfter(inputNode, outputNode)] == [left.GetID(), right.GetID()]
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode") == displays == 2, "not idempotent"
    assert scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement() == \
        slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView
    assert (left.GetLayoutName(), right.GetLayoutName()) == ("1", "2")

    vr = headless.volume_rendering_logic
    preset = vr.GetPresetByName("MR-Default")
    for volume, view in ((inputNode, left), (outputNode, right)):
        display = vr.GetFirstVolumeRenderingDisplayNode(volume)
        assert display.GetVisibility() and list(display.GetViewNodeIDs()) == [view.GetID()]
        opacity = display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
        expected = preset.GetVolumeProperty().GetScalarOpacity()
        assert [opacity.GetValue(x) for x in (0, 50, 100, 300)] == [expected.GetValue(x) for x in (0, 50, 100, 300)]
        assert view.GetLinkedControl()

    # Both cameras look at the face: from anterior (+A in RAS), head up (+S), from the same place.
    cameras = [logic._cameraOf(view, scene) for view in (left, right)]
    for camera in cameras:
        looking = np.subtract(camera.GetFocalPoint(), camera.GetPosition())
        assert looking[1] < -0.9 * np.linalg.norm(looking)
        assert camera.GetViewUp()[2] > 0.9
    assert np.allclose(cameras[0].GetPosition(), cameras[1].GetPosition())

    RENDER_DIR.mkdir(parents=True, exist_ok=True)
    before = headless.render_view(left, RENDER_DIR / "before.png", size=300)
    after = headless.render_view(right, RENDER_DIR / "after.png", size=300)
    assert (RENDER_DIR / "before.png").stat().st_size > 10_000
    assert _foreground_fraction(before) > 0.15 and _foreground_fraction(after) > 0.15
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 5


def test_save_qa_renders_writes_the_engine_renderings(processed, logic, tmp_path):
    paths = logic.saveQARenders(processed["input"], processed["outcome"].outputVolumeNode, str(tmp_path / "qa"))
    assert paths[-1].endswith("qa_before_after.png") and all(Path(p).stat().st_size > 1000 for p in paths)


# --- parameters, defaults, dependencies ------------------------------------------------------------------------------

def test_panel_defaults_equal_the_engine_defaults(module):
    from MRIDeIdentifyLib import pipeline, privacy
    from MRIDeIdentifyLib.methods import METHODS, default_method

    assert module.DEFAULT_ROTATIONS == privacy.DEFAULT_ROTATIONS
    assert module.DEFAULT_FACETS == inspect.signature(privacy.privacy_transform).parameters["facets"].default
    assert module.DEFAULT_MARGIN_MM == pipeline.DEFAULT_MARGIN_MM
    assert [value for value, _ in module.DEVICES] == ["auto", "cuda", "cpu"]
    names = [name for name, _ in module.MRIDeIdentifyLogic.availableMethods()]
    assert sorted(names) == sorted(METHODS) and "blur" in names
    if default_method() is not None:
        assert names[0] == default_method() == module.DEFAULT_METHOD


def test_parameter_node_gets_defaults_and_keeps_user_values(module, logic):
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetParameter("Seed", "42")
    logic.setDefaultParameters(node)
    assert node.GetParameter("Seed") == "42"
    assert node.GetParameter("Method") == "remodel" and node.GetParameter("Device") == "auto"
    assert float(node.GetParameter("MarginMm")) == module.DEFAULT_MARGIN_MM
    assert int(node.GetParameter("Rotations")) == module.DEFAULT_ROTATIONS
    assert int(node.GetParameter("Facets")) == module.DEFAULT_FACETS


def test_dependencies_are_installed_only_after_consent(module, logic, monkeypatch):
    asked = []
    assert module.MRIDeIdentifyLogic.missingRequirements() == [], "this environment lacks an engine dependency"
    assert logic.setupPythonRequirements(confirm=lambda message: asked.append(message) or True)
    assert asked == [], "nothing is missing: the user must not be asked"

    installs = []
    # pip_install needs the application's launcher; this SPY stands in for it and must stay uncalled.
    monkeypatch.setattr(module, "PIP_REQUIREMENTS",
                        module.PIP_REQUIREMENTS + (("surely_not_installed_pkg", "surely-not-installed-pkg", "a test"),))
    monkeypatch.setattr(slicer.util, "pip_install", lambda *args, **kwargs: installs.append(args))
    assert logic.setupPythonRequirements(confirm=lambda message: asked.append(message) or False) is False
    assert installs == [] and "surely_not_installed_pkg: a test" in asked[0]
