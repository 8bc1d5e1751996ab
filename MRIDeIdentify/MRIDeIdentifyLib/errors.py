"""Exceptions that the command line and the Slicer panel turn into messages."""


class InputError(ValueError):
    """The input cannot be used (unreadable, wrong shape, no overlap, ...).

    The message is one line a user can act on; the command line exits with status 2 and writes nothing.
    """


class Cancelled(RuntimeError):
    """The user cancelled the run (Slicer's Cancel button); nothing is written."""
