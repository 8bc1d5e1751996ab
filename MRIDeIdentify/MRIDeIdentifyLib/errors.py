"""The error contract: exceptions that the command line and the Slicer panel turn into messages, and the
argument parser every subcommand uses so that bad usage reads like bad input (one line, exit 2)."""
import argparse

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
