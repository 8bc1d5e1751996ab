"""A headless Slicer: real MRML scene and logics from slicer-core, and the module file imported without Qt.

What the desktop application does at startup (scene, application logic, colour, volumes, volume rendering and
layout logics, the 3-D displayable managers) is done here with the same C++ classes, so the module's Logic runs
on real Slicer code. The Qt layer (qt, ctk, slicer.ScriptedLoadableModule) does not exist outside the application:
:func:`import_module_file` installs minimal STAND-INS for it, and nothing else is replaced.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parents[2]
MODULE_FILE = MODULE_DIR / "MRIDeIdentify.py"

# The 3-D view displayable managers the application registers, in the order they must draw.
THREE_D_DISPLAYABLE_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLVolumeRenderingDisplayableManager",
)


def presets_directory() -> Path | None:
    """Folder holding Slicer's volume-rendering ``presets.xml`` (shipped in the trame-slicer wheel), or None."""
    spec = importlib.util.find_spec("trame_slicer")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "resources"
    return folder if (folder / "presets.xml").is_file() else None


class HeadlessSlicer:
    """One MRML scene with the logics the application would attach to it."""

    def __init__(self) -> None:
        # The test process renders offscreen (EGL) when there is no display; importing this file sets nothing.
        if not os.environ.get("DISPLAY"):
            os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        colors = self.app_logic.GetColorLogic()
        colors.SetMRMLScene(self.scene)
        colors.AddDefaultColorNodes()
        self.app_logic.SetModuleLogic("Colors", colors)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        self.layout_logic = slicer.vtkMRMLLayoutLogic()
        self.layout_logic.SetMRMLScene(self.scene)
        self.view_link_logic = slicer.vtkMRMLViewLinkLogic()
        self.view_link_logic.SetMRMLScene(self.scene)

        self.volumes_logic = slicer.vtkSlicerVolumesLogic()
        self.volumes_logic.SetMRMLScene(self.scene)
        self.volumes_logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic("Volumes", self.volumes_logic)

        self.volume_rendering_logic = slicer.vtkSlicerVolumeRenderingLogic()
        self.volume_rendering_logic.SetMRMLScene(self.scene)
        self.volume_rendering_logic.SetMRMLApplicationLogic(self.app_logic)
        presets = presets_directory()
        if presets is not None:
            self.volume_rendering_logic.SetModuleShareDirectory(str(presets))
        self.app_logic.SetModuleLogic("VolumeRendering", self.volume_rendering_logic)
        self._views: list = []

    def load_volume(self, path: str | Path, name: str | None = None):
        """Load a NIfTI/NRRD/MGZ file into a scalar volume node, as File > Add Data does."""
        name = name or Path(path).name.split(".")[0]
        node = self.volumes_logic.AddArchetypeVolume(str(path), name, 0, None)
        if node is None:
            raise OSError(f"Slicer could not load {path}")
        return node

    def render_view(self, view_node, path: str | Path, size: int = 400) -> np.ndarray:
        """Render one 3-D view node offscreen through Slicer's displayable managers; write a PNG; return RGB."""
        import slicer
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.app_logic)
        for name in THREE_D_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        renderer = vtk.vtkRenderer()
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.AddRenderer(renderer)
        window.SetSize(size, size)
        # The displayable-manager group crashes without an interactor on its render window.
        interactor = vtk.vtkRenderWindowInteractor()
        interactor.SetRenderWindow(window)
        group = factory.InstantiateDisplayableManagers(renderer)
        group.SetMRMLDisplayableNode(view_node)
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3].copy()
        # Keep the pipeline alive until the scene goes: managers observe the scene's nodes.
        self._views.append((group, window, interactor, renderer))
        return rgb

    def close(self) -> None:
        # Clear(1) with a layout logic attached crashes at teardown; Clear(0) does not.
        self._views.clear()
        self.scene.Clear(0)


# --- STAND-INS for the application's Qt layer (qt, ctk, slicer.ScriptedLoadableModule) -----------------------
# They exist only so that MRIDeIdentify.py can be imported outside the application. Logic code never reaches them:
# the Logic is Qt-free by design, and the base classes below only keep the attributes the real ones set.


class _StandInLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__


class _StandInLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__[: -len("Widget")]


class _StandInLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[: -len("Logic")]
        self.isSingletonParameterNode = True


class _StandInLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        print(message)


def _install_qt_stand_ins() -> None:
    import slicer

    for name in ("qt", "ctk"):
        if name not in sys.modules:
            stand_in = types.ModuleType(name)
            stand_in.__doc__ = "STAND-IN for the application's Qt bindings (tests only)"
            sys.modules[name] = stand_in
    if "slicer.ScriptedLoadableModule" not in sys.modules:
        stand_in = types.ModuleType("slicer.ScriptedLoadableModule")
        stand_in.__doc__ = "STAND-IN for slicer.ScriptedLoadableModule (tests only)"
        stand_in.ScriptedLoadableModule = _StandInLoadableModule
        stand_in.ScriptedLoadableModuleWidget = _StandInLoadableModuleWidget
        stand_in.ScriptedLoadableModuleLogic = _StandInLoadableModuleLogic
        stand_in.ScriptedLoadableModuleTest = _StandInLoadableModuleTest
        sys.modules["slicer.ScriptedLoadableModule"] = stand_in
        slicer.ScriptedLoadableModule = stand_in


def import_module_file() -> types.ModuleType:
    """Import ``MRIDeIdentify.py`` (and its engine beside it) with the Qt stand-ins in place."""
    if "MRIDeIdentify" in sys.modules:
        return sys.modules["MRIDeIdentify"]
    _install_qt_stand_ins()
    # The application puts each scripted module's folder on sys.path; the engine package is found there.
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location("MRIDeIdentify", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["MRIDeIdentify"] = module
    spec.loader.exec_module(module)
    return module


# --- the panel in real Qt (PySide6), with STAND-INS for Slicer's custom widgets ------------------------------------


def load_panel(ui_file: Path = MODULE_DIR / "Resources" / "UI" / "MRIDeIdentify.ui"):
    """Load the module's .ui with Qt's own QUiLoader (PySide6, offscreen). Returns (QApplication, top widget).

    Slicer's widget classes (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit) are not in
    PySide6: minimal STAND-INS with the same class names and the properties the .ui sets take their place, so the
    layout, the Qt widgets and the property values are those of the file.
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Property
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QLineEdit, QWidget

    class qMRMLWidget(QWidget):  # noqa: N801 - Slicer's class name
        """STAND-IN for Slicer's qMRMLWidget."""

    class ctkCollapsibleButton(QGroupBox):  # noqa: N801
        """STAND-IN for CTK's collapsible section: a group box whose title is the button text."""

        def _text(self):
            return self.title()

        def _set_text(self, text):
            self.setTitle(text)

        def _collapsed(self):
            return getattr(self, "_is_collapsed", False)

        def _set_collapsed(self, collapsed):
            self._is_collapsed = collapsed
            self.setTitle(("\u25b8 " if collapsed else "") + self.title().lstrip("\u25b8 "))

        text = Property(str, _text, _set_text)
        collapsed = Property(bool, _collapsed, _set_collapsed)

    class qMRMLNodeComboBox(QComboBox):  # noqa: N801
        """STAND-IN for Slicer's node selector: keeps the properties, shows the 'none' entry or the node type."""

        def __init__(self, parent=None):
            super().__init__(parent)
            self._properties = {"nodeTypes": [], "noneEnabled": False, "noneDisplay": "None"}

        def _getter(name):
            return lambda self: self._properties.get(name)

        def _setter(name):
            def set_value(self, value):
                self._properties[name] = value
                self.clear()
                self.addItem(
                    self._properties["noneDisplay"]
                    if self._properties["noneEnabled"]
                    else " / ".join(t.replace("vtkMRML", "").replace("Node", "") for t in self._properties["nodeTypes"])
                )

            return set_value

        nodeTypes = Property(list, _getter("nodeTypes"), _setter("nodeTypes"))
        noneEnabled = Property(bool, _getter("noneEnabled"), _setter("noneEnabled"))
        noneDisplay = Property(str, _getter("noneDisplay"), _setter("noneDisplay"))
        addEnabled = Property(bool, _getter("addEnabled"), _setter("addEnabled"))
        removeEnabled = Property(bool, _getter("removeEnabled"), _setter("removeEnabled"))
        renameEnabled = Property(bool, _getter("renameEnabled"), _setter("renameEnabled"))
        showChildNodeTypes = Property(bool, _getter("showChildNodeTypes"), _setter("showChildNodeTypes"))
        baseName = Property(str, _getter("baseName"), _setter("baseName"))

    class ctkPathLineEdit(QLineEdit):  # noqa: N801
        """STAND-IN for CTK's path editor."""

        def _name_filters(self):
            return getattr(self, "_filters", [])

        def _set_name_filters(self, filters):
            self._filters = filters
            self.setPlaceholderText(", ".join(filters))

        nameFilters = Property(list, _name_filters, _set_name_filters)

    app = QApplication.instance() or QApplication([])
    loader = QUiLoader()
    for stand_in in (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit):
        loader.registerCustomWidget(stand_in)
    panel = loader.load(str(ui_file))
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load {ui_file}: {loader.errorString()}")
    return app, panel
