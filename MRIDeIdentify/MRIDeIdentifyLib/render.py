"""Offscreen face renderings of the skin surface: QA pictures and the privacy evaluation's attacker views.

The skin surface is extracted once per scan (:func:`skin_surface`, physical LPS millimetres) and can be
rendered from any view (:func:`render_surface`). The camera is placed in front of the face from the
scan's direction cosines, so RAS, LIA, PIR, ... and oblique scans all render face-on.

VTK renders without a display through EGL (``vtkEGLRenderWindow``, Mesa's software GL is enough); set
``VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow`` to use OSMesa instead. No environment variable is set here:
this module also runs inside 3D Slicer's process, whose rendering must stay as the application set it up.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from .headmask import head_mask, head_threshold

# Depth of the slab in front of the most anterior skin point whose points set the face's centre (mm):
# deep enough to hold forehead, nose, mouth and chin, shallow enough to leave out ears and neck.
_FACE_SLAB_MM = 40.0
# Height of the rendered field at the face (mm): chin to hairline with a margin.
_FIELD_MM = 240.0
_VIEW_ANGLE_DEG = 30.0
_GREY = (0.85, 0.85, 0.85)

skin_threshold = head_threshold
"""The skin level of a scan (input intensity units). Compute it on the ORIGINAL and pass the same value
when rendering the original and its de-identified version, so that both show the same iso-surface."""


@dataclass(frozen=True)
class FaceView:
    """Where the camera looks: all vectors in physical LPS millimetres.

    ``centre`` is the middle of the face (the point the camera looks at), ``anterior`` the direction the
    face points to, ``superior`` the head's up direction (orthogonal to ``anterior``), ``field_mm`` the
    height of the rendered field at ``centre``.
    """

    centre: np.ndarray
    anterior: np.ndarray
    superior: np.ndarray
    field_mm: float = _FIELD_MM


@dataclass(frozen=True)
class Shot:
    """How a picture is taken from a :class:`FaceView`: ``yaw_deg`` turns the camera towards the subject's left
    (positive) about the head's superior axis, ``pitch_deg`` raises it (positive: looking down on the face), both in
    degrees; ``light`` is the key light's (azimuth, elevation) in degrees relative to the camera; ``size`` is the
    picture's edge in pixels."""

    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    light: tuple[float, float] = (0.0, 0.0)
    size: int = 512


FRONTAL = Shot()
"""Face-on, the key light at the camera, 512 pixels."""


def face_direction(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Anterior and superior unit vectors (physical LPS) of the voxel axes nearest to A and S.

    Oblique acquisitions are planned on the head's anatomy, so the scan's own axes are better aligned
    with the face than the scanner's; the sign is chosen so that each vector points anterior / superior.
    """
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)  # columns: voxel axes i, j, k in LPS
    anterior_lps = np.array([0.0, -1.0, 0.0])
    superior_lps = np.array([0.0, 0.0, 1.0])
    a_axis = int(np.argmax(np.abs(anterior_lps @ direction)))
    anterior = direction[:, a_axis] * np.sign(anterior_lps @ direction[:, a_axis])
    rest = [axis for axis in range(3) if axis != a_axis]
    s_axis = rest[int(np.argmax(np.abs(superior_lps @ direction[:, rest])))]
    superior = direction[:, s_axis] * np.sign(superior_lps @ direction[:, s_axis])
    superior = superior - (superior @ anterior) * anterior
    return anterior / np.linalg.norm(anterior), superior / np.linalg.norm(superior)


def skin_surface(image: sitk.Image, threshold: float) -> vtk.vtkPolyData:
    """Skin iso-surface at ``threshold`` (input intensity units) as a triangle mesh in physical LPS mm.

    Voxels above the threshold, the largest component, cavities filled (``headmask.head_mask``); the
    surface follows the intensities at the boundary (sub-voxel), is closed where the head leaves the
    field of view, and its normals point outwards. The image is not modified.
    """
    voxels = sitk.GetArrayViewFromImage(image).astype(np.float32)
    mask = head_mask(image, threshold, array=voxels)
    if not mask.any():
        raise ValueError(f"no voxel above the skin threshold {threshold:g}")
    # Force the mask's inside above and its outside below the level so that the surface is the mask's
    # boundary (no inner surfaces round filled sinuses, no noise specks) at intensity-interpolated positions.
    step = max(abs(threshold) * 1e-3, 1e-6)
    field = np.where(mask, np.maximum(voxels, threshold + step), np.minimum(voxels, threshold - step))
    del voxels, mask
    # One voxel of air all round closes the surface where the head touches the field of view's edge.
    field = np.pad(field, 1, constant_values=threshold - step)

    grid = vtk.vtkImageData()
    grid.SetDimensions(field.shape[2], field.shape[1], field.shape[0])
    grid.GetPointData().SetScalars(numpy_to_vtk(field.ravel(), deep=True))
    del field
    contour = vtk.vtkFlyingEdges3D()
    contour.SetInputData(grid)
    contour.SetValue(0, threshold)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.Update()
    surface = contour.GetOutput()

    # Index (i, j, k, shifted by the padding) to physical LPS: origin + direction @ (spacing * index).
    points = vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64) - 1.0
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    physical = (points * np.asarray(image.GetSpacing())) @ direction.T + np.asarray(image.GetOrigin())
    surface.GetPoints().SetData(numpy_to_vtk(physical, deep=True))

    # Thick-slice scans (4.8 mm, 5.5 mm) give terraces; a light low-pass keeps the shape and removes them.
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputData(surface)
    smooth.SetNumberOfIterations(12)
    smooth.SetPassBand(0.1)
    smooth.NonManifoldSmoothingOn()
    smooth.NormalizeCoordinatesOn()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOff()
    normals.Update()
    surface = normals.GetOutput()
    points = vtk_to_numpy(surface.GetPoints().GetData())
    point_normals = vtk_to_numpy(surface.GetPointData().GetNormals())
    if np.mean(np.sum((points - points.mean(axis=0)) * point_normals, axis=1)) < 0:
        # A left-handed voxel grid (negative determinant) turns the triangles inside out: OpenGL would
        # then light the back faces and draw the head dark.
        reverse = vtk.vtkReverseSense()
        reverse.SetInputData(surface)
        reverse.ReverseCellsOn()
        reverse.ReverseNormalsOn()
        reverse.Update()
        surface = reverse.GetOutput()
    return surface


def face_view(surface: vtk.vtkPolyData, image: sitk.Image) -> FaceView:
    """The camera frame for a head: looking at the middle of the skin in front of the face.

    The centre is the median (lateral and vertical) of the skin points within 40 mm of the most anterior
    one, so a view of the face stays centred whether the field of view ends at the nose or the neck.
    """
    anterior, superior = face_direction(image)
    points = vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    depth = points @ anterior
    front = points[depth > depth.max() - _FACE_SLAB_MM]
    centre = np.median(front, axis=0)
    # The camera aims at a plane 60 mm behind the face's front: roughly the eyes' depth.
    centre = centre + (depth.max() - 60.0 - centre @ anterior) * anterior
    return FaceView(centre=centre, anterior=anterior, superior=superior)


def render_surface(surface: vtk.vtkPolyData, view: FaceView, shot: Shot = FRONTAL) -> np.ndarray:
    """Grey-shaded rendering of ``surface`` (physical LPS mm) seen from in front of the face, turned and lit as
    ``shot`` says; uint8 RGB array (shot.size, shot.size, 3). Row 0 of the array is the top of the picture."""
    size = shot.size
    toward = _rotate(view.anterior, view.superior, np.radians(shot.yaw_deg))
    up = view.superior
    pitch_axis = np.cross(toward, up)
    toward = _rotate(toward, pitch_axis, np.radians(shot.pitch_deg))
    up = _rotate(up, pitch_axis, np.radians(shot.pitch_deg))
    distance = 0.5 * view.field_mm / np.tan(np.radians(_VIEW_ANGLE_DEG / 2))

    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(surface)
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    prop = actor.GetProperty()
    prop.SetColor(*_GREY)
    prop.SetAmbient(0.12)
    prop.SetDiffuse(0.85)
    prop.SetSpecular(0.08)
    prop.SetSpecularPower(20)

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.0, 0.0, 0.0)
    renderer.AddActor(actor)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*view.centre)
    camera.SetPosition(*(view.centre + distance * toward))
    camera.SetViewUp(*up)
    camera.SetViewAngle(_VIEW_ANGLE_DEG)
    renderer.ResetCameraClippingRange()
    key = vtk.vtkLight()
    key.SetLightTypeToCameraLight()
    azimuth, elevation = np.radians(shot.light[0]), np.radians(shot.light[1])
    # Camera-light coordinates: the camera sits at (0, 0, 1) looking at the origin, y up.
    key.SetPosition(np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation))
    key.SetFocalPoint(0.0, 0.0, 0.0)
    renderer.AddLight(key)

    window = _offscreen_window()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.AddRenderer(renderer)
    try:
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        picture = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
        picture = picture.reshape(size, size, -1)[::-1, :, :3].copy()
    finally:
        window.Finalize()
    return picture.astype(np.uint8, copy=False)


def render_face(image: sitk.Image, threshold: float, shot: Shot = FRONTAL, view: FaceView | None = None) -> np.ndarray:
    """Render the skin of ``image`` at ``threshold`` (input intensity units) as ``shot`` says; uint8 RGB
    (shot.size, shot.size, 3).

    ``view`` fixes the camera (e.g. the original's, so that a de-identified head is seen from exactly
    the same place); by default it is computed from this image.
    """
    surface = skin_surface(image, threshold)
    if view is None:
        view = face_view(surface, image)
    return render_surface(surface, view, shot)


def write_qa(
    before: sitk.Image,
    after: sitk.Image,
    out_dir: Path,
    *,
    threshold: float | None = None,
    size: int = 512,
) -> list[Path]:
    """Write before/after face renderings (frontal and 45 degrees) and one labelled side-by-side PNG.

    Both heads are rendered at the same skin level (``threshold``, default :func:`skin_threshold` of
    ``before``) from the same camera (placed on ``before``'s face). Returns the paths written, the
    side-by-side summary (``qa_before_after.png``) last.
    """
    from PIL import Image, ImageDraw

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threshold is None:
        threshold = skin_threshold(before)
    surfaces = {"before": skin_surface(before, threshold), "after": skin_surface(after, threshold)}
    view = face_view(surfaces["before"], before)
    angles = {"frontal": 0.0, "45deg": 45.0}
    paths: list[Path] = []
    tiles: dict[tuple[str, str], np.ndarray] = {}
    for name, surface in surfaces.items():
        for angle_name, yaw in angles.items():
            picture = render_surface(surface, view, Shot(yaw_deg=yaw, light=(20.0, 20.0), size=size))
            tiles[name, angle_name] = picture
            path = out_dir / f"qa_{name}_{angle_name}.png"
            Image.fromarray(picture).save(path)
            paths.append(path)

    label_px = max(24, size // 16)
    sheet = Image.new("RGB", (2 * size, 2 * size + label_px), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for column, name in enumerate(surfaces):
        for row, angle_name in enumerate(angles):
            sheet.paste(Image.fromarray(tiles[name, angle_name]), (column * size, label_px + row * size))
        draw.text(
            (column * size + size // 2, label_px // 2),
            name.upper(),
            fill=(255, 255, 255),
            anchor="mm",
            font=label_font(label_px * 2 // 3),
        )
    draw.line([(size, label_px), (size, 2 * size + label_px)], fill=(255, 200, 0), width=2)
    summary = out_dir / "qa_before_after.png"
    sheet.save(summary)
    paths.append(summary)
    return paths


def _offscreen_window() -> vtk.vtkRenderWindow:
    """A render window for offscreen pictures. On Linux without a display the default (X11) window would abort the
    process, so EGL's is made directly, unless ``VTK_DEFAULT_OPENGL_WINDOW`` names another."""
    headless = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
    if headless and not os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") and hasattr(vtk, "vtkEGLRenderWindow"):
        return vtk.vtkEGLRenderWindow()
    return vtk.vtkRenderWindow()


def label_font(pixels: int):
    """A PIL font about ``pixels`` high for labels on pictures."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=pixels)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _rotate(vector: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation of ``vector`` about the unit ``axis`` by ``angle`` radians (right-handed)."""
    axis = axis / np.linalg.norm(axis)
    return (
        vector * np.cos(angle) + np.cross(axis, vector) * np.sin(angle) + axis * (axis @ vector) * (1 - np.cos(angle))
    )
