"""Errors of the device runtime (it imports nothing from the rest of the project)."""


class RuntimeUserError(Exception):
    """Bad input on the device side: missing or tampered bundle, absent execution provider, bad option.

    Its message is one line that says what to do; entry points print it without a traceback.
    """
