"""The one registry of de-identification methods, read by the command line and the Slicer panel alike.

A method turns a :class:`MethodContext` into a :class:`MethodOutput` on the input grid; the composite
(``composite.py``) then copies the brain back bit for bit, so no method can alter a brain voxel.
"""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, InputError
from ..settings import DEFAULT_METHOD

ProgressCallback = Callable[[str, float], None]


@dataclass
class MethodOutput:
    """What a method returns, all KJI arrays on the input grid.

    ``values``: float32, the method's head in the input's intensity units (only voxels outside the brain are used).
    ``head``: bool, where the output is tissue; elsewhere the composite writes an air background.
    ``changed``: bool, the region the method remodelled or removed (``--save-face-mask``); None = head minus brain.
    """

    values: np.ndarray
    head: np.ndarray
    changed: Optional[np.ndarray] = None


@dataclass
class Stages:
    """The stages of one run: their timings (seconds by stage name), progress reports and cancellation.

    Made before the method context, so the head and brain masks are timed and cancellable like the method's own
    stages."""

    progress: Optional[ProgressCallback] = None
    cancel: Optional[Callable[[], bool]] = None
    timings: Dict[str, float] = field(default_factory=dict)

    def check_cancel(self) -> None:
        """Raise :class:`errors.Cancelled` when ``cancel()`` says the run was cancelled."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("de-identification cancelled")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (seconds go to ``timings[name]``), report it to ``progress``, honour cancellation."""
        self.check_cancel()
        if self.progress is not None:
            self.progress(name, 0.0)
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        if self.progress is not None:
            self.progress(name, 1.0)
        self.check_cancel()


@dataclass
class MethodContext:
    """Everything a method may use. Arrays are KJI on the input grid; ``image`` is shared: never modify it.

    ``brain``: bool, the dilated brain mask (copied exactly); ``head``: bool head mask; ``threshold``: the head
    threshold in the input's intensity units."""

    image: sitk.Image
    array: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    threshold: float
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    options: Dict[str, Any] = field(default_factory=dict)
    stages: Stages = field(default_factory=Stages)
    # Facts the method wants in the sidecar (e.g. model id and sha256).
    provenance: Dict[str, Any] = field(default_factory=dict)
    _grid: Any = None

    def grid(self):
        """The model grid (``modelgrid.ModelGrid``) around this head, built on first use."""
        if self._grid is None:
            from ..modelgrid import DEFAULT_SIZE, ModelGrid

            size = int(self.options.get("grid_size", DEFAULT_SIZE))
            self._grid = ModelGrid.around(self.image, self.head, self.brain, size=size, array=self.array)
        return self._grid

    def check_cancel(self) -> None:
        """Raise :class:`errors.Cancelled` when the run was cancelled (see :meth:`Stages.check_cancel`)."""
        self.stages.check_cancel()

    def stage(self, name: str) -> ContextManager[None]:
        """Time a sub-stage of the method (see :meth:`Stages.stage`)."""
        return self.stages.stage(name)


@dataclass(frozen=True)
class Method:
    """A registered method. ``prepare(options, device)``, when given, checks and loads what the method needs
    (its model, say) before any per-scan work, so that a bad ``--model`` fails at once, not after the brain
    mask or on every scan of a batch; it raises InputError."""

    name: str
    summary: str
    role: str
    run: Callable[[MethodContext], MethodOutput]
    prepare: Optional[Callable[[Dict[str, Any], torch.device], None]] = None

    def check(self, options: Dict[str, Any], device: torch.device) -> None:
        if self.prepare is not None:
            self.prepare(options, device)


METHODS: Dict[str, Method] = {}
# Methods whose optional package is missing: name -> why (so `--method name` can say what to install).
UNAVAILABLE: Dict[str, str] = {}
# Every method module; a module whose optional dependency is missing is simply not registered.
_MODULES = ("remodel", "reface", "deface", "quickshear", "blur", "skullstrip")


def register(
    name: str, *, summary: str, role: str, prepare: Optional[Callable[[Dict[str, Any], torch.device], None]] = None
) -> Callable:
    """Decorator adding ``run(ctx) -> MethodOutput`` to the registry under ``name``."""

    def decorate(run: Callable[[MethodContext], MethodOutput]) -> Callable[[MethodContext], MethodOutput]:
        METHODS[name] = Method(name, summary, role, run, prepare)
        return run

    return decorate


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as error:
            # A missing package disables that one method (a Slicer user may not have installed it yet);
            # the others stay usable.
            if error.name == f"{__name__}.{module}":
                continue
            UNAVAILABLE[module] = f"needs the Python package {error.name!r}: pip install {error.name}"


def method_names() -> List[str]:
    return list(METHODS)


def default_method() -> Optional[str]:
    """The method ``run`` uses without ``--method``: the learned remodeling, or None while it is unavailable."""
    return DEFAULT_METHOD if DEFAULT_METHOD in METHODS else None


def get_method(name: Optional[str]) -> Method:
    """The registered method called ``name`` (None = the default); InputError for an unknown name."""
    if name is None:
        name = default_method()
        if name is None:
            raise InputError(
                "no default method is available yet (the learned 'remodel' is not installed); "
                f"choose one with --method ({', '.join(METHODS)})"
            )
    if name in UNAVAILABLE:
        raise InputError(f"method {name!r} is not available: it {UNAVAILABLE[name]}")
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


_load_all()
