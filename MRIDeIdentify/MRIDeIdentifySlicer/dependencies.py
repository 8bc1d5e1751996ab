"""What the engine needs in Slicer's Python beyond what Slicer ships, checked and installed on first use.

Slicer ships numpy, scipy, SimpleITK, vtk and Pillow. PyTorch comes from the PyTorch extension (its PyTorchUtils
picks a CUDA or CPU build for the computer); everything else is installed by ONE ``pip install --no-deps`` call with
exact versions, so that pip never upgrades a package Slicer itself depends on and every install is the same.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from contextlib import nullcontext
from typing import Callable, ContextManager, List, NamedTuple, Optional, Sequence, Tuple

# The engine's minimum (pyproject.toml: torch>=2.1; a test keeps them equal).
MINIMUM_TORCH_VERSION = "2.1"


class Requirement(NamedTuple):
    module: str  # import name
    pip: str  # what pip installs: an exact version
    why: str
    # Needed only on Python versions below this one (the standard library has it from there on).
    below: Tuple[int, int] = (99, 0)


# deepbet and pydeface are used for the files they ship (brain-extractor weights, the average head), found by path:
# their versions are pinned because those paths are. pydeface 2.1 needs Python >= 3.10 and Slicer 5.8 has 3.9;
# 2.0.2 ships the same two images. The last four are nibabel's own needs, installed only where Slicer lacks them.
REQUIREMENTS: Tuple[Requirement, ...] = (
    Requirement("safetensors", "safetensors==0.7.0", "reads the remodeling model's weights"),
    Requirement("deepbet", "deepbet==1.0.2", "the learned brain extractor"),
    Requirement("pydeface", "pydeface==2.0.2", "the average head that 'reface' and 'deface' fit to the subject"),
    Requirement("nibabel", "nibabel==5.3.2", "image headers for the quickshear baseline"),
    Requirement("quickshear", "quickshear==1.2.0", "the quickshear removal baseline"),
    Requirement("packaging", "packaging==24.2", "used by nibabel"),
    Requirement("typing_extensions", "typing-extensions==4.12.2", "used by nibabel", below=(3, 13)),
    Requirement("importlib_resources", "importlib-resources==6.5.2", "used by nibabel", below=(3, 12)),
    Requirement("zipp", "zipp==3.21.0", "used by importlib-resources", below=(3, 10)),
)

PYTORCH = "PyTorch"
PYTORCH_EXTENSION_HINT = (
    "MRIDeIdentify needs the PyTorch extension to install PyTorch: open View > Extensions "
    "Manager, install 'PyTorch', restart Slicer, then click De-identify again."
)


def versionTuple(version: str) -> Tuple[int, ...]:
    """``"2.1.0+cu121"`` -> ``(2, 1, 0)``: the numeric release, enough to compare with a minimum."""
    release = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in release.group(0).split(".")) if release else ()


def torchVersion() -> Optional[str]:
    """The installed torch's version without importing it (importing could lock a broken install), or None."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # torch on the path without metadata (a source build)
        import torch

        return str(torch.__version__)


def torchReady() -> bool:
    """torch is installed and recent enough for the engine."""
    version = torchVersion()
    return version is not None and versionTuple(version) >= versionTuple(MINIMUM_TORCH_VERSION)


def neededRequirements() -> List[Requirement]:
    """The pip requirements not importable yet in this Python."""
    return [r for r in REQUIREMENTS if sys.version_info[:2] < r.below and importlib.util.find_spec(r.module) is None]


def missing() -> List[str]:
    """What is missing, for the question to the user: ``"PyTorch"`` first, then the pip packages."""
    torch = [] if torchReady() else [PYTORCH]
    return torch + [r.module for r in neededRequirements()]


def pytorchExtensionInstalled() -> bool:
    return importlib.util.find_spec("PyTorchUtils") is not None


def question(needed: Sequence[Requirement]) -> str:
    lines = []
    if not torchReady():
        installed = torchVersion()
        lines.append(
            f"- PyTorch >= {MINIMUM_TORCH_VERSION}: runs the models, on the GPU when there is one"
            + (f" (PyTorch {installed} is installed: it will be updated)" if installed else "")
        )
    lines += [f"- {r.pip}: {r.why}" for r in needed]
    return (
        "MRIDeIdentify needs these Python packages, which are not installed yet:\n"
        + "\n".join(lines)
        + "\n\nDownload and install them now? PyTorch alone can take several minutes."
    )


def install(
    confirm: Callable[[str], bool],
    status: Callable[[str], None] = lambda text: None,
    busy: Callable[[], ContextManager] = nullcontext,
    pipInstall: Optional[Callable[[List[str]], None]] = None,
    torchInstaller: Optional[Callable[[str], object]] = None,
) -> bool:
    """Install what is missing after one ``confirm(question)``; True when everything is there, False if declined.

    ``status(text)`` shows the step under way (before the long call starts); ``busy()`` wraps the long calls (the
    panel's wait cursor). ``pipInstall(arguments)`` defaults to ``slicer.util.pip_install``; ``torchInstaller(
    requirement)`` to PyTorchUtils' ``installTorch``. Raises RuntimeError with the next step a user can take.
    """
    needed = neededRequirements()
    if torchReady() and not needed:
        return True
    if not torchReady() and torchInstaller is None and not pytorchExtensionInstalled():
        raise RuntimeError(PYTORCH_EXTENSION_HINT)  # before asking anything: a yes could not be honoured
    if not confirm(question(needed)):
        return False
    if not torchReady():
        status("Installing PyTorch... this can take several minutes.")
        with busy():
            _installTorch(torchInstaller)
    if needed:
        status(f"Installing {', '.join(r.module for r in needed)}...")
        arguments = ["--no-deps", *(r.pip for r in needed)]
        with busy():
            try:
                (pipInstall or _slicerPipInstall)(arguments)
            except Exception as error:
                raise RuntimeError(
                    f"Installing {', '.join(r.pip for r in needed)} failed ({error}). Check the "
                    "network connection and click De-identify again."
                ) from error
    importlib.invalidate_caches()
    still = [r.pip for r in neededRequirements()]
    if still:
        raise RuntimeError(
            f"{', '.join(still)} could not be imported after installation; restart Slicer and click De-identify again."
        )
    forgetEngineModules()
    status("Python packages installed.")
    return True


def _installTorch(torchInstaller: Optional[Callable[[str], object]]) -> None:
    oldTorch = sys.modules.get("torch")
    requirement = f">={MINIMUM_TORCH_VERSION}"
    if torchInstaller is None:
        import PyTorchUtils

        def torchInstaller(requirement):
            return PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=requirement
            )

    installed = torchInstaller(requirement)
    importlib.invalidate_caches()  # the import system caches folder listings: a package just installed is new there
    if installed is None or not torchReady():
        raise RuntimeError(
            "PyTorch was not installed. Open the 'PyTorch Utils' module (Utilities), install "
            f"PyTorch {requirement} there, then click De-identify again."
        )
    if oldTorch is not None and versionTuple(str(oldTorch.__version__)) < versionTuple(MINIMUM_TORCH_VERSION):
        raise RuntimeError(f"PyTorch was updated to {torchVersion()}; restart Slicer to use it.")


def _slicerPipInstall(arguments: List[str]) -> None:
    import slicer

    slicer.util.pip_install(arguments)


def forgetEngineModules() -> None:
    """Drop the engine's imported modules so that the next import sees the packages just installed: the method
    registry notes a method whose package is missing as unavailable once, when it is imported. The package itself
    and its exception classes stay, so that an ``except errors.Cancelled`` keeps catching what is raised."""
    keep = {"MRIDeIdentifyLib", "MRIDeIdentifyLib.errors"}
    for name in [name for name in sys.modules if name.startswith("MRIDeIdentifyLib.") and name not in keep]:
        del sys.modules[name]
