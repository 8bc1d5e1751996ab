"""DICOM in (classic single-frame series and enhanced multi-frame files) and de-identified DICOM out.

Three steps, one module each: :mod:`.reading` (a series folder -> a 3-D image in LPS geometry and the headers
writing needs), :mod:`.confidentiality` (the PS3.15 Basic Application Level Confidentiality Profile applied
to a header) and :mod:`.writing` (the de-identified series, in the input's layout, written atomically).
"""

from .confidentiality import UIDMap, deidentify_dataset, mark_deidentified, profile_table
from .reading import DicomSource, SeriesInfo, list_series, read_series
from .writing import write_series

__all__ = [
    "DicomSource",
    "SeriesInfo",
    "UIDMap",
    "deidentify_dataset",
    "list_series",
    "mark_deidentified",
    "profile_table",
    "read_series",
    "write_series",
]
