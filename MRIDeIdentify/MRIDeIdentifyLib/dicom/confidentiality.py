"""De-identifying DICOM headers: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The action
for each attribute (X remove, Z empty, D dummy, U new UID, and the X/Z, X/D, Z/D, X/Z/D, X/Z/U* choices)
comes from Table E.1-1 as shipped, generated from the standard, by the ``dicom-anonymizer`` package
(KitwareMedical, BSD-3); its own ``anonymize_dataset`` is not used because it does not recurse into sequences
(enhanced per-frame groups keep their Frame Acquisition DateTime), keeps a process-wide UID table, and cannot
shift dates. The table is applied here, recursively, with:

- a choice of X/Z/D by what the two MR IODs require (``_REQUIRED``), otherwise the strongest action;
- private attributes removed (no Retain Safe Private Option);
- a safety net for attributes the table does not list: person names emptied, dates removed, free text
  (LT/ST/UT/UC) removed;
- dates removed or replaced by 19000101, or with ``date_shift_days`` every date shifted by that many days
  and times kept (Retain Longitudinal Temporal Information with Modified Dates Option, 113107); the birth
  date is emptied either way;
- UIDs replaced through :class:`UIDMap` (same input UID -> same new UID within one run), and Patient's
  Name and ID set to a per-run pseudonym of the patient (``DEID-`` + 12 hex digits);
- (0012,0062) YES, (0012,0063) naming MRIDeIdentify, its version and the method, (0012,0064) with 113100,
  113102 (the face is remodelled or removed) and 113107 when dates are shifted.

Options left out: Retain Patient Characteristics (113108), Retain Device Identity (113109), Retain UIDs
(113110), Retain Safe Private (113111), Retain Institution Identity (113112), Clean Descriptors (113105: the
descriptors are removed instead), Clean Structured Content (113104), Clean Pixel Data (113101: MR carries no
"""

from __future__ import annotations

import datetime
import hashlib
import pkgutil
import secrets
from functools import lru_cache
from typing import Dict, Optional, Tuple

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid

_DUMMY_TEXT = "DEIDENTIFIED"
_DUMMY_DATE = "19000101"
_PERSON_NAME, _DATES, _FREE_TEXT = ("PN",), ("DA", "DT"), ("LT", "ST", "UT", "UC")


class UIDMap:
    """Maps input UIDs to new UIDs: the same input UID gives the same new UID within one run (one map).

    New UIDs are pydicom's (its root, then digits of a SHA-512 hash of a per-run random secret and the input
    UID), so a second run (another secret) gives other UIDs and nobody without the secret can link them.
    The same secret gives each patient a pseudonym (:meth:`pseudonym`), so that a PACS or Slicer's DICOM
    browser keeps one patient's series together without learning who it is.
    """

    def __init__(self, secret: Optional[str] = None) -> None:
        self._secret = secret if secret is not None else secrets.token_hex(32)

    def __call__(self, uid: str) -> str:
        uid = str(uid).strip()
        return str(generate_uid(entropy_srcs=[self._secret, uid])) if uid else uid

    def pseudonym(self, identity: str) -> str:
        """``DEID-`` and 12 hex digits, the same for the same ``identity`` within one run."""
        digest = hashlib.sha256(f"{self._secret}|patient|{identity}".encode()).hexdigest()
        return f"DEID-{digest[:12].upper()}"


# Attributes the Basic profile gives a choice for (X/Z, X/D, Z/D, X/Z/D) that the MR Image and Enhanced MR
# Image IODs require: Type 1 gets a dummy value (D), Type 2 an empty one (Z). Everything else takes the
# strongest action (X, else Z).
_REQUIRED = {
    False: {"ContentDate": "Z", "ContentTime": "Z"},
    True: {
        "ContentDate": "D",
        "ContentTime": "D",
        "AcquisitionDateTime": "D",
        "DeviceSerialNumber": "D",
        "AcquisitionContextSequence": "Z",
    },
}
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@lru_cache(maxsize=1)
def profile_table() -> Tuple[str, Dict[int, str], Tuple[Tuple[int, int, str], ...]]:
    """PS3.15 Table E.1-1 (newest edition ``dicom-anonymizer`` ships): (edition, {tag: action}, masked rows).

    Masked rows (repeating groups such as 50xx curves, 60xx overlay data) are (value, mask, action) on the
    32-bit tag.
    """
    from dicomanonymizer import dicom_anonymization_databases as databases
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    edition = max(module.name for module in pkgutil.iter_modules(databases.__path__))
    table = dicom_anonymization_database_selector(edition)
    actions: Dict[int, str] = {}
    masked = []
    for category, action in _CATEGORIES.items():
        for row in table[category]:
            if len(row) == 2:
                actions[(row[0] << 16) | row[1]] = action
            else:
                masked.append((((row[0] << 16) | row[1]), ((row[2] << 16) | row[3]), action))
    return edition, actions, tuple(masked)


def deidentify_dataset(
    ds: Dataset, uid_map: UIDMap, date_shift_days: Optional[int] = None, *, enhanced: bool = False
) -> None:
    """Clean ``ds`` in place (recursively, file meta excluded) following PS3.15's Basic profile.

    Patient's Name and ID become the run's pseudonym of the original ID and name (a dummy value, which the
    profile's Z and Z/D actions allow) instead of empty: PACS often refuse an empty Patient ID.
    """
    _, actions, masked = profile_table()
    required = {int(Tag(k)): v for k, v in _REQUIRED[enhanced].items()}
    identity = f"{ds.get('PatientID', '')}|{ds.get('PatientName', '')}"
    _clean(ds, actions, masked, required, uid_map, date_shift_days)
    ds.PatientID = ds.PatientName = uid_map.pseudonym(identity)


def _clean(
    ds: Dataset, actions: Dict[int, str], masked: Tuple, required: Dict[int, str], uid_map: UIDMap, shift: Optional[int]
) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        element = ds[tag]
        action = _action(int(tag), element.VR, actions, masked, required, shift)
        if action == "X":
            del ds[tag]
        elif action == "Z":
            element.value = DicomSequence() if element.VR == "SQ" else _empty(element.VR)
        elif action == "D":
            element.value = _dummy(element, uid_map)
        elif action == "U":
            element.value = _map_uids(element.value, uid_map)
        elif action == "shift" and shift is not None:
            element.value = _shift_dates(element.value, element.VR, shift)
        if tag in ds and ds[tag].VR == "SQ":
            for item in ds[tag].value:
                _clean(item, actions, masked, required, uid_map, shift)


def _action(
    tag: int, vr: str, actions: Dict[int, str], masked: Tuple, required: Dict[int, str], shift: Optional[int]
) -> str:
    """'X', 'Z', 'D', 'U', 'shift' or 'keep' for one attribute."""
    if tag == 0x00100030:  # Patient's Birth Date: emptied even when the other dates are kept shifted
        return "Z"
    action = actions.get(tag)
    if action is None:
        action = next((a for value, mask, a in masked if tag & mask == value), None)
    if shift is not None and vr in _DATES:
        return "shift"
    if shift is not None and vr == "TM":
        return "keep"
    if action is None:
        if vr in _PERSON_NAME:
            return "Z"
        if vr in _DATES or vr in _FREE_TEXT or vr == "TM":
            return "X"
        return "keep"
    if action == "X/Z/U*":
        return "keep"  # the sequence stays; the UIDs inside are replaced (U) as the walk goes on
    if "/" in action:
        return required.get(tag, "X" if action.startswith("X") else "Z")
    return action


def _empty(vr: str):
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT", "UV", "SV"):
        return None
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    return ""


def _dummy(element, uid_map: UIDMap):
    vr = element.VR
    if vr == "UI":
        return _map_uids(element.value, uid_map)
    if vr == "SQ":
        return element.value  # kept: its items are cleaned by the recursive walk
    return {
        "DA": _DUMMY_DATE,
        "DT": _DUMMY_DATE + "000000",
        "TM": "000000",
        "AS": "000Y",
        "DS": "0",
        "IS": "0",
        "UR": "http://deidentified.invalid",
    }.get(vr, _DUMMY_TEXT if vr in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT") else _empty(vr))


def _map_uids(value, uid_map: UIDMap):
    if isinstance(value, (list, MultiValue)):
        return [uid_map(v) for v in value]
    return uid_map(value) if value else value


def _shift_dates(value, vr: str, days: int):
    if isinstance(value, (list, MultiValue)):
        return [_shift_date(str(v), vr, days) for v in value]
    return _shift_date(str(value), vr, days) if value else value


def _shift_date(text: str, vr: str, days: int) -> str:
    """Shift a DA (YYYYMMDD) or the date part of a DT by ``days``; unparsable dates become empty."""
    text = text.strip()
    try:
        date = datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    shifted = (date + datetime.timedelta(days=days)).strftime("%Y%m%d")
    return shifted if vr == "DA" else shifted + text[8:]


def mark_deidentified(ds: Dataset, method: str, tool_version: str, date_shift_days: Optional[int]) -> None:
    """Add the de-identification attributes (0012,0062-0064), (0028,0303) and a series description.

    Image Type stays as the scanner wrote it: DERIVED would make the Enhanced MR pulse-sequence attributes
    forbidden (dciodvfy errors) and PS3.15 does not ask for it.
    """
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = f"MRIDeIdentify {tool_version} ({method}); DICOM PS3.15 Basic Profile"[:64]
    codes = [
        ("113100", "Basic Application Confidentiality Profile"),
        ("113102", "Clean Recognizable Visual Features Option"),
    ]
    if date_shift_days is not None:
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if date_shift_days is not None else "REMOVED"
    ds.SeriesDescription = f"de-identified ({method})"[:64]
