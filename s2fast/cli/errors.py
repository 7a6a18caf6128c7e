"""The one exception type the command turns into a one-line message and a non-zero exit (no traceback)."""


class UserError(Exception):
    """A problem the user can fix: a missing model, an unsupported pipeline, a bad option value, out of memory."""
