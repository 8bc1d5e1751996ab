"""Atomic writing of de-identified images, with header hygiene.

Every output is first written into a hidden temporary folder beside its destination and moved into place
only when complete, so a failure leaves nothing half-written and never touches the input. Images are written
from metadata-free SimpleITK images: no header field of the input (NIfTI descrip/aux_file/intent_name,
extensions, NRRD key/values, MGH tags) is carried over, only the geometry and the de-identification marker.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .reader import format_of, ras_affine


class OutputSet:
    """Files bound for one or more folders, staged in hidden temporary folders beside their destinations.

    Use as a context manager: on success every staged entry replaces its namesake in its destination folder,
    each by one atomic rename, in the reverse order of the :meth:`path` calls: the first path asked for (the
    main output) appears last, so whoever sees it (a resumed batch, another shard) sees the whole set. On an
    exception every staging folder is removed and no destination is touched.
    """

    def __init__(self) -> None:
        self._staging: Dict[Path, Path] = {}
        self._entries: List[Path] = []

    def path(self, destination: Path) -> Path:
        """Where to write the file (or folder) that must end up at ``destination``."""
        folder = destination.parent.resolve()
        if folder not in self._staging:
            folder.mkdir(parents=True, exist_ok=True)
            with _signals_deferred():  # a staging folder made is a staging folder recorded, so it is removed
                self._staging[folder] = Path(tempfile.mkdtemp(prefix=".mrideidentify-", dir=folder))
        self._entries.append(folder / destination.name)
        return self._staging[folder] / destination.name

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, error, trace) -> None:
        with _signals_deferred():
            self._finish(kind is None)

    def _finish(self, commit: bool) -> None:
        try:
            if commit:
                # Files a writer adds beside the one asked for (the .raw of an .mhd) go before it.
                extra = [
                    folder / entry.name
                    for folder, staging in self._staging.items()
                    for entry in sorted(staging.iterdir())
                    if folder / entry.name not in self._entries
                ]
                for target in extra + self._entries[::-1]:
                    entry = self._staging[target.parent] / target.name
                    if not os.path.lexists(entry):
                        continue  # asked for twice, or not written after all
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    os.replace(entry, target)
        finally:
            for staging in self._staging.values():
                shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then let them act as usual, so that committing or
    removing the staged files is never cut short: the outputs appear whole or not at all. Python runs signal
    handlers in the main thread only, so elsewhere (Slicer's worker thread) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.getsignal(number) for number in held]
    if None in previous:  # a handler installed outside Python: leave it alone
        yield
        return
    for number in held:
        signal.signal(number, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for number, handler in zip(held, previous):
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def check_output_path(output: Path, input_path: Path) -> None:
    """Refuse outputs that would overwrite the input or cannot be written, before any work is done."""
    if output.exists() and input_path.exists() and output.resolve() == input_path.resolve():
        raise InputError(f"{output}: the output path is the input path; the input is never overwritten")
    if input_path.is_dir() and input_path.resolve() in output.resolve().parents:
        raise InputError(f"{output}: the output may not be inside the input DICOM folder")
    parent = output.parent if output.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{probe}: is a file, not a folder, so {parent} cannot be created for the output")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: the output folder is not writable")
    if output.is_dir() and format_of(input_path) != "dicom":
        raise InputError(f"{output}: is a folder; give an output file name such as scan_deid.nii.gz")


def write_image(image: sitk.Image, target: Path, marker: str) -> None:
    """Write ``image`` to ``target`` (usually an :class:`OutputSet` path) in the format its extension names."""
    path = target
    kind = format_of(path) if not path.is_dir() else "dicom"
    clean = sitk.Image(image)
    for key in clean.GetMetaDataKeys():
        clean.EraseMetaData(key)
    if kind == "mgh":
        _write_mgh(clean, target)
        return
    if kind == "nifti":
        # ITK writes ITK_FileNotes into NIfTI's descrip; aux_file and intent_name stay empty.
        clean.SetMetaData("ITK_FileNotes", marker)
    elif kind in ("nrrd", "metaimage"):
        clean.SetMetaData("DeidentificationMethod", marker)
    else:
        raise InputError(f"{path.name}: write a DICOM series to a folder path, not a file")
    sitk.WriteImage(clean, str(target), useCompression=path.name.lower().endswith((".gz", ".nrrd", ".mha")))


def _write_mgh(image: sitk.Image, target: Path) -> None:
    import nibabel as nib

    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    allowed = (np.uint8, np.int16, np.int32, np.float32)
    if data.dtype.type not in allowed:
        raise InputError(f"{target.name}: MGH cannot store {data.dtype} voxels; write NIfTI instead")
    nib.save(nib.MGHImage(np.ascontiguousarray(data), ras_affine(image)), str(target))
