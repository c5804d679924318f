"""onnxruntime's quantization tooling, silenced."""

from __future__ import annotations

import contextlib
import io
import logging

import onnxruntime as ort


@contextlib.contextmanager
def quiet():
    """Silence onnxruntime's quantization tooling for the duration, and undo its global logging changes.

    quantize_static logs advice through the root logger, its histogram calibrators print to stdout, its sessions
    warn on stderr, and importing matmul_nbits_quantizer runs logging.basicConfig(level=INFO), which would make
    every later INFO log of the process appear. The CLI prints the report, not this chatter.
    """
    root = logging.getLogger()
    level, handlers, disabled = root.level, root.handlers[:], logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.disable(disabled)
        ort.set_default_logger_severity(2)
