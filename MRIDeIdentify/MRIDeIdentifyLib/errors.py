"""The error contract: exceptions that the command line and the Slicer panel turn into messages, and the
argument parser every subcommand uses so that bad usage reads like bad input (one line, exit 2)."""

import argparse
import re
from pathlib import Path
from typing import Union

PROG = "mri-deidentify"


class InputError(ValueError):
    """The input cannot be used (unreadable, wrong shape, no overlap, ...).

    The message is one line a user can act on; the command line exits with status 2 and writes nothing.
    """


class Cancelled(RuntimeError):
    """The user cancelled the run (Slicer's Cancel button); nothing is written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (the contract), pointing to --help for the rest."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


# ITK's messages start with where in ITK's source they were raised ("WARNING: In /build/.../x.cxx, line 12",
# "ITK ERROR: NiftiImageIO(0x55d2...): "): the user needs only what follows.
_ITK_SOURCE = re.compile(
    r"(?:ITK ERROR|WARNING|ERROR): In \S+, line \d+|\S+\.[ch]xx(?::\d+)?:?|"
    r"[A-Za-z]+ ?\(0x[0-9a-fA-F]+\):|ITK ERROR:|Exception thrown in SimpleITK \w+:|"
    r"Description:|sitk::ERROR:|\n"
)


def itk_reason(error: Union[BaseException, str], path: Path) -> str:
    """ITK's complaint about ``path`` in one line of the user's terms: no source locations, object addresses,
    repeats, or the path itself (the message already names the file)."""
    pieces = [piece.strip(" :") for piece in _ITK_SOURCE.split(str(error))]
    kept = list(dict.fromkeys(piece for piece in pieces if piece))
    return without_path("; ".join(kept), path) or "unknown reason"


def without_path(error: Union[BaseException, str], path: Path) -> str:
    """A library's message about ``path`` on one line, at most 200 characters, the path itself said as "the file"."""
    text = " ".join(str(error).split())
    for shown in (str(path.resolve()), str(path)):
        text = text.replace(f'"{shown}"', "the file").replace(shown, "the file")
    return text[:200].strip()
