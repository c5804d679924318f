"""The ONNX I/O contract now lives in runtimes/contract.py (torch-free, the device reads it too); this module only
re-exports it for the modules that still import it from here. New code imports `runtimes.contract`."""

from runtimes.contract import *  # noqa: F401,F403
