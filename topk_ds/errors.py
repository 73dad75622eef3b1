class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt file, wrong checkpoint).
    The CLI prints it as one line on stderr and exits with status 2, without a traceback."""


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error: the path(s) and the cause, e.g.
    "/data/out/train-00003.bin: No space left on device"."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    cause = e.strerror or str(e) or type(e).__name__
    return f"{where}: {cause}" if where else cause
