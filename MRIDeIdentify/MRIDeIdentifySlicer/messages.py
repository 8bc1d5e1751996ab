"""Engine messages in the panel's words: the engine speaks to command-line users (``--brain-mask``, ``pip install``);
the panel names its own controls instead."""

from __future__ import annotations

import re
from typing import Tuple

# (pattern, replacement), applied in order: whole phrases first, then any flag left.
_PHRASES: Tuple[Tuple[str, str], ...] = (
    (r"run `pip install[^`]*`", "click De-identify again to install it"),
    (r"pip install (--no-deps )?\S+", "click De-identify again to install it"),
    (r"--device (\w+) was asked for", r"Device '\1' was chosen (Advanced section)"),
    (r"\(or pass --brain-mask\)", "(or choose a Brain mask in the Inputs section)"),
    (r"pass a mask with --brain-mask", "choose a Brain mask in the Inputs section"),
    (r"pass --brain-mask", "choose a Brain mask in the Inputs section"),
    (r"choose one with --method", "choose one in the Method list"),
    (r"choose one with --series UID", "load one series"),
)
CONTROLS = {
    "--brain-mask": "Brain mask (Inputs)",
    "--method": "Method",
    "--model": "Model file (Method)",
    "--device": "Device (Advanced)",
    "--seed": "Random seed (Advanced)",
    "--margin-mm": "Brain margin (Advanced)",
    "--rotations": "Hull rotations (Advanced)",
    "--facets": "Hull facets (Advanced)",
    "--save-brain-mask": "Brain kept (Outputs)",
    "--save-face-mask": "Face region (Outputs)",
}


def inPanelTerms(message: str) -> str:
    """``message`` with command-line flags and pip commands replaced by the panel's controls and actions."""
    for pattern, replacement in _PHRASES:
        message = re.sub(pattern, replacement, message)
    for flag, control in sorted(CONTROLS.items(), key=lambda item: -len(item[0])):
        message = re.sub(re.escape(flag) + r"(?![\w-])", control, message)
    return message
