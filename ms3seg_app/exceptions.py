"""Exception hierarchy of ms3seg-app (after pybids' ``exceptions.py``)."""
import errno

#: errno of an :class:`OSError` that is the machine's state, not a bug -> what the user does
SYSTEM_ERRORS = {
    errno.ENOSPC: "free space in the output folder, the work folder (-w) and TMPDIR, then run again",
    errno.EDQUOT: "the disk quota is used up: free space or ask for a larger quota, then run again",
    errno.EROFS: "the file system is read-only: give a writable output folder, -w WORK_DIR or TMPDIR",
    errno.EACCES: "check the permissions of that file and its folder (output folder, -w WORK_DIR, TMPDIR)",
    errno.EPERM: "check the permissions of that file and its folder (output folder, -w WORK_DIR, TMPDIR)",
}

#: errno of a full or read-only disk: writing anything more fails too (a FLAIR's report included)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_system_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's state (a full disk or quota, a read-only or forbidden
    folder: :data:`SYSTEM_ERRORS`; too little memory, TensorFlow's ``ResourceExhaustedError``
    included), not a bug."""
    # TensorFlow's out-of-memory error named, not imported: this module is imported without it
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError"
            or (isinstance(exc, OSError) and exc.errno in SYSTEM_ERRORS))


class MS3SegError(Exception):
    """Base class of every error ms3seg-app raises on purpose."""


class InputDataError(MS3SegError):
    """An input image or dataset cannot be processed; the message names the file and the fix."""


class ModelError(MS3SegError):
    """Model weights or model card are missing, tampered with or inconsistent."""


class UsageError(MS3SegError):
    """Command-line arguments are inconsistent, or the run has nowhere to write (exit code 2)."""
