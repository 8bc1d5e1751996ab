"""The module's Logic on real Slicer core code (slicer-core): real heads in volume nodes, processed in this process
and in a real child process, placed under transforms, shown and rendered; its installer and its in-app self-test.

The scene, the volumes, volume-rendering, layout and segmentation logics and the displayable managers are Slicer's
own C++ classes; only the Qt layer is absent (see slicer_scene.py, where its STAND-INS are). The child processes
are real: this Python runs ``MRIDeIdentifySlicer.worker`` as the application's PythonSlicer would. Renders go to
``out/slicer-tests/`` so a person can look at them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
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
needs_presets = pytest.mark.skipif(
    presets_directory() is None, reason="presets.xml not found: pip install --no-deps trame-slicer"
)


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
    """One real head de-identified by the Logic in this process (blur control, deepbet brain mask, CPU), with both
    mask outputs."""
    import torch

    torch.set_num_threads(2)
    inputNode = headless.load_volume(head_path)
    brain = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain kept")
    face = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "face region")
    stages = []
    outcome = logic.process(
        inputNode,
        None,
        "blur",
        device="cpu",
        outputBrainMaskNode=brain,
        outputFaceMaskNode=face,
        progress=lambda stage, fraction: stages.append((stage, fraction)),
    )
    return {"input": inputNode, "outcome": outcome, "brain": brain, "face": face, "stages": stages}


@pytest.fixture(scope="module")
def brain_labelmap(processed, headless):
    """The brain kept by the first run as a labelmap node: a user mask that spares later runs the brain extractor."""
    inputNode = processed["input"]
    labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "user brain")
    labelmap.SetIJKToRASMatrix(_vtk_matrix(_matrix(inputNode)))
    slicer.util.updateVolumeFromArray(labelmap, _segment_array(processed["brain"], inputNode).astype(np.uint8))
    return labelmap


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
            segmentationNode, labelmap, referenceNode
        )
        assert np.allclose(_matrix(labelmap), _matrix(referenceNode))
        return slicer.util.arrayFromVolume(labelmap).copy() > 0
    finally:
        scene.RemoveNode(labelmap)


def _remove(scene, *nodes) -> None:
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)


# --- node <-> SimpleITK geometry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", params(SLICER_READABLE))
def test_volume_node_to_image_is_the_same_physical_volume(path, headless, module):
    """Slicer (RAS) and SimpleITK (LPS) read the file independently; the converted node must match voxel for voxel
    at the same physical points, whatever the file's orientation."""
    from MRIDeIdentifySlicer import nodes

    node = headless.load_volume(path)
    try:
        image = nodes.imageFromVolumeNode(node)
        reference = sitk.ReadImage(str(path))
        if reference.GetDimension() == 4:
            reference = reference[:, :, :, 0]
        assert image.GetSize() == reference.GetSize()
        assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        assert image.GetPixelID() == reference.GetPixelID()
        same_grid = sitk.Resample(
            reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, reference.GetPixelID()
        )
        assert np.array_equal(sitk.GetArrayFromImage(same_grid), sitk.GetArrayFromImage(image))
        # The array is a copy: editing the node afterwards does not change the image.
        before = sitk.GetArrayFromImage(image).copy()
        slicer.util.arrayFromVolume(node)[:] = 0
        assert np.array_equal(sitk.GetArrayFromImage(image), before)
    finally:
        headless.scene.RemoveNode(node)


# --- process (this process) ----------------------------------------------------------------------------------------


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
        outcome = logic.process(
            inputNode, None, "blur", brainMaskNode=brainMaskNode, marginMm=0.0, device="cpu", outputBrainMaskNode=kept
        )
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


# --- the panel's path: the engine in a real child process ------------------------------------------------------------


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and re.search(r"^State:\s+Z", status.read_text(), re.M))


def test_panel_run_in_a_child_process_matches_process(processed, headless, logic, brain_labelmap):
    """startProcess -> poll -> finishProcess, as the panel's timer does: the engine runs in another process, streams
    its stages, and the nodes it fills equal those of the in-process run, grid and voxel type included."""
    inputNode = processed["input"]
    common = dict(brainMaskNode=brain_labelmap, marginMm=0.0, device="cpu", seed=3)
    kept = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept")
    run = logic.startProcess(inputNode, None, "blur", outputBrainMaskNode=kept, **common)
    folder = run.folder
    assert run.wait(timeout=300)
    assert run.process.returncode == 0, run.logTail()
    events = [event["event"] for event in run.events]
    assert events[:2] == ["started", "ready"] and events[-1] == "done"
    assert run.events[0]["pid"] != os.getpid()
    stages = [(event["stage"], event["fraction"]) for event in run.events if event["event"] == "progress"]
    assert ("head mask", 0.0) in stages and stages[-1] == ("composite", 1.0)
    assert (run.stage, run.fraction) == ("composite", 1.0)
    child = logic.finishProcess(run)
    assert not folder.exists(), "the temporary files must be removed"
    assert child.startupSeconds is not None and 0 < child.startupSeconds < child.seconds
    direct = logic.process(inputNode, None, "blur", **common)
    assert child.method == direct.method == "blur" and child.device == "cpu"
    for outcome in (child, direct):
        assert np.array_equal(_matrix(outcome.outputVolumeNode), _matrix(inputNode))
    before = slicer.util.arrayFromVolume(inputNode)
    after = slicer.util.arrayFromVolume(child.outputVolumeNode)
    assert after.dtype == before.dtype
    np.testing.assert_array_equal(after, slicer.util.arrayFromVolume(direct.outputVolumeNode))
    assert np.array_equal(_segment_array(kept, inputNode), slicer.util.arrayFromVolume(brain_labelmap) > 0)
    _remove(headless.scene, child.outputVolumeNode, direct.outputVolumeNode, kept)


def test_cancel_ends_the_child_within_a_second_and_adds_nothing(processed, headless, logic):
    """Cancel during the brain extractor (a long torch call): the process is gone in under a second, nothing is
    written, the temporary files are removed, and a new run can start."""
    from MRIDeIdentifyLib.errors import Cancelled

    count = headless.scene.GetNumberOfNodes()
    run = logic.startProcess(processed["input"], None, "blur", device="cpu")
    deadline = time.perf_counter() + 120
    while run.stage != "brain mask" and time.perf_counter() < deadline and not run.finished():
        run.poll()
        time.sleep(0.02)
    assert run.stage == "brain mask", run.logTail()
    time.sleep(0.5)  # well inside the extractor
    start = time.perf_counter()
    run.cancel()
    assert run.process.poll() is not None
    latency = time.perf_counter() - start
    assert latency < 1.0, f"cancel took {latency:.2f} s"
    with pytest.raises(Cancelled):
        logic.finishProcess(run)
    assert not run.folder.exists() and headless.scene.GetNumberOfNodes() == count
    assert not _alive(run.events[0]["pid"])


def test_no_second_run_while_one_runs(processed, logic):
    run = logic.startProcess(processed["input"], None, "blur", device="cpu")
    try:
        with pytest.raises(RuntimeError, match="already running"):
            logic.startProcess(processed["input"], None, "blur", device="cpu")
        with pytest.raises(RuntimeError, match="already running"):
            logic.process(processed["input"], None, "blur", device="cpu")
    finally:
        logic.cancelProcess()
    assert run.process.poll() is not None and not run.folder.exists()


@pytest.mark.skipif(os.name == "nt", reason="the launcher STAND-IN is a POSIX shell script")
def test_cancel_ends_the_interpreter_a_launcher_started(processed, tmp_path):
    """Slicer's PythonSlicer is a launcher that starts the real interpreter as its child: Cancel must end both.
    A STAND-IN launcher (a shell that runs this Python as its child and waits) shows it."""
    from MRIDeIdentifySlicer import nodes
    from MRIDeIdentifySlicer.childprocess import ChildRun

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')
    launcher.chmod(0o755)
    image = nodes.imageFromVolumeNode(processed["input"])
    run = ChildRun.start(
        image, "blur", {"margin_mm": 3.0, "seed": 0, "device": "cpu", "options": {}}, python=str(launcher)
    )
    try:
        while not any(event["event"] == "ready" for event in run.poll()) and not run.finished():
            time.sleep(0.05)
        interpreter = run.events[0]["pid"]
        assert interpreter != run.process.pid, "the launcher STAND-IN did not start a child interpreter"
        run.cancel()
        time.sleep(0.2)
        assert not _alive(interpreter) and run.process.poll() is not None
    finally:
        run.close()


@pytest.mark.skipif(os.name == "nt", reason="the crashing interpreter STAND-IN is a POSIX shell script")
def test_a_child_that_dies_is_reported_with_its_output(processed, tmp_path):
    """A child that ends without a result (killed for memory, a crash) is an error naming its exit code and its
    last output, not a hang or an empty output node. The interpreter is a STAND-IN script that dies at once."""
    from MRIDeIdentifySlicer import nodes
    from MRIDeIdentifySlicer.childprocess import ChildRun

    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\necho 'Killed: out of memory'\nexit 137\n")
    crashing.chmod(0o755)
    run = ChildRun.start(
        nodes.imageFromVolumeNode(processed["input"]),
        "blur",
        {"margin_mm": 3.0, "seed": 0, "device": "cpu", "options": {}},
        python=str(crashing),
    )
    try:
        assert run.wait(timeout=30)
        with pytest.raises(RuntimeError, match=r"stopped unexpectedly \(exit code 137\)(.|\n)*out of memory"):
            run.result()
    finally:
        run.close()
    assert not run.folder.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_child_error_comes_back_in_the_panel_words(processed, logic, brain_labelmap):
    """An input error inside the child (the GPU chosen, none present) is raised by finishProcess as InputError,
    naming the panel's Device control rather than the command line's --device."""
    from MRIDeIdentifyLib.errors import InputError

    run = logic.startProcess(processed["input"], None, "blur", brainMaskNode=brain_labelmap, device="cuda")
    assert run.wait(timeout=120)
    with pytest.raises(InputError) as raised:
        logic.finishProcess(run)
    assert "Device" in str(raised.value) and "--" not in str(raised.value), str(raised.value)
    assert run.process.returncode == 2


# --- a parent transform ------------------------------------------------------------------------------------------


def test_outputs_under_a_parent_transform_stay_in_place(processed, headless, logic, brain_labelmap):
    """Input under a +50 mm (and rotated) transform: the output volume and both segmentations sit under the same
    transform, where the input's voxels are; the segments are not moved a second time by the import."""
    scene = headless.scene
    inputNode, mask = processed["input"], slicer.util.arrayFromVolume(brain_labelmap) > 0
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkTransform()
    matrix.Translate(50.0, -20.0, 10.0)
    matrix.RotateZ(15.0)
    transform.SetMatrixTransformToParent(matrix.GetMatrix())
    brain = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept")
    face = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "face")
    for node in (inputNode, brain_labelmap):
        node.SetAndObserveTransformNodeID(transform.GetID())
    try:
        outcome = logic.process(
            inputNode,
            None,
            "blur",
            brainMaskNode=brain_labelmap,
            marginMm=0.0,
            device="cpu",
            outputBrainMaskNode=brain,
            outputFaceMaskNode=face,
        )
        output = outcome.outputVolumeNode
        for node in (output, brain, face):
            assert node.GetTransformNodeID() == transform.GetID()
        assert np.array_equal(_matrix(output), _matrix(inputNode))
        assert np.array_equal(_segment_array(brain, inputNode), mask)
        # World coordinates: the brain segment's centre is the input brain's centre, both through the transform.
        ijk = np.argwhere(mask)[:, ::-1].mean(axis=0)
        expected = slicer.util.arrayFromVTKMatrix(matrix.GetMatrix()) @ _matrix(inputNode) @ np.append(ijk, 1.0)
        bounds = np.zeros(6)
        brain.GetRASBounds(bounds)
        centre = (bounds[0::2] + bounds[1::2]) / 2
        assert np.linalg.norm(centre - expected[:3]) < 15.0, (centre, expected[:3])
        assert _segment_array(face, inputNode).sum() > 1000
        # The before/after cameras face the face in the world, i.e. through the rotation too.
        from MRIDeIdentifySlicer import nodes, views

        left, _ = logic.showBeforeAfter(inputNode, output)
        camera = views.cameraOf(left)
        looking = np.subtract(camera.GetFocalPoint(), camera.GetPosition())
        inputNode.SetAndObserveTransformNodeID(None)
        anterior, _ = views.faceDirectionsRas(inputNode, nodes.imageFromVolumeNode(inputNode))
        rotated = slicer.util.arrayFromVTKMatrix(matrix.GetMatrix())[:3, :3] @ anterior
        assert looking @ -rotated / np.linalg.norm(looking) > 0.999
        logic.leaveBeforeAfter()
        _hide_volume_renderings(headless)
    finally:
        for node in (inputNode, brain_labelmap):
            node.SetAndObserveTransformNodeID(None)
        _remove(scene, brain, face, transform, locals().get("output"))


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
        logic.startProcess(inputNode, None, "nonsense")  # at the click, before any thread
    model = headless.scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(ValueError, match="neither a segmentation nor a labelmap"):
        logic.process(inputNode, None, "blur", brainMaskNode=model)
    for node in (labelmap, model):
        headless.scene.RemoveNode(node)


# --- before/after --------------------------------------------------------------------------------------------------


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels that differ from the view's background (Slicer's background is a vertical gradient, so each row's
    background colour is that of its first pixel)."""
    return np.abs(rgb.astype(int) - rgb[:, :1, :].astype(int)).sum(axis=2) > 30


def _render_pair(headless, left, right, name: str, size: int = 240):
    """Render both views without the bounding box and its labels (they would count as foreground)."""
    RENDER_DIR.mkdir(parents=True, exist_ok=True)
    pictures = []
    for view, side in ((left, "before"), (right, "after")):
        view.SetBoxVisible(False)
        view.SetAxisLabelsVisible(False)
        pictures.append(headless.render_view(view, RENDER_DIR / f"{name}_{side}.png", size=size))
    return pictures


@needs_presets
def test_before_after_views_render_the_two_volumes(processed, headless, logic):
    from MRIDeIdentifySlicer import views

    inputNode, outputNode = processed["input"], processed["outcome"].outputVolumeNode
    left, right = logic.showBeforeAfter(inputNode, outputNode)
    scene = headless.scene
    displays = scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode")
    assert [view.GetID() for view in logic.showBeforeAfter(inputNode, outputNode)] == [left.GetID(), right.GetID()]
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode") == displays, "not idempotent"
    assert (
        scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement()
        == slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView
    )
    assert (left.GetLayoutName(), right.GetLayoutName()) == ("1", "2")

    vr = headless.volume_rendering_logic
    properties = []
    for volume, view in ((inputNode, left), (outputNode, right)):
        display = vr.GetFirstVolumeRenderingDisplayNode(volume)
        assert display.GetVisibility() and list(display.GetViewNodeIDs()) == [view.GetID()]
        assert (
            sum(
                volume.GetNthDisplayNode(i).IsA("vtkMRMLVolumeRenderingDisplayNode")
                for i in range(volume.GetNumberOfDisplayNodes())
            )
            == 1
        )
        assert view.GetLinkedControl()
        properties.append(views.transferFunctionPoints(display.GetVolumePropertyNode()))
    assert properties[0] == properties[1], "the two views must use the same transfer functions"
    # The opacity ramp starts at the input's skin level (the engine's head threshold).
    from MRIDeIdentifyLib.headmask import head_threshold

    skin = head_threshold(sitk.ReadImage(str(inputNode.GetStorageNode().GetFileName())))
    assert [x for x, y, *_ in properties[0]["opacity"] if y == 0][-1] == pytest.approx(skin, rel=1e-6)

    # Both cameras look at the face: from anterior (+A in RAS), head up (+S), from the same place.
    cameras = [views.cameraOf(view) for view in (left, right)]
    for camera in cameras:
        looking = np.subtract(camera.GetFocalPoint(), camera.GetPosition())
        assert looking[1] < -0.9 * np.linalg.norm(looking)
        assert camera.GetViewUp()[2] > 0.9
    assert np.allclose(cameras[0].GetPosition(), cameras[1].GetPosition())

    before, after = _render_pair(headless, left, right, "head", size=300)
    assert 0.1 < _foreground(before).mean() < 0.6 and 0.1 < _foreground(after).mean() < 0.6
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 2
    logic.leaveBeforeAfter()
    _hide_volume_renderings(headless)


def _hide_volume_renderings(headless) -> None:
    """Later renders must show only their own volumes."""
    for index in range(headless.scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode")):
        headless.scene.GetNthNodeByClass(index, "vtkMRMLVolumeRenderingDisplayNode").SetVisibility(False)


def _visible_volume_renderings(headless) -> int:
    return sum(
        headless.scene.GetNthNodeByClass(i, "vtkMRMLVolumeRenderingDisplayNode").GetVisibility()
        for i in range(headless.scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode"))
    )


def _rescaled(image: sitk.Image, kind: str) -> sitk.Image:
    """The same head as a uint8 scan, a 12-bit scan in uint16, or a float scan in [0, 1]."""
    voxels = sitk.GetArrayFromImage(image).astype(np.float64)
    top = np.percentile(voxels, 99.9)
    scaled = {
        "uint8": lambda v: np.clip(v / top * 255, 0, 255).astype(np.uint8),
        "uint16-12bit": lambda v: np.clip(v / top * 4095, 0, 4095).astype(np.uint16),
        "float01": lambda v: np.clip(v / top, 0, 1).astype(np.float32),
    }[kind](voxels)
    out = sitk.GetImageFromArray(scaled)
    out.CopyInformation(image)
    return out


@needs_presets
def test_renders_show_the_head_for_uint8_12bit_and_float_scans(processed, headless, logic, brain_labelmap, tmp_path):
    """Slicer's MR preset copied unchanged shows nothing of a float [0, 1] head and a fog of noise around a 12-bit
    one. Fitted to each scan, the same head renders the same in both views whatever its voxel type."""
    from MRIDeIdentifySlicer import nodes, views

    source = nodes.imageFromVolumeNode(processed["input"])
    _hide_volume_renderings(headless)
    silhouettes = {}
    for kind in ("uint8", "uint16-12bit", "float01"):
        path = tmp_path / f"{kind}.nrrd"
        sitk.WriteImage(_rescaled(source, kind), str(path))
        inputNode = headless.load_volume(path, kind)
        assert (
            slicer.util.arrayFromVolume(inputNode).dtype
            == {"uint8": np.uint8, "uint16-12bit": np.uint16, "float01": np.float32}[kind]
        )
        outcome = logic.process(inputNode, None, "blur", brainMaskNode=brain_labelmap, marginMm=0.0, device="cpu")
        left, right = logic.showBeforeAfter(inputNode, outcome.outputVolumeNode)
        vr = headless.volume_rendering_logic
        points = [
            views.transferFunctionPoints(vr.GetFirstVolumeRenderingDisplayNode(node).GetVolumePropertyNode())
            for node in (inputNode, outcome.outputVolumeNode)
        ]
        assert points[0] == points[1]
        assert _visible_volume_renderings(headless) == 2
        before, after = _render_pair(headless, left, right, kind)
        for side, picture in (("before", before), ("after", after)):
            share = _foreground(picture).mean()
            assert 0.1 < share < 0.6, f"{kind} {side}: the head covers {share:.1%} of the view"
        silhouettes[kind] = _foreground(before)
        for node in (inputNode, outcome.outputVolumeNode):
            vr.GetFirstVolumeRenderingDisplayNode(node).SetVisibility(False)
        _remove(headless.scene, inputNode, outcome.outputVolumeNode)
    logic.leaveBeforeAfter()
    reference = silhouettes["uint8"]
    for kind in ("uint16-12bit", "float01"):
        overlap = (silhouettes[kind] & reference).sum() / (silhouettes[kind] | reference).sum()
        assert overlap > 0.95, f"{kind} renders another shape than uint8 (overlap {overlap:.2f})"


@needs_presets
def test_leaving_the_layout_restores_linked_view_control(processed, headless, logic):
    inputNode, outputNode = processed["input"], processed["outcome"].outputVolumeNode
    layout = headless.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    first = next(
        headless.scene.GetNthNodeByClass(i, "vtkMRMLViewNode")
        for i in range(headless.scene.GetNumberOfNodesByClass("vtkMRMLViewNode"))
    )
    first.SetLinkedControl(False)
    left, right = logic.showBeforeAfter(inputNode, outputNode)
    assert left.GetLinkedControl() and right.GetLinkedControl()
    logic.showBeforeAfter(inputNode, outputNode)  # a second click must not forget the state before the first
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    assert not left.GetLinkedControl() and not right.GetLinkedControl()
    # A user who links the views afterwards keeps them linked: nothing is restored twice.
    left.SetLinkedControl(True)
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUp3DView)
    assert left.GetLinkedControl()
    left.SetLinkedControl(False)


def test_save_qa_renders_writes_the_engine_renderings(processed, logic, tmp_path):
    paths = logic.saveQARenders(processed["input"], processed["outcome"].outputVolumeNode, str(tmp_path / "qa"))
    assert paths[-1].endswith("qa_before_after.png") and all(Path(p).stat().st_size > 1000 for p in paths)


def test_no_rendering_environment_variable_is_set_in_the_process(tmp_path):
    """Slicer's process keeps its rendering set-up: importing the module, its Slicer package and the engine's renderer,
    and rendering the QA pictures, writes no environment variable (the check runs without a display)."""
    script = (
        "import os, sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "before = dict(os.environ)\n"
        "from slicer_scene import import_module_file\n"
        "module = import_module_file()\n"
        "import SimpleITK as sitk\n"
        "from MRIDeIdentifyLib import render\n"
        "from MRIDeIdentifySlicer import views, childprocess, dependencies, nodes\n"
        f"image = sitk.ReadImage({str(head_files()[0]) if head_files() else ''!r})\n"
        f"render.write_qa(image, image, {str(tmp_path)!r}, size=64)\n"
        "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
        "print('CHANGED', sorted(changed))\n"
    )
    if not head_files():
        pytest.skip("shared head scans not found")
    environment = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "VTK_DEFAULT_OPENGL_WINDOW")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CHANGED []" in done.stdout, done.stdout
    assert (tmp_path / "qa_before_after.png").stat().st_size > 1000


# --- dependencies: checked and installed as a clinician would meet them ---------------------------------------------


@pytest.fixture
def engine_modules_restored():
    """The installer drops the engine's modules so they are imported afresh; other tests keep theirs."""
    saved = {name: mod for name, mod in sys.modules.items() if name.startswith("MRIDeIdentifyLib")}
    yield
    for name in [name for name in sys.modules if name.startswith("MRIDeIdentifyLib")]:
        del sys.modules[name]
    sys.modules.update(saved)


class _Recorder:
    """SPIES for the application's installers (pip inside Slicer, PyTorchUtils): they record, in order, what the
    installer asks, shows and installs, and install nothing."""

    def __init__(self, answer: bool = True):
        self.calls, self.answer, self.busy = [], answer, 0

    def confirm(self, question):
        self.calls.append(("confirm", question, self.busy))
        return self.answer

    def status(self, text):
        self.calls.append(("status", text, self.busy))

    def pip(self, arguments):
        self.calls.append(("pip", list(arguments), self.busy))

    def torch(self, requirement):
        self.calls.append(("torch", requirement, self.busy))
        return object()

    def wait_cursor(self):
        recorder = self

        class Busy:
            def __enter__(self):
                recorder.busy += 1

            def __exit__(self, *exc):
                recorder.busy -= 1

        return Busy()

    def kinds(self):
        return [call[0] for call in self.calls]


def _pretend_missing(monkeypatch, dependencies, modules, torch_version="2.5.1"):
    """Make ``modules`` look not installed (until the pip SPY has run) and torch report ``torch_version``."""
    import importlib.util

    state = {"installed": False}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in modules and not state["installed"] else real(name, *a),
    )
    monkeypatch.setattr(dependencies, "torchVersion", lambda: torch_version)
    return state


def test_nothing_missing_asks_nothing(module, logic):
    recorder = _Recorder()
    assert module.MRIDeIdentifyLogic.missingRequirements() == [], "this environment lacks an engine dependency"
    assert logic.setupPythonRequirements(confirm=recorder.confirm, status=recorder.status)
    assert recorder.calls == []


def test_missing_pytorch_extension_is_said_before_asking_anything(monkeypatch):
    from MRIDeIdentifySlicer import dependencies

    _pretend_missing(monkeypatch, dependencies, {"PyTorchUtils", "deepbet"}, torch_version=None)
    recorder = _Recorder()
    with pytest.raises(RuntimeError, match="Extensions Manager, install 'PyTorch'"):
        dependencies.install(recorder.confirm, recorder.status, pipInstall=recorder.pip)
    assert recorder.calls == []


def test_an_old_torch_counts_as_missing(monkeypatch):
    from MRIDeIdentifySlicer import dependencies

    _pretend_missing(monkeypatch, dependencies, set(), torch_version="1.13.1+cu117")
    assert dependencies.missing() == ["PyTorch"] and not dependencies.torchReady()
    recorder = _Recorder(answer=False)
    assert dependencies.install(recorder.confirm, recorder.status, torchInstaller=recorder.torch) is False
    assert "1.13.1+cu117 is installed" in recorder.calls[0][1] and recorder.kinds() == ["confirm"]
    monkeypatch.setattr(dependencies, "torchVersion", lambda: "2.1.0")
    assert dependencies.torchReady()


def test_install_asks_once_shows_status_and_runs_one_pinned_pip_call(
    monkeypatch, module, logic, engine_modules_restored
):
    """PyTorch, then ONE ``pip install --no-deps`` with exact versions; the question is asked without a wait cursor,
    each status line is shown before its long call starts, and the method list is rebuilt afterwards."""
    from MRIDeIdentifyLib import methods
    from MRIDeIdentifySlicer import dependencies

    # The registry as imported while quickshear was missing: the method is noted as unavailable.
    monkeypatch.setitem(methods.UNAVAILABLE, "quickshear", "needs the Python package 'quickshear'")
    monkeypatch.delitem(methods.METHODS, "quickshear")
    assert "quickshear" not in dict(logic.availableMethods())
    state = _pretend_missing(monkeypatch, dependencies, {"deepbet", "pydeface", "quickshear"})
    torch_state = {"version": None}
    monkeypatch.setattr(dependencies, "torchVersion", lambda: torch_state["version"])
    recorder = _Recorder()

    def torch_installer(requirement):
        torch_state["version"] = "2.5.1"
        return recorder.torch(requirement)

    def pip(arguments):
        recorder.pip(arguments)
        state["installed"] = True

    assert logic.setupPythonRequirements(
        confirm=recorder.confirm,
        status=recorder.status,
        busy=recorder.wait_cursor,
        pipInstall=pip,
        torchInstaller=torch_installer,
    )
    assert recorder.kinds() == ["confirm", "status", "torch", "status", "pip", "status"]
    question = recorder.calls[0][1]
    assert "PyTorch >= 2.1" in question and "deepbet==1.0.2" in question and "quickshear==1.2.0" in question
    assert recorder.calls[0][2] == 0, "the question must not be asked under a wait cursor"
    assert recorder.calls[1][1] == "Installing PyTorch... this can take several minutes." and recorder.calls[1][2] == 0
    assert recorder.calls[2] == ("torch", ">=2.1", 1)
    assert recorder.calls[4] == ("pip", ["--no-deps", "deepbet==1.0.2", "pydeface==2.0.2", "quickshear==1.2.0"], 1)
    # No restart: the method list is read afresh and has the method the install made available.
    assert "quickshear" in dict(logic.availableMethods())


def test_a_failed_pip_call_says_what_to_do(monkeypatch):
    from MRIDeIdentifySlicer import dependencies

    _pretend_missing(monkeypatch, dependencies, {"deepbet"})

    def offline(arguments):
        raise RuntimeError("network unreachable")

    with pytest.raises(RuntimeError, match="deepbet==1.0.2 failed .*network unreachable.*click De-identify again"):
        dependencies.install(lambda question: True, pipInstall=offline)


def test_pins_and_minimum_torch_match_the_project():
    """deepbet and pydeface are pinned exactly (their files are found by path); pydeface below 2.1, which needs
    Python >= 3.10 (Slicer 5.8 has 3.9); the minimum torch is the engine's (pyproject.toml)."""
    from MRIDeIdentifySlicer import dependencies

    pins = {r.module: r.pip for r in dependencies.REQUIREMENTS}
    assert all(re.fullmatch(r"[\w.-]+==[\d.]+", pip) for pip in pins.values()), pins
    assert pins["deepbet"] == "deepbet==1.0.2"
    assert dependencies.versionTuple(pins["pydeface"].split("==")[1]) < (2, 1)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch>={dependencies.MINIMUM_TORCH_VERSION}"' in pyproject
    assert dependencies.versionTuple("2.10.0+cu126") > dependencies.versionTuple("2.9") > (2, 1)


def test_engine_messages_name_panel_controls_not_flags():
    """Every InputError text the engine can raise on the Logic's paths, shown in the panel, names no command-line
    flag and no pip command."""
    from MRIDeIdentifySlicer.messages import inPanelTerms

    samples = {
        "--device cuda was asked for but torch sees no CUDA GPU": "Device 'cuda' was chosen (Advanced section)",
        "no brain found in the input (the brain localiser found nothing); pass --brain-mask": "Brain mask",
        "the brain extractor deepbet is not installed: run `pip install --no-deps deepbet` (or pass --brain-mask)": "click De-identify again to install it",
        "unknown method 'x'; choose one of: blur": "unknown method",
        "model weights not found: /a.safetensors (and its .json config beside it)": "model weights not found",
    }
    for message, expected in samples.items():
        assert expected in inPanelTerms(message), inPanelTerms(message)
    engine = REPO / "MRIDeIdentify" / "MRIDeIdentifyLib"
    texts = []
    for path in [
        engine / name for name in ("devices.py", "brainmask.py", "pipeline.py", "reader.py", "model.py")
    ] + sorted((engine / "methods").glob("*.py")):
        texts += re.findall(r"(?:InputError|RuntimeError)\(\s*f?\"([^\"]*)\"(?:\s*f?\"([^\"]*)\")?", path.read_text())
    assert len(texts) > 15
    for parts in texts:
        shown = inPanelTerms(" ".join(parts))
        assert not re.search(r"--[a-z]|pip install", shown), shown


# --- the in-app self-test, where PyTorch is missing (the extension build servers) -----------------------------------


def test_in_app_self_test_without_torch_checks_what_it_can_and_installs_nothing(head_path):
    """The module's ScriptedLoadableModuleTest, run as the application's --testing would, in a Python where torch
    cannot be imported: it checks the Logic's input checks, says it skipped the rest, and touches neither pip,
    PyTorchUtils nor SampleData (SPIES that fail when used). The scene is real; ``slicer.mrmlScene`` is set as the
    application would set it (STAND-IN for the application attribute)."""
    script = f"""
import sys, types
sys.modules["torch"] = None  # PyTorch is not installed
sys.path[:0] = [{str(Path(__file__).parent)!r}]
import slicer
from slicer_scene import HeadlessSlicer, import_module_file
touched = []
class Spy(types.ModuleType):
    def __getattr__(self, name):
        touched.append(self.__name__ + "." + name)
        raise AssertionError(self.__name__ + "." + name + " used")
sys.modules["SampleData"], sys.modules["PyTorchUtils"] = Spy("SampleData"), Spy("PyTorchUtils")
slicer.util.pip_install = lambda *args, **kwargs: touched.append("pip_install")
headless = HeadlessSlicer()
slicer.mrmlScene = headless.scene
module = import_module_file()
module.MRIDeIdentifyTest().runTest()
assert not touched, touched
assert not [name for name in sys.modules if name.startswith("MRIDeIdentifyLib.") and name not in ("MRIDeIdentifyLib.errors", "MRIDeIdentifyLib.settings")], "engine imported"
print("SELF-TEST OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Input checks passed" in done.stdout and "skipped the de-identification" in done.stdout
    assert "SELF-TEST OK" in done.stdout


# --- parameters and defaults ---------------------------------------------------------------------------------------


def test_panel_defaults_equal_the_engine_defaults(module):
    from MRIDeIdentifyLib import settings
    from MRIDeIdentifyLib.devices import DEVICE_CHOICES
    from MRIDeIdentifyLib.methods import METHODS, default_method

    assert module.DEFAULT_ROTATIONS == settings.DEFAULT_ROTATIONS == settings.Settings().rotations
    assert module.DEFAULT_FACETS == settings.DEFAULT_FACETS == settings.Settings().facets
    assert module.DEFAULT_MARGIN_MM == settings.DEFAULT_MARGIN_MM == settings.Settings().margin_mm
    assert [value for value, _ in module.MRIDeIdentifyLogic.availableDevices()] == list(DEVICE_CHOICES)
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
