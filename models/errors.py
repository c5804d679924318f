"""The one error type for user mistakes on the model/export side: its message says what to do.

The CLI turns it into a single line on stderr and a non-zero exit (no traceback unless PIPELINE_DEBUG=1).
"""


class UserError(Exception):
    """Bad input from the user: missing or corrupt file, unsupported architecture, bad option."""
