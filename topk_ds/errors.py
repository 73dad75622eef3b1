class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt file, wrong checkpoint).
    The CLI prints it as one line on stderr and exits with status 2, without a traceback."""
