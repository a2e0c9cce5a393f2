"""Exception hierarchy of ms3seg-app (after pybids' ``exceptions.py``)."""


class MS3SegError(Exception):
    """Base class of every error ms3seg-app raises on purpose."""


class InputDataError(MS3SegError):
    """An input image or dataset cannot be processed; the message names the file and the fix."""


class ModelError(MS3SegError):
    """Model weights or model card are missing, tampered with or inconsistent."""


class UsageError(MS3SegError):
    """Command-line arguments are inconsistent (exit code 2)."""
