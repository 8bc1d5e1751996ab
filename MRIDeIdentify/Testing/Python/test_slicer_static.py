"""Static checks of the Slicer extension: what the application and Slicer's CMake macros would reject.

Nothing here needs Slicer: the .ui is parsed as XML, the module file and the engine as Python syntax trees, the
CMake files as text. Each check names the file and the line or object to fix.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "MRIDeIdentify"
MODULE_FILE = MODULE_DIR / "MRIDeIdentify.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MRIDeIdentify.ui"
ENGINE_DIR = MODULE_DIR / "MRIDeIdentifyLib"
SLICER_PACKAGE_DIR = MODULE_DIR / "MRIDeIdentifySlicer"
INDEX_ENTRY = REPO / "MRIDeIdentify.json"

# Modules Slicer's own Python ships (5.8 and later): the engine may import them without an install step.
# vtkmodules: the package behind `import vtk` in VTK 9, which Slicer ships; skin.py imports three of its kits.
SLICER_BUNDLED = {"numpy", "scipy", "SimpleITK", "vtk", "vtkmodules", "PIL", "pydicom"}
# Lazy imports on paths the Slicer Logic never takes (it passes images, never file paths).
NOT_REACHED_FROM_SLICER = {("confidentiality.py", "dicomanonymizer"): "writes de-identified DICOM series"}
# Fields of Slicer's catalog-entry schema v1.0.1 (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json).
INDEX_REQUIRED = {"$schema", "category", "scm_url"}
INDEX_ALLOWED = INDEX_REQUIRED | {
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "build_subdirectory",
    "enabled",
    "tier",
}


# --- the panel (.ui) -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _widgets(ui: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def test_ui_top_widget_is_a_qmrmlwidget(ui):
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget"
    assert top.get("name") == "MRIDeIdentify" == ui.findtext("class")


def test_every_ui_attribute_the_widget_uses_exists(ui):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    missing = sorted(used - set(_widgets(ui)))
    assert used, "the widget uses no self.ui.X: the regular expression is wrong"
    assert not missing, f"MRIDeIdentify.py uses self.ui.X that the .ui does not define: {missing}"


def test_panel_has_the_sections_and_controls_of_the_issue(ui):
    widgets = _widgets(ui)
    for name in (
        "inputsCollapsibleButton",
        "methodCollapsibleButton",
        "advancedCollapsibleButton",
        "outputsCollapsibleButton",
    ):
        assert widgets.get(name) == "ctkCollapsibleButton", name
    for name in (
        "inputVolumeSelector",
        "brainMaskSelector",
        "outputVolumeSelector",
        "outputBrainMaskSelector",
        "outputFaceMaskSelector",
    ):
        assert widgets.get(name) == "qMRMLNodeComboBox", name
    for name, cls in {
        "methodComboBox": "QComboBox",
        "deviceComboBox": "QComboBox",
        "seedSpinBox": "QSpinBox",
        "marginSpinBox": "QDoubleSpinBox",
        "rotationsSpinBox": "QSpinBox",
        "facetsSpinBox": "QSpinBox",
        "modelPathLineEdit": "ctkPathLineEdit",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "showBeforeAfterButton": "QPushButton",
        "saveQARendersButton": "QPushButton",
        "statusLabel": "QLabel",
    }.items():
        assert widgets.get(name) == cls, name
    apply_text = ui.find(".//widget[@name='applyButton']/property[@name='text']/string").text
    assert apply_text == "De-identify"


def test_node_comboboxes_have_node_types_and_are_wired_to_the_scene(ui):
    top = ui.find("widget").get("name")
    wired = {
        (c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
        for c in ui.iter("connection")
    }
    comboboxes = [w for w in ui.iter("widget") if w.get("class") == "qMRMLNodeComboBox"]
    assert len(comboboxes) == 5
    for combobox in comboboxes:
        name = combobox.get("name")
        types = [s.text for s in combobox.findall("property[@name='nodeTypes']/stringlist/string")]
        assert types and all(t.startswith("vtkMRML") for t in types), f"{name}: nodeTypes not set"
        assert (top, "mrmlSceneChanged(vtkMRMLScene*)", name, "setMRMLScene(vtkMRMLScene*)") in wired, (
            f"{name} is not connected to {top}'s mrmlSceneChanged: it would list no nodes"
        )


def test_custom_widgets_are_declared(ui):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {cls for cls in _widgets(ui).values() if not cls.startswith("Q")}
    assert used <= declared, f"custom widgets used but not declared in <customwidgets>: {used - declared}"


def test_signals_the_widget_connects_by_name_exist_on_those_classes(ui):
    """``widget.connect("signal(args)", slot)`` fails silently in Slicer when the signature is wrong."""
    signals = {
        "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)"},
        "QComboBox": {"currentIndexChanged(int)"},
        "QSpinBox": {"valueChanged(int)"},
        "QDoubleSpinBox": {"valueChanged(double)"},
        "ctkPathLineEdit": {"currentPathChanged(QString)"},
        "QPushButton": {"clicked(bool)"},
    }
    widgets = _widgets(ui)
    source = MODULE_FILE.read_text()
    connected = re.findall(r"self\.ui\.(\w+)\.connect\(\s*\"([^\"]+)\"", source)
    assert len(connected) >= 15
    for name, signal in connected:
        assert signal in signals[widgets[name]], f"{name} ({widgets[name]}) has no signal {signal}"


def _module_constant(name: str):
    """A default the panel shows: the module takes it from the engine's settings (checked here from the source)."""
    tree = ast.parse(MODULE_FILE.read_text())
    imported = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "MRIDeIdentifyLib.settings"
        for alias in node.names
    }
    assert name in imported, f"{name} must come from MRIDeIdentifyLib.settings"
    from MRIDeIdentifyLib import settings

    return getattr(settings, name)


def test_panel_loads_in_qt_with_the_module_defaults():
    """Qt's own UI loader (PySide6) builds the panel: every self.ui.X exists with the class the .ui gives it, the
    spin boxes start at the module's defaults, and the Qt signals the widget connects by name exist."""
    pytest.importorskip("PySide6", reason="PySide6-Essentials is not installed")
    from PySide6.QtCore import QMetaObject
    from PySide6.QtWidgets import QWidget

    from slicer_scene import load_panel

    _, panel = load_panel(UI_FILE)
    assert panel.objectName() == "MRIDeIdentify"
    classes = _widgets(ET.parse(UI_FILE).getroot())
    for name in set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text())):
        child = panel.findChild(QWidget, name)
        assert child is not None, name
        assert type(child).__name__ == classes[name] or child.metaObject().className() == classes[name], name
    assert panel.findChild(QWidget, "rotationsSpinBox").value() == _module_constant("DEFAULT_ROTATIONS")
    assert panel.findChild(QWidget, "facetsSpinBox").value() == _module_constant("DEFAULT_FACETS")
    assert panel.findChild(QWidget, "marginSpinBox").value() == _module_constant("DEFAULT_MARGIN_MM")
    assert panel.findChild(QWidget, "seedSpinBox").maximum() == 2**31 - 1
    assert not panel.findChild(QWidget, "applyButton").isEnabled()
    for name, signal in re.findall(r"self\.ui\.(\w+)\.connect\(\s*\"([^\"]+)\"", MODULE_FILE.read_text()):
        if classes[name].startswith("Q"):
            meta = panel.findChild(QWidget, name).metaObject()
            assert meta.indexOfSignal(QMetaObject.normalizedSignature(signal).data().decode()) >= 0, (name, signal)


# --- packaging: CMake, the Extensions Index entry, icon ----------------------------------------------------------


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", "MRIDeIdentify") for item in match.group(1).split()]


def _cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\({variable}\s+"([^"]*)"\)', text)
    return match.group(1) if match else ""


def _files_under(folder: Path) -> set[str]:
    return {
        p.relative_to(MODULE_DIR).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_module_cmake_lists_equal_the_files_on_disk():
    """slicerMacroBuildScriptedModule fails at configure time on a listed file that is missing, and silently
    leaves out a file that is not listed (the installed extension would then fail to import it)."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources)), "duplicate entries"
    engine = _files_under(ENGINE_DIR)
    expected_scripts = {"MRIDeIdentify.py"} | {
        f for f in engine | _files_under(SLICER_PACKAGE_DIR) if f.endswith(".py")
    }
    expected_resources = _files_under(MODULE_DIR / "Resources") | {f for f in engine if not f.endswith(".py")}
    assert set(scripts) == expected_scripts, (
        f"MODULE_PYTHON_SCRIPTS: add {sorted(expected_scripts - set(scripts))}, "
        f"remove {sorted(set(scripts) - expected_scripts)}"
    )
    assert set(resources) == expected_resources, (
        f"MODULE_PYTHON_RESOURCES: add {sorted(expected_resources - set(resources))}, "
        f"remove {sorted(set(resources) - expected_resources)}"
    )
    assert "Resources/UI/MRIDeIdentify.ui" in resources and "Resources/Icons/MRIDeIdentify.png" in resources
    assert re.search(
        r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
        r"\s*RESOURCES \$\{MODULE_PYTHON_RESOURCES\}",
        text,
    )
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_metadata_is_complete():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(MRIDeIdentify\)", text, re.M)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert _cmake_value(text, f"EXTENSION_{key}").strip(), f"EXTENSION_{key} is empty"
    assert _cmake_value(text, "EXTENSION_DEPENDS") == "PyTorch"
    for key in ("ICONURL", "SCREENSHOTURLS"):
        for url in _cmake_value(text, f"EXTENSION_{key}").split():
            assert url.startswith("https://raw.githubusercontent.com/mrideidentify/SlicerMRIDeIdentify/main/"), url
            path = url.split("/main/", 1)[1]
            assert (REPO / path).is_file(), f"EXTENSION_{key} points at {path}, which is not in the repository"
    for line in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(MRIDeIdentify)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert line in text, line
    assert (REPO / "LICENSE").is_file()


def test_the_panel_screenshot_is_what_the_index_and_the_readme_show():
    """docs/panel.png is the first screenshot URL (the Extensions Index reads it from the CMakeLists.txt of the
    repository its JSON entry points at: the catalog schema has no screenshot field) and the README shows it."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    urls = _cmake_value(cmake, "EXTENSION_SCREENSHOTURLS").split()
    assert urls[0].endswith("/main/docs/panel.png") and (REPO / "docs" / "panel.png").is_file()
    entry = json.loads(INDEX_ENTRY.read_text())
    assert entry["scm_url"].removesuffix(".git").split("github.com/")[1] in urls[0]
    assert "](docs/panel.png)" in (REPO / "README.md").read_text()


def test_extensions_index_entry_follows_the_catalog_schema():
    entry = json.loads(INDEX_ENTRY.read_text())
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert INDEX_ENTRY.stem == re.search(r"^project\((\w+)\)", cmake, re.M).group(1)
    assert not INDEX_ENTRY.stem.startswith("Slicer"), "the extension name must not start with Slicer"
    assert INDEX_REQUIRED <= set(entry) <= INDEX_ALLOWED, set(entry) ^ INDEX_ALLOWED
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == _cmake_value(cmake, "EXTENSION_DEPENDS").split()
    assert entry["category"] == _cmake_value(cmake, "EXTENSION_CATEGORY")
    assert entry["scm_url"].rstrip(".git").endswith("/SlicerMRIDeIdentify")
    assert entry.get("tier") in (1, 3, 5) and entry.get("scm_type", "git") in ("git", "local")


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "MRIDeIdentify.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        colours = np.unique(np.asarray(icon.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 16, "the icon is (nearly) blank"


# --- Python: what runs inside Slicer ------------------------------------------------------------------------------


def _engine_files() -> list[Path]:
    return sorted(p for p in ENGINE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def _slicer_files() -> list[Path]:
    """What runs in (or for) the application: the module file and its Slicer-side package."""
    return [MODULE_FILE, *sorted(p for p in SLICER_PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)]


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _top_level_imports(tree: ast.Module) -> set[str]:
    return _imported_roots(
        ast.Module(body=[node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))], type_ignores=[])
    )


def test_module_file_and_its_package_import_neither_torch_nor_the_engine_at_load():
    """Slicer imports every module file at startup, before PyTorch may be installed: the engine (which imports
    torch) and SimpleITK are imported inside the functions that use them only. The one exception is the
    engine's settings (the defaults the panel shows), a module that itself imports only the standard library."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "qt", "vtk", "slicer", "MRIDeIdentifySlicer"}
    settings = ast.parse((ENGINE_DIR / "settings.py").read_text())
    assert _top_level_imports(settings) <= set(sys.stdlib_module_names) | {"__future__"}
    used_engine = set()
    for path in _slicer_files():
        tree = ast.parse(path.read_text())
        top_level = _top_level_imports(
            ast.Module(
                body=[
                    node
                    for node in tree.body
                    if not (isinstance(node, ast.ImportFrom) and node.module == "MRIDeIdentifyLib.settings")
                ],
                type_ignores=[],
            )
        )
        assert top_level <= allowed, f"{path.name} imports {sorted(top_level - allowed)} at load"
        used_engine |= _imported_roots(tree) & {"MRIDeIdentifyLib"}
    assert used_engine == {"MRIDeIdentifyLib"}, "the Logic must call the engine"
    worker = ast.parse((SLICER_PACKAGE_DIR / "worker.py").read_text())
    assert _top_level_imports(worker) <= set(sys.stdlib_module_names), "the child must not need Slicer"
    assert not _imported_roots(worker) & {"slicer", "qt", "vtk"}


def test_no_second_ras_lps_conversion_beside_the_engine():
    """The node <-> image geometry goes through the engine's reader (set_ras_affine / ras_affine)."""
    for path in _slicer_files():
        text = path.read_text()
        assert not re.search(r"-1\.?0?,\s*-1\.?0?,\s*1\.?0?\]", text), f"{path.name} flips RAS/LPS itself"
    assert "set_ras_affine" in (SLICER_PACKAGE_DIR / "nodes.py").read_text()


def test_module_file_holds_the_four_classes_and_no_helpers():
    """Helpers live in MRIDeIdentifySlicer (or the engine): the module file defines the module, Widget, Logic and
    Test classes, and the two small records the Logic returns."""
    tree = ast.parse(MODULE_FILE.read_text())
    functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert functions == [], f"module-level helpers in MRIDeIdentify.py: {functions}"
    assert classes == [
        "MRIDeIdentify",
        "MRIDeIdentifyWidget",
        "ProcessOutcome",
        "_Request",
        "MRIDeIdentifyLogic",
        "MRIDeIdentifyTest",
    ], classes
    names = {
        node.name
        for path in _slicer_files()[1:] + _engine_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    logic = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "MRIDeIdentifyLogic")
    private = {
        node.name
        for node in logic.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__")
    }
    assert not private & names, f"the Logic redefines helpers that exist elsewhere: {sorted(private & names)}"


def test_engine_never_imports_qt_ctk_or_slicer():
    for path in _engine_files():
        roots = _imported_roots(ast.parse(path.read_text()))
        assert not roots & {"qt", "ctk", "slicer", "PythonQt", "PyQt5", "PySide2", "PySide6", "MRIDeIdentifySlicer"}, (
            path
        )
        assert "slicer.app" not in path.read_text(), path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(MODULE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _engine_imports(path: Path, tree: ast.AST) -> set[str]:
    """Engine modules that ``path`` imports (absolute names), including a package's dynamically loaded modules."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.startswith("MRIDeIdentifyLib"):
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            found |= {_module_name(p) for p in path.parent.glob("*.py")}
    return found


def _reached_from_the_logic() -> list[Path]:
    """Engine files the Slicer Logic can run: what MRIDeIdentify.py and its Slicer package (the child process's
    worker included) import, transitively."""
    files = {_module_name(p): p for p in _engine_files()}
    pending = set().union(*(_engine_imports(path, ast.parse(path.read_text())) for path in _slicer_files()))
    reached: set[str] = set()
    while pending:
        name = pending.pop()
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for module in ({name} | parents) - reached:
            if module in files:
                reached.add(module)
                pending |= _engine_imports(files[module], ast.parse(files[module].read_text()))
    return sorted(files[name] for name in reached)


def test_engine_dependencies_are_slicer_bundled_or_installed_by_the_module():
    """Everything the engine code the Logic runs imports (or finds by name) must exist in Slicer's Python once the
    module has run its installer: Slicer's own packages, torch (PyTorchUtils) or one of dependencies.REQUIREMENTS."""
    tree = ast.parse((SLICER_PACKAGE_DIR / "dependencies.py").read_text())
    requirements = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "REQUIREMENTS"
    )
    installed = {element.args[0].value for element in requirements.elts}
    allowed = SLICER_BUNDLED | {"torch"} | installed
    reached = _reached_from_the_logic()
    assert {"pipeline.py", "render.py", "blur.py"} <= {p.name for p in reached}
    assert "cli.py" not in {p.name for p in reached}
    for path in reached:
        tree = ast.parse(path.read_text())
        found = {
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "find_spec"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        }
        third_party = {
            root
            for root in _imported_roots(tree) | found
            if root not in sys.stdlib_module_names
            and root != "MRIDeIdentifyLib"
            and (path.name, root) not in NOT_REACHED_FROM_SLICER
        }
        assert third_party <= allowed, (
            f"{path.relative_to(REPO)} needs {sorted(third_party - allowed)}: add it to REQUIREMENTS in "
            "MRIDeIdentifySlicer/dependencies.py (or to SLICER_BUNDLED here if Slicer ships it)"
        )


def test_slicer_util_functions_are_called_through_slicer_util():
    """slicer-core copies every slicer.util function onto slicer itself; the real application does not."""
    spec = importlib.util.find_spec("slicer.util")
    if spec is None or spec.origin is None:
        pytest.skip("slicer-core is not installed (pip install slicer-core)")
    util = ast.parse(Path(spec.origin).read_text())
    util_names = {node.name for node in util.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    here = Path(__file__).parent
    for path in [
        *_slicer_files(),
        REPO / "scripts" / "make_screenshot.py",
        here / "slicer_scene.py",
        here / "test_slicer_module.py",
        REPO / "benchmarks" / "bench_slicer_child.py",
    ]:
        if not path.is_file():
            continue
        misused = sorted(
            {
                f"slicer.{node.attr} (line {node.lineno})"
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "slicer"
                and node.attr in util_names
            }
        )
        assert not misused, f"{path.name}: call these as slicer.util.X: {misused}"


def test_module_and_engine_parse_on_python_3_9():
    """Slicer 5.8 ships Python 3.9: vermin finds syntax and library use newer than that."""
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install vermin)")
    command = [vermin, "-q", "--no-tips", "--violations", "-t=3.9-"]
    result = subprocess.run(
        command + [str(MODULE_FILE), str(SLICER_PACKAGE_DIR), str(ENGINE_DIR)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _python39() -> str | None:
    candidates = sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    if candidates:
        return str(candidates[-1])
    found = shutil.which("python3.9")
    # A pyenv shim exists even where its version is not selected; it then fails to run.
    return found if found and "shims" not in found else None


def test_module_and_engine_compile_with_a_real_python_3_9():
    """Where a Python 3.9 interpreter exists (pyenv), it compiles every file (syntax only: nothing is imported)."""
    python39 = _python39()
    if python39 is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    files = [*map(str, _slicer_files()), *map(str, _engine_files())]
    script = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\n"
    result = subprocess.run([python39, "-c", script, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_vermin_does_flag_newer_syntax(tmp_path):
    """The check above can fail: a 3.10 match statement is reported."""
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install vermin)")
    newer = tmp_path / "newer.py"
    newer.write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    result = subprocess.run([vermin, "-q", "--no-tips", "--violations", "-t=3.9-", str(newer)], capture_output=True)
    assert result.returncode != 0


def _runtime_unions(tree: ast.AST) -> list[int]:
    """Lines with ``X | None`` or ``int | str`` evaluated at run time (3.10+), which vermin cannot see."""
    annotations = set()
    for node in ast.walk(tree):
        for annotation in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if annotation is not None:
                annotations |= {id(child) for child in ast.walk(annotation)}
    types = {"int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set", "type"}

    def is_type(node):
        return (isinstance(node, ast.Constant) and node.value is None) or (
            isinstance(node, ast.Name) and node.id in types
        )

    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.BitOr)
        and id(node) not in annotations
        and (is_type(node.left) or is_type(node.right))
    ]


def test_no_runtime_type_unions():
    assert _runtime_unions(ast.parse("def f(x: int | None) -> str | None: ...")) == []
    assert _runtime_unions(ast.parse("isinstance(x, int | float)")) == [1]
    for path in [*_slicer_files(), *_engine_files()]:
        assert _runtime_unions(ast.parse(path.read_text())) == [], path


# --- the repository: under the Extensions Index's size check -------------------------------------------------------


def test_repository_with_its_history_stays_under_the_index_size_limit():
    """The Extensions Index refuses repositories over 100 MB, history included. Every committed checkpoint stays in
    the history for good; this fails at 90 MiB, before the Index does.

    What counts is what a clone of HEAD carries: every object reachable from it, each once. `git count-objects`
    would add up the object store as it lies on disk, where a CI checkout can hold the same objects both loose and
    packed (144 MiB counted for 71 MiB of history)."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run([git, "rev-list", "--objects", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if listed.returncode != 0:
        pytest.skip(listed.stderr.strip())
    names = "".join(line.split(" ", 1)[0] + "\n" for line in listed.stdout.splitlines())
    sized = subprocess.run(
        [git, "cat-file", "--batch-check=%(objectsize:disk)"], input=names, capture_output=True, text=True, cwd=REPO
    )
    assert sized.returncode == 0, sized.stderr
    # A partial clone lists what it lacks as "<name> missing": only what is here counts.
    mib = sum(int(size) for size in sized.stdout.split() if size.isdigit()) / 2**20
    assert mib > 1, "the history's objects were not all found"
    assert mib < 90, f"the repository's history holds {mib:.0f} MiB of git objects; keep checkpoints out of git"
