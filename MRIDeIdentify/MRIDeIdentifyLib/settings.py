"""Every user-facing setting of one de-identification, and its default, written once.

``Settings`` is what the command line (``run``, ``batch``, ``demo``), the Slicer panel and scripts fill in;
``onescan.run_one`` and ``pipeline.deidentify`` read it. This module imports neither torch nor SimpleITK, so
a front end can build settings (and show the defaults) before the heavy engine is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

# The learned remodeling; methods/__init__.py falls back to None (and the caller says so) while it is unavailable.
DEFAULT_METHOD = "remodel"
# Millimetres the brain mask is dilated by; that region is copied from the input bit for bit.
DEFAULT_MARGIN_MM = 3.0
DEFAULT_SEED = 0
DEFAULT_DEVICE = "auto"
# Measured at 128^3 on four shared heads x 3 seeds (benchmarks/bench_privacy.py --rotations): the hull does not
# depend on the rotation count (it holds >= 99.94 % of every head and ~1.3x its volume from K = 1 on: the
# extreme points are first hits under any rotation), while Z's mean error against K = 64 falls as ~1/sqrt(K):
# 0.69, 0.50, 0.34, 0.25, 0.19 for K = 1, 2, 4, 8, 16. A rotation costs ~0.04 s of one core at 128^3
# (K = 8: 0.32 s for Z, 0.7 s for the whole transform), so K = 8 makes Z a usable probability map well
# inside the stage's 2-3 s budget; 16 would double the cost for a quarter less error.
DEFAULT_ROTATIONS = 8
# Hull facets carving the head shape c(x) in the privacy transform (paper 3.1: about 100).
DEFAULT_FACETS = 100


@dataclass(frozen=True)
class Settings:
    """One de-identification's settings (the same for every scan of a batch).

    ``method``: a registered method name, None = the default method. ``margin_mm``: brain-mask dilation in
    millimetres. ``seed``: every random draw follows it. ``device``: auto|cpu|cuda|mps. ``brain_mask``: a
    user brain mask file (non-zero = brain) instead of the built-in extractor. ``model``: generator weights
    (.safetensors) for ``remodel``. ``rotations``/``facets``: the privacy transform's random rotations and
    hull facets (``remodel``). ``series``: the DICOM SeriesInstanceUID to read from a folder holding several.
    ``shift_dates``: DICOM output keeps dates shifted by one random offset per run instead of removing them.
    """

    method: Optional[str] = None
    margin_mm: float = DEFAULT_MARGIN_MM
    seed: int = DEFAULT_SEED
    device: str = DEFAULT_DEVICE
    brain_mask: Optional[Path] = None
    model: Optional[Path] = None
    rotations: int = DEFAULT_ROTATIONS
    facets: int = DEFAULT_FACETS
    series: Optional[str] = None
    shift_dates: bool = False

    @classmethod
    def from_namespace(cls, namespace: Any) -> "Settings":
        """Settings from an argparse namespace (or any object): attributes it lacks or leaves None keep the default."""
        given = {
            f.name: getattr(namespace, f.name)
            for f in dataclasses.fields(cls)
            if getattr(namespace, f.name, None) is not None
        }
        return cls(**given)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (the settings themselves are frozen)."""
        return dataclasses.replace(self, **changes)

    def method_options(self) -> Dict[str, Any]:
        """The method-specific settings, as ``MethodContext.options`` carries them."""
        options: Dict[str, Any] = {"rotations": int(self.rotations), "facets": int(self.facets)}
        if self.model is not None:
            options["model"] = str(self.model)
        return options
