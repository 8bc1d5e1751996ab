"""Before/after renderings of a real head through the Slicer module, headless, and the module icon.

    .venv/bin/python scripts/make_screenshot.py [--head PATH] [--method NAME] [--out DIR]
    .venv/bin/python scripts/make_screenshot.py --docs      # docs/screenshot-before-after.png (average head)
    .venv/bin/python scripts/make_screenshot.py --icon      # MRIDeIdentify/Resources/Icons/MRIDeIdentify.png
    .venv/bin/python scripts/make_screenshot.py --panel     # docs/panel.png (the .ui in Qt, PySide6)

The head is loaded into a real MRML scene (slicer-core), de-identified by the module's Logic, shown with
``showBeforeAfter`` (dual 3-D layout, MR volume-rendering preset, cameras on the face) and both 3-D views are
rendered offscreen through Slicer's displayable managers: ``before.png`` (left view), ``after.png`` (right view)
and ``before_after.png`` side by side. The committed screenshot uses an average head (a template, nobody's face).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def render_before_after(head: Path, out_dir: Path, method: str | None = None, size: int = 480,
                        device: str = "cpu") -> dict[str, Path]:
    """De-identify ``head`` with the module Logic and render both 3-D views; returns the PNG paths by name."""
    from PIL import Image, ImageDraw

    module = import_module_file()
    slicer_scene = HeadlessSlicer()
    try:
        logic = module.MRIDeIdentifyLogic()
        logic.volumeRenderingLogic = slicer_scene.volume_rendering_logic
        if method is None:
            method = next(name for name, _ in logic.availableMethods())
        node = slicer_scene.load_volume(head)
        start = time.perf_counter()
        outcome = logic.process(node, None, method, device=device,
                                progress=lambda stage, fraction: fraction == 0 and print(f"  {stage}...", flush=True))
        print(f"{head.name}: {outcome.method} on {outcome.device} in {time.perf_counter() - start:.1f} s")
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
    return paths


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
    head = pts([(0.18, 0.50), (0.16, 0.36), (0.22, 0.22), (0.34, 0.12), (0.50, 0.08), (0.64, 0.11), (0.75, 0.19),
                (0.80, 0.30), (0.81, 0.40), (0.88, 0.50), (0.83, 0.53), (0.84, 0.60), (0.81, 0.63), (0.83, 0.68),
                (0.80, 0.75), (0.70, 0.80), (0.60, 0.80), (0.58, 0.95), (0.30, 0.95), (0.30, 0.80), (0.22, 0.68)])
    draw.polygon(head, fill=(224, 190, 160, 255), outline=(90, 60, 40, 255), width=3 * scale)

    # The remodeled region: everything in front of the brain, drawn as a seeded mosaic of skin tones.
    mosaic = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    mosaic_draw = ImageDraw.Draw(mosaic)
    rng = np.random.default_rng(7)
    cell = s // 16
    for y in range(0, s, cell):
        for x in range(0, s, cell):
            tone = int(rng.integers(150, 235))
            mosaic_draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(tone, int(tone * 0.78), int(tone * 0.62), 255))
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
    draw.ellipse([brain_box[0] - 3 * scale, brain_box[1] - 3 * scale, brain_box[2] + 3 * scale,
                  brain_box[3] + 3 * scale], outline=(40, 110, 200, 255), width=2 * scale)
    icon = icon.filter(ImageFilter.SMOOTH).resize((size, size), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    icon.save(path)
    return path


def draw_panel(path: Path = PANEL) -> Path:
    """The panel as Qt lays it out from the .ui, the lists filled as the Widget's setup() fills them, every section
    expanded. Slicer's own widgets are stand-ins there (node selectors show their 'none' entry or node type)."""
    from PySide6.QtWidgets import QComboBox, QWidget

    module = import_module_file()
    app, panel = load_panel()
    methods = panel.findChild(QComboBox, "methodComboBox")
    for name, _ in module.MRIDeIdentifyLogic.availableMethods():
        methods.addItem(name, name)
    panel.findChild(QWidget, "methodDescriptionLabel").setText(module.MRIDeIdentifyLogic.availableMethods()[0][1])
    devices = panel.findChild(QComboBox, "deviceComboBox")
    for value, label in module.DEVICES:
        devices.addItem(label, value)
    panel.findChild(QWidget, "advancedCollapsibleButton").setProperty("collapsed", False)
    panel.findChild(QWidget, "progressBar").hide()
    panel.resize(400, 660)
    panel.show()
    app.processEvents()
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.grab().save(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD, help="head volume (NIfTI/NRRD)")
    parser.add_argument("--method", default=None, help="engine method (default: the registry's default)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "slicer-before-after", help="output folder")
    parser.add_argument("--size", type=int, default=480, help="pixels per view")
    parser.add_argument("--docs", action="store_true", help="write docs/screenshot-before-after.png (average head)")
    parser.add_argument("--icon", action="store_true", help="draw the module icon")
    parser.add_argument("--panel", action="store_true", help="draw the panel from the .ui (needs PySide6)")
    args = parser.parse_args(argv)
    if args.panel:
        print(draw_panel())
        return 0
    if args.icon:
        print(draw_icon())
        return 0
    if args.docs:
        paths = render_before_after(AVERAGE_HEAD, args.out, args.method, args.size)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(paths["before_after"].read_bytes())
        print(SCREENSHOT)
        return 0
    if not args.head.is_file():
        parser.error(f"{args.head} not found (the shared heads live in ../shared/data/heads)")
    for path in render_before_after(args.head, args.out, args.method, args.size).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
