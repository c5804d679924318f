"""The one place an onnxruntime session is created for a decoder: options, providers, load errors, contract.

The model's I/O contract is read from its own metadata (key `pipeline.contract`, written by the exporter), so
the device needs nothing from the export side; the names come from runtimes/contract.py. Optimized variants may
drop inputs (position_ids after GroupQueryAttention fusion), so callers feed only `input_names`, and the KV dtype
comes from the graph, not from the metadata.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from runtimes import kernels
from runtimes.contract import (INPUT_IDS, LOGITS, LOGITS_TO_KEEP, METADATA_KEY, Contract, past_key, past_names,
                               present_names)
from runtimes.errors import RuntimeUserError
from runtimes.pages import released_pages
from runtimes.providers import (CPU_EP, ModelShape, ProviderSpec, cpu, ensure_available, int8_gemm_saturates,
                               with_cpu_fallback)

WEIGHT_BITS_KEY = "pipeline.int8_weight_bits"  # written by `pipeline quantize` for static int8 weights: "7" or "8"
INT8_GEMM_KEY = "pipeline.int8_gemm"  # "native": `optimize --native-int8` left onnxruntime no int8 GEMM to run
MODEL_FILE = "model.onnx"  # the model's name inside a bundle directory
MAX_THREADS = 1024  # intra-op threads: more than any machine has cores, fewer than would exhaust the process

# onnxruntime's ways of saying "this file is not a model it can load"
_LOAD_ERRORS = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                ort_errors.InvalidArgument, ort_errors.NotImplemented)
_KV_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


@dataclass(frozen=True)
class DecoderSession:
    """An onnxruntime session over a decoder, with what a generation loop needs to drive it."""
    ort: ort.InferenceSession
    spec: ProviderSpec
    path: Path
    contract: Contract
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    kv_dtype: np.dtype

    @property
    def provider(self) -> str:
        """The provider actually in use: onnxruntime falls back to CPU when the requested one fails."""
        return self.ort.get_providers()[0]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        return self.ort.run(outputs, feeds)

    def end_profiling(self) -> str:
        """Stop onnxruntime's profiler (open_session(profile_prefix=...)) and return the trace file's path."""
        return self.ort.end_profiling()


def resolve_model_path(path: str | Path) -> Path:
    """`path` itself when it is a file, or the model inside a bundle directory (model.onnx, or its only .onnx)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / MODEL_FILE] if (path / MODEL_FILE).is_file() else sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise RuntimeUserError(f"{path} holds {len(candidates)} .onnx files and no {MODEL_FILE}: "
                                   "pass the model file itself")
        return candidates[0]
    if not path.is_file():
        raise RuntimeUserError(f"model {path} does not exist: pass an exported .onnx file or a bundle directory")
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _load(path: Path, options: ort.SessionOptions,
          providers: list[tuple[str, dict[str, str]]]) -> ort.InferenceSession:
    """onnxruntime's session, with load failures as one-line user errors.

    onnxruntime prints its provider-fallback banner on stdout; it goes to stderr so that stdout stays the
    command's output (one JSON object for `bench --json`). The weights its kernels prepack are resident once,
    not also as the data file's pages they were read from (runtimes/pages.py).
    """
    try:
        with contextlib.redirect_stdout(sys.stderr), released_pages(path.parent):
            return ort.InferenceSession(str(path), options, providers=providers)
    except _LOAD_ERRORS as e:
        op = re.search(rf"{kernels.DOMAIN}:(\w+)", str(e))
        if op:  # a graph for the native kernel: not registered here, or this build lacks the op
            why = kernels.unavailable_reason() or (f"this version's kernels have no {op[1]} (theirs: "
                                                   f"{', '.join(kernels.OPS)}): write the variant again with "
                                                   "this version's `pipeline optimize --native-int8`")
            raise RuntimeUserError(f"{path} uses pipeline's native int8 kernel ({op[1]}), which is not "
                                   f"available: {why}; or run the portable variant it was made from (without "
                                   "-native)") from e
        raise RuntimeUserError(f"cannot load {path} ({_first_line(e)}): the file is corrupt or truncated, "
                               "copy or export it again") from e
    except ort_errors.EPFail as e:
        raise RuntimeUserError(f"execution provider {providers[0][0]} failed on {path} ({_first_line(e)}): "
                               "try --provider cpu") from e


def session_options(threads: int | None, optimize: bool = True,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """All graph optimizations (fusions are where CPU speed comes from); `optimize` False only for probes that
    read names and metadata, where optimizing would be wasted time."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise RuntimeUserError(f"{threads} threads: give a count from 1 to {MAX_THREADS}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about CPU fallback of single nodes are expected, not news
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    library = kernels.available()
    if library:  # graphs from `pipeline optimize --native-int8` need it; others do not notice it
        try:
            options.register_custom_ops_library(str(library))
        except (RuntimeError, *_LOAD_ERRORS) as e:
            raise RuntimeUserError(f"the native kernel library {library} does not load ({_first_line(e)}): "
                                   f"delete it and rebuild it with {kernels.HOW_TO_BUILD}") from e
    return options


def _describe(session: ort.InferenceSession, path: Path) -> tuple[Contract, tuple[str, ...], tuple[str, ...]]:
    """Contract, input and output names, checked against each other so a tampered graph fails here."""
    contract = Contract.from_metadata(session.get_modelmeta().custom_metadata_map, path)
    inputs = tuple(i.name for i in session.get_inputs())
    inputs += tuple(i.name for i in session.get_overridable_initializers() if i.name == LOGITS_TO_KEEP)
    outputs = tuple(o.name for o in session.get_outputs())
    missing = ({INPUT_IDS, *past_names(contract.num_layers)} - set(inputs)) | \
        ({LOGITS, *present_names(contract.num_layers)} - set(outputs))
    if missing:
        raise RuntimeUserError(f"{path} does not match its {METADATA_KEY} metadata (missing "
                               f"{', '.join(sorted(missing))}): re-export the model")
    return contract, inputs, outputs


def int8_weights_saturate(meta: Mapping[str, str]) -> bool:
    """Whether a model with this metadata has full 8-bit static int8 weights that onnxruntime's int8 GEMM runs
    and this CPU's saturates on (x86 without VNNI)."""
    return meta.get(WEIGHT_BITS_KEY) == "8" and meta.get(INT8_GEMM_KEY) != "native" and int8_gemm_saturates()


def check_int8_weights(meta: Mapping[str, str], path: Path, spec: ProviderSpec) -> None:
    """Refuse full 8-bit static int8 weights on a CPU whose int8 kernels saturate: the model would load and run,
    and its logits would be garbage (SmolLM2-135M: perplexity 38 -> 650,000)."""
    if spec.device == "cpu" and int8_weights_saturate(meta):
        raise RuntimeUserError(f"{path} has full 8-bit int8 weights, which overflow onnxruntime's int8 kernels on "
                               "this CPU (x86 without VNNI): quantize it again with `pipeline quantize "
                               "--reduce-range` (7-bit weights)")


def model_shape(path: Path) -> ModelShape:
    """Inputs and KV geometry, read with a throwaway CPU session without graph optimizations.

    TensorRT's profiles depend on them, and they live in the model: they are needed before its session exists.
    """
    probe = _load(path, session_options(1, optimize=False), with_cpu_fallback(CPU_EP, {}))
    contract, inputs, _ = _describe(probe, path)
    return ModelShape(inputs, contract)


def open_session(model_path: str | Path, spec: ProviderSpec | None = None, threads: int | None = None,
                 profile_prefix: str | None = None, exact_int8: bool = False) -> DecoderSession:
    """Open `model_path` (a .onnx file or a bundle directory) on `spec` (default CPU).

    `threads` overrides the spec's intra-op thread count; `profile_prefix` turns on onnxruntime's profiler.
    `exact_int8`: full 8-bit static int8 weights on a CPU whose int8 GEMM saturates on them (x86 without VNNI)
    run as their QDQ graph says, in float (DequantizeLinear and a float MatMul, no int8 GEMM), instead of being
    refused: a reference for what a VNNI CPU computes, at float speed (`optimize --native-int8` checks its
    rewrite against it).
    """
    spec = ensure_available(spec or cpu())
    path = resolve_model_path(model_path)
    if spec.cache_dir:
        Path(spec.cache_dir).mkdir(parents=True, exist_ok=True)
    options = session_options(threads or spec.threads, profile_prefix=profile_prefix)
    shape = model_shape(path) if spec.needs_model_shape else None
    session = _load(path, options, spec.session_providers(shape))
    try:
        check_int8_weights(session.get_modelmeta().custom_metadata_map, path, spec)
    except RuntimeUserError:
        if not exact_int8:
            raise
        del session  # opened again without onnxruntime's int8 kernels: its weights stay mapped once
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = _load(path, options, spec.session_providers(shape))
    contract, inputs, outputs = _describe(session, path)
    kv_type = next(i.type for i in session.get_inputs() if i.name == past_key(0))
    if kv_type not in _KV_DTYPES:
        raise RuntimeUserError(f"{path} has a {kv_type} KV cache; this runtime supports float32 and float16")
    return DecoderSession(ort=session, spec=spec, path=path, contract=contract, input_names=inputs,
                          output_names=outputs, kv_dtype=_KV_DTYPES[kv_type])
