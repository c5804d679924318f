"""Execution providers as frozen specs: what to ask onnxruntime for, and what the generation loop must know.

A spec is data (the provider's onnxruntime name, its option strings, the device its outputs live on), built by
one named factory per provider — `cpu()`, `cuda()`, `tensorrt()` — and looked up by name through `resolve()`.
Whether a provider really works is decided by loading it (`available()`), not by trusting the list that
onnxruntime advertises: a GPU build without its CUDA libraries lists CUDA and then silently falls back to CPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import platform
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtimes.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, Contract, is_past
from runtimes.errors import RuntimeUserError

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"

# A serialized ONNX model `y = Identity(x)` (float[1], opset 13), hardcoded so that probing a provider needs
# neither the onnx package nor a file on disk.
_PROBE_MODEL = (b'\x08\x07:7\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x01pZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04'
                b'\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')


@dataclass(frozen=True)
class TrtProfiles:
    """The sequence lengths a TensorRT engine is built for (one optimization profile).

    TensorRT compiles for a shape range fixed at build time; inputs outside it force a slow rebuild or fail, so
    the range is stated up front. `max_seq_len` None means the model's max_position_embeddings. The opt shape
    is a decode step (one new token) at `opt_past_len`, because decode is where the time goes.
    """
    max_seq_len: int | None = None
    opt_past_len: int = 128
    batch: int = 1


@dataclass(frozen=True)
class ModelShape:
    """What provider options may depend on, read from the model: the inputs it declares and its contract."""
    input_names: tuple[str, ...]
    contract: Contract


@dataclass(frozen=True)
class ProviderSpec:
    """One execution provider, configured. Options are strings because onnxruntime takes them as strings."""
    name: str                                   # the short name: "cpu" | "cuda" | "tensorrt"
    ep: str                                     # onnxruntime's provider name
    install: str                                # how to get it when it is absent
    options: tuple[tuple[str, str], ...] = ()
    device: str = "cpu"                         # where its outputs live: the OrtValue device for IO binding
    device_id: int = 0
    threads: int | None = None                  # intra-op threads (CPU work, also the fallback's)
    needs_nonempty_past: bool = False           # prefill must feed one masked dummy past slot (TensorRT)
    profiles: TrtProfiles | None = None         # shape profiles, computed from the model when it is opened
    cache_dir: str | None = None                # created before the session is, the provider writes there
    graph_capture: bool = False                 # CUDA graphs: decode steps replay one captured graph (CUDA)

    @property
    def needs_model_shape(self) -> bool:
        return self.profiles is not None

    def session_providers(self, shape: ModelShape | None = None) -> list[tuple[str, dict[str, str]]]:
        """The `providers=` list for onnxruntime: this provider, then CPU for whatever it cannot run.

        `shape` is needed exactly when the spec has TensorRT profiles (see `needs_model_shape`).
        """
        options = dict(self.options)
        if self.profiles is not None:
            options.update(trt_profile_options(self.profiles, shape))
        return with_cpu_fallback(self.ep, options)


def with_cpu_fallback(ep: str, options: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """`ep` first, CPU last: nodes the provider cannot run (and the whole model, should it fail) go to CPU."""
    return [(ep, options)] if ep == CPU_EP else [(ep, options), (CPU_EP, {})]


def _flag(value: bool) -> str:
    return "True" if value else "False"


def cpu(threads: int | None = None) -> ProviderSpec:
    """onnxruntime's default provider; `threads` None lets onnxruntime use one thread per physical core."""
    return ProviderSpec(name="cpu", ep=CPU_EP, install="pip install onnxruntime", threads=threads)


def cuda(device_id: int = 0, graph: bool = False) -> ProviderSpec:
    """CUDA: the KV cache stays on the GPU between steps (IO binding, see runtimes.generate).

    cudnn_conv_algo_search DEFAULT skips cuDNN's exhaustive benchmark, which costs seconds per shape and buys
    nothing for a decoder with no convolutions; copies go on the compute stream so a step never races its input.
    `graph`: onnxruntime captures the first decode step as a CUDA graph and replays it for every later one
    (`enable_cuda_graph`), which needs every step to run with the same shapes on the same buffers: the
    generation loop then keeps a fixed-capacity cache (runtimes.caches `StaticCache`; fused graphs only).
    """
    options = (("device_id", str(device_id)), ("cudnn_conv_algo_search", "DEFAULT"),
               ("do_copy_in_default_stream", "1")) + ((("enable_cuda_graph", "1"),) if graph else ())
    return ProviderSpec(name="cuda", ep=CUDA_EP, install="pip install 'edge-pipeline[gpu]'", options=options,
                        device="cuda", device_id=device_id, graph_capture=graph)


def tensorrt(fp16: bool = False, int8: bool = False, cache_dir: str | Path = "trt_cache",
             profiles: TrtProfiles = TrtProfiles(), device_id: int = 0) -> ProviderSpec:
    """TensorRT: engines and the timing cache are kept in `cache_dir`, so only the first run pays the build.

    The path is made absolute because TensorRT resolves a relative one against whatever directory the process
    happens to run in. int8 needs a QDQ model or a calibration table. Prefill runs with one dummy past slot:
    TensorRT rejects a zero-length past, so every profile's minimum past length is 1.
    """
    cache = str(Path(cache_dir).expanduser().resolve())
    options = (("device_id", str(device_id)), ("trt_fp16_enable", _flag(fp16)), ("trt_int8_enable", _flag(int8)),
               ("trt_engine_cache_enable", "True"), ("trt_engine_cache_path", cache),
               ("trt_timing_cache_enable", "True"), ("trt_timing_cache_path", cache))
    return ProviderSpec(name="tensorrt", ep=TENSORRT_EP, install="pip install 'edge-pipeline[tensorrt]'",
                        options=options, device="cuda", device_id=device_id, needs_nonempty_past=True,
                        profiles=profiles, cache_dir=cache)


FACTORIES: dict[str, Callable[..., ProviderSpec]] = {"cpu": cpu, "cuda": cuda, "tensorrt": tensorrt}


def trt_profile_options(profiles: TrtProfiles, shape: ModelShape) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for every dynamic input the model declares, past KV included.

    Past length runs from 1 (the dummy slot, never 0) to max_seq_len; the attention mask covers past + new, so
    its total length is one more than the longest real sequence.
    """
    longest = profiles.max_seq_len or shape.contract.max_position_embeddings
    opt_past = min(profiles.opt_past_len, longest)
    b, heads, dim = profiles.batch, shape.contract.num_kv_heads, shape.contract.head_dim
    tokens = ("1x1", f"{b}x1", f"{b}x{longest}")
    kv = (f"1x{heads}x1x{dim}", f"{b}x{heads}x{opt_past}x{dim}", f"{b}x{heads}x{longest}x{dim}")
    ranges = {INPUT_IDS: tokens, POSITION_IDS: tokens,
              ATTENTION_MASK: ("1x2", f"{b}x{opt_past + 1}", f"{b}x{longest + 1}")}
    rows = [(n, ranges.get(n, kv)) for n in shape.input_names if n in ranges or is_past(n)]
    return {f"trt_profile_{kind}_shapes": ",".join(f"{n}:{r[k]}" for n, r in rows)
            for k, kind in enumerate(("min", "opt", "max"))}


NOT_IN_BUILD = "not in this onnxruntime"


@contextlib.contextmanager
def _native_stderr() -> Iterator[io.StringIO]:
    """What C++ writes to file descriptor 2 meanwhile (onnxruntime's log of a library it cannot load), kept out of
    the terminal and handed back in the yielded buffer once the block ends."""
    text = io.StringIO()
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text.write(log.read().decode(errors="replace"))


def load_failure(ep: str) -> str | None:
    """None when `ep` loads here and runs a one-node model; else why not: not in this onnxruntime build, or what
    onnxruntime said when it tried (a GPU build lists CUDA, then falls back to the CPU when a CUDA library is
    missing: the library it could not open)."""
    if ep not in ort.get_available_providers():
        return NOT_IN_BUILD
    options = ort.SessionOptions()
    options.log_severity_level = 4
    error = None
    # a provider that fails to load is the answer here, not news: onnxruntime's fallback banner (stdout), its
    # warnings and its native log are kept out of the terminal
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _native_stderr() as log:
        warnings.simplefilter("ignore")
        try:
            session = ort.InferenceSession(_PROBE_MODEL, options, providers=with_cpu_fallback(ep, {}))
            session.run(None, {"x": np.zeros(1, np.float32)})
            loaded = ep in session.get_providers()
        except Exception as e:  # noqa: BLE001 - any failure to load or run means the provider is not usable
            loaded, error = False, f"{type(e).__name__}: {e}"
    if loaded:
        return None
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", log.getvalue()).splitlines() if line.strip()]
    reason = next((line.split("with error: ", 1)[1] for line in lines if "with error: " in line), None)
    reason = reason or error or next((line for line in lines if "fail" in line.lower()), None)
    return " ".join((reason or "onnxruntime fell back to the CPU").split())


@functools.cache
def available(ep: str) -> bool:
    """True when `ep` loads and runs here: listed by onnxruntime *and* able to run a one-node model."""
    return load_failure(ep) is None


def ensure_available(spec: ProviderSpec) -> ProviderSpec:
    """`spec` itself, or a RuntimeUserError that says how to install the provider, or what kept it from loading."""
    if not available(spec.ep):
        why = load_failure(spec.ep)
        if why == NOT_IN_BUILD:
            raise RuntimeUserError(f"execution provider {spec.name!r} ({spec.ep}) is not in this onnxruntime: "
                                   f"install it with {spec.install}")
        raise RuntimeUserError(f"execution provider {spec.name!r} ({spec.ep}) is installed but does not load: "
                               f"{why} (install its libraries, or see {spec.install})")
    return spec


def resolve(name: str, **opts) -> ProviderSpec:
    """The spec for provider `name` ("cpu" | "cuda" | "tensorrt") with factory options `opts`, checked to load."""
    factory = FACTORIES.get(name)
    if factory is None:
        raise RuntimeUserError(f"unknown execution provider {name!r}: choose one of {', '.join(FACTORIES)}")
    accepted = inspect.signature(factory).parameters
    wrong = sorted(set(opts) - set(accepted))
    if wrong:
        raise RuntimeUserError(f"provider {name!r} takes no option {', '.join(wrong)}: it takes "
                               f"{', '.join(accepted) or 'no options'}")
    return ensure_available(factory(**opts))


_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}  # /proc/cpuinfo names of AVX512-VNNI and AVX-VNNI


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags as /proc/cpuinfo names them; None where they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    return next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")),
                None)


def int8_gemm_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether onnxruntime's CPU int8 GEMM (MLAS, u8 activations x s8 weights) can overflow on this machine.

    Without VNNI, MLAS's x86 U8S8 kernels (AVX2, AVX512BW) add pairs of u8*s8 products in saturating int16, and
    255 * 127 * 2 > 32767: weights must then keep to 7 bits (`reduce_range`). With AVX-VNNI or AVX512-VNNI the
    products accumulate in int32, and ARM's kernels widen first; full 8-bit weights are exact there. An x86
    machine whose flags cannot be read (no /proc/cpuinfo) counts as saturating. `cpuinfo` and `machine`
    stand in for /proc/cpuinfo and platform.machine() in tests.
    """
    if (machine or platform.machine()).lower() not in _X86:
        return False
    flags = cpu_flags(cpuinfo)
    return flags is None or not _VNNI_FLAGS & flags
