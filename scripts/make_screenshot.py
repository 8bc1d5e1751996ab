"""Before/after renderings of a real head through the Slicer module, headless, the panel screenshot and the icon.

    .venv/bin/python scripts/make_screenshot.py [--head PATH] [--method NAME] [--out DIR]
    .venv/bin/python scripts/make_screenshot.py --docs      # docs/screenshot-before-after.png (average head)
    .venv/bin/python scripts/make_screenshot.py --panel     # docs/panel.png (panel + both 3-D views, average head)
    .venv/bin/python scripts/make_screenshot.py --icon      # MRIDeIdentify/Resources/Icons/MRIDeIdentify.png

The head is loaded into a real MRML scene (slicer-core) and de-identified the way the panel does it (the module's
Logic runs the engine in a child process, the output node is filled from its files), shown with ``showBeforeAfter``
(dual 3-D layout, volume rendering fitted to the scan, cameras on the face) and both 3-D views are rendered
offscreen through Slicer's displayable managers: ``before.png`` (left view), ``after.png`` (right view) and
``before_after.png`` side by side. ``--panel`` puts those two views beside the module's panel as Qt lays it out
from the .ui (PySide6; Slicer's own widgets are STAND-INS there, see slicer_scene.load_panel), filled with that
run's state. The committed pictures use an average head (a template, nobody's face).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MRIDeIdentify" / "Testing" / "Python"))

from conftest import HEADS_DIR  # noqa: E402
from slicer_scene import HeadlessSlicer, import_module_file, load_panel  # noqa: E402

DEFAULT_HEAD = HEADS_DIR / "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz"
# MNI152 with an extended field of view: an average of 152 people, whole face and chin.
AVERAGE_HEAD = HEADS_DIR / "T02_MNI152_T1_2mmEXT.nii.gz"
ICON = REPO / "MRIDeIdentify" / "Resources" / "Icons" / "MRIDeIdentify.png"
SCREENSHOT = REPO / "docs" / "screenshot-before-after.png"
PANEL = REPO / "docs" / "panel.png"


def run_like_the_panel(logic, node, method: str, device: str):
    """``Logic.startProcess`` / ``finishProcess`` with the panel's 100 ms reads of the child's progress."""
    run = logic.startProcess(node, None, method, device=device)
    while not run.finished():
        time.sleep(0.1)
        for event in run.poll():
            if event["event"] == "progress" and event["fraction"] == 0:
                print(f"  {event['stage']}...", flush=True)
    return logic.finishProcess(run)


def render_before_after(
    head: Path, out_dir: Path, method: str | None = None, size: int = 480, device: str = "cpu"
) -> Tuple[Dict[str, Path], Dict[str, str]]:
    """De-identify ``head`` the panel's way and render both 3-D views; returns the PNG paths by name and what the
    panel would show after that run (node names, status line)."""
    from PIL import Image, ImageDraw

    module = import_module_file()
    slicer_scene = HeadlessSlicer()
    try:
        logic = module.MRIDeIdentifyLogic()
        logic.volumeRenderingLogic = slicer_scene.volume_rendering_logic
        if method is None:
            method = next(name for name, _ in logic.availableMethods())
        node = slicer_scene.load_volume(head)
        outcome = run_like_the_panel(logic, node, method, device)
        status = f"Done in {outcome.seconds:.1f} s on {outcome.device} ({outcome.method})."
        print(f"{head.name}: {status}")
        state = {
            "input": node.GetName(),
            "output": outcome.outputVolumeNode.GetName(),
            "status": status,
            "method": outcome.method,
        }
        left, right = logic.showBeforeAfter(node, outcome.outputVolumeNode)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"before": out_dir / "before.png", "after": out_dir / "after.png"}
        before = slicer_scene.render_view(left, paths["before"], size)
        after = slicer_scene.render_view(right, paths["after"], size)
    finally:
        slicer_scene.close()

    label = max(20, size // 16)
    sheet = Image.new("RGB", (2 * size + 4, size + label), (20, 20, 20))
    sheet.paste(Image.fromarray(before), (0, label))
    sheet.paste(Image.fromarray(after), (size + 4, label))
    draw = ImageDraw.Draw(sheet)
    for column, text in enumerate(("before", f"after ({outcome.method})")):
        draw.text((column * (size + 4) + size // 2, label // 2), text, fill=(255, 255, 255), anchor="mm")
    paths["before_after"] = out_dir / "before_after.png"
    sheet.save(paths["before_after"])
    return paths, state


def draw_icon(path: Path = ICON, size: int = 128) -> Path:
    """The module icon, drawn: a head in profile whose brain is kept and whose face is remodeled (a mosaic)."""
    from PIL import Image, ImageDraw, ImageFilter

    scale = 4  # draw large, then downsample: smooth edges
    s = size * scale
    icon = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)

    def pts(points):
        return [(x * s, y * s) for x, y in points]

    # Profile facing right: cranium, forehead, nose, lips, chin, jaw, neck.
    head = pts(
        [
            (0.18, 0.50),
            (0.16, 0.36),
            (0.22, 0.22),
            (0.34, 0.12),
            (0.50, 0.08),
            (0.64, 0.11),
            (0.75, 0.19),
            (0.80, 0.30),
            (0.81, 0.40),
            (0.88, 0.50),
            (0.83, 0.53),
            (0.84, 0.60),
            (0.81, 0.63),
            (0.83, 0.68),
            (0.80, 0.75),
            (0.70, 0.80),
            (0.60, 0.80),
            (0.58, 0.95),
            (0.30, 0.95),
            (0.30, 0.80),
            (0.22, 0.68),
        ]
    )
    draw.polygon(head, fill=(224, 190, 160, 255), outline=(90, 60, 40, 255), width=3 * scale)

    # The remodeled region: everything in front of the brain, drawn as a seeded mosaic of skin tones.
    mosaic = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    mosaic_draw = ImageDraw.Draw(mosaic)
    rng = np.random.default_rng(7)
    cell = s // 16
    for y in range(0, s, cell):
        for x in range(0, s, cell):
            tone = int(rng.integers(150, 235))
            mosaic_draw.rectangle(
                [x, y, x + cell - 1, y + cell - 1], fill=(tone, int(tone * 0.78), int(tone * 0.62), 255)
            )
    face_region = Image.new("L", (s, s), 0)
    ImageDraw.Draw(face_region).polygon(head, fill=255)
    ImageDraw.Draw(face_region).rectangle([0, 0, int(0.62 * s), s], fill=0)
    icon.paste(mosaic, (0, 0), face_region)

    # The brain, copied exactly: a solid shape with a few sulci.
    brain_box = [0.24 * s, 0.15 * s, 0.70 * s, 0.52 * s]
    draw.ellipse(brain_box, fill=(236, 140, 150, 255), outline=(140, 50, 70, 255), width=3 * scale)
    # Sulci as wavy lines: the central sulcus (top to middle) and the lateral fissure (front, slanting back).
    t = np.linspace(0.0, 1.0, 40)
    central = [(0.47 + 0.03 * np.sin(6 * np.pi * u) - 0.05 * u, 0.17 + 0.22 * u) for u in t]
    lateral = [(0.62 - 0.30 * u, 0.40 + 0.03 * np.sin(5 * np.pi * u) - 0.04 * u) for u in t]
    for curve in (central, lateral):
        draw.line(pts(curve), fill=(140, 50, 70, 255), width=2 * scale, joint="curve")
    # The boundary that is never crossed: the brain margin.
    draw.ellipse(
        [brain_box[0] - 3 * scale, brain_box[1] - 3 * scale, brain_box[2] + 3 * scale, brain_box[3] + 3 * scale],
        outline=(40, 110, 200, 255),
        width=2 * scale,
    )
    icon = icon.filter(ImageFilter.SMOOTH).resize((size, size), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    icon.save(path)
    return path


def draw_panel(
    path: Path = PANEL, head: Path = AVERAGE_HEAD, out_dir: Path = REPO / "out" / "slicer-panel", view_size: int = 480
) -> Path:
    """The module as a user sees it after a run: the panel (the .ui laid out by Qt, its lists filled as the Widget's
    setup() fills them, the selectors and the status line as they are after the run, every section expanded) beside
    the dual 3-D layout rendered through Slicer's displayable managers."""
    from PIL import Image
    from PySide6.QtWidgets import QComboBox, QLabel, QPushButton, QWidget

    module = import_module_file()
    views, state = render_before_after(head, out_dir, size=view_size)
    app, panel = load_panel()
    methods = panel.findChild(QComboBox, "methodComboBox")
    available = module.MRIDeIdentifyLogic.availableMethods()
    for name, _ in available:
        methods.addItem(name, name)
    methods.setCurrentIndex(methods.findData(state["method"]))
    panel.findChild(QLabel, "methodDescriptionLabel").setText(dict(available)[state["method"]])
    devices = panel.findChild(QComboBox, "deviceComboBox")
    for value, label in module.MRIDeIdentifyLogic.availableDevices():
        devices.addItem(label, value)
    devices.setCurrentIndex(devices.findData("cpu"))
    for selector, name in (("inputVolumeSelector", state["input"]), ("outputVolumeSelector", state["output"])):
        combobox = panel.findChild(QComboBox, selector)
        combobox.clear()
        combobox.addItem(name)
    panel.findChild(QWidget, "advancedCollapsibleButton").setProperty("collapsed", False)
    panel.findChild(QWidget, "progressBar").hide()
    for button in ("applyButton", "showBeforeAfterButton", "saveQARendersButton"):
        panel.findChild(QPushButton, button).setEnabled(True)
    panel.findChild(QLabel, "statusLabel").setText(state["status"])
    panel.resize(400, 660)
    panel.show()
    app.processEvents()
    panel_png = out_dir / "panel_only.png"
    panel.grab().save(str(panel_png))

    with (
        Image.open(panel_png) as panel_image,
        Image.open(views["before"]) as before,
        Image.open(views["after"]) as after,
    ):
        height = max(panel_image.height, view_size)
        sheet = Image.new("RGB", (panel_image.width + 2 * view_size + 4, height), (40, 40, 40))
        sheet.paste(panel_image.convert("RGB"), (0, 0))
        top = (height - view_size) // 2
        sheet.paste(before.convert("RGB"), (panel_image.width, top))
        sheet.paste(after.convert("RGB"), (panel_image.width + view_size + 4, top))
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD, help="head volume (NIfTI/NRRD)")
    parser.add_argument("--method", default=None, help="engine method (default: the registry's default)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "slicer-before-after", help="output folder")
    parser.add_argument("--size", type=int, default=480, help="pixels per view")
    parser.add_argument("--docs", action="store_true", help="write docs/screenshot-before-after.png (average head)")
    parser.add_argument("--icon", action="store_true", help="draw the module icon")
    parser.add_argument(
        "--panel",
        action="store_true",
        help="docs/panel.png: the panel (the .ui in PySide6) beside both 3-D views (average head)",
    )
    args = parser.parse_args(argv)
    if args.panel:
        print(draw_panel())
        return 0
    if args.icon:
        print(draw_icon())
        return 0
    if args.docs:
        paths, _ = render_before_after(AVERAGE_HEAD, args.out, args.method, args.size)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(paths["before_after"].read_bytes())
        print(SCREENSHOT)
        return 0
    if not args.head.is_file():
        parser.error(f"{args.head} not found (the shared heads live in ../shared/data/heads)")
    for path in render_before_after(args.head, args.out, args.method, args.size)[0].values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
