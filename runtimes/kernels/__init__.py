"""pipeline's native CPU kernels: an onnxruntime custom-op library, built from C on the machine that runs it.

Five ops (int8_matmul.c), for x86-64 (AVX512-VNNI, or AVX2 with FMA: every x86-64 CPU since 2015, the Intel
N100 class of edge boards among them) and for AArch64 with the dot-product instructions (ARMv8.2+: Raspberry
Pi 5, Jetson Orin, Graviton 2+, phones), which `pipeline optimize --native-int8` puts in place of
onnxruntime's:

- `com.pipeline.StaticInt8MatMul`, a static W8A8 MatMul, for a QDQ graph's QuantizeLinear +
  MatMulIntegerToFloat: onnxruntime's int8 GEMM reads a one-row product's weights at ~65% of this machine's
  memory rate, and batch-1 decode is that product (docs/benchmarks.md);
- `com.pipeline.BlockInt8MatMul`, an 8-bit MatMulNBits read as stored, for a tied head whose blocks the
  embedding also gathers: onnxruntime would hold them twice (its prepacked copy beside the stored blocks); and
  for 8-bit blocks whose codes span fewer bits (a GGUF's Q5_0 and Q5_1 blocks, w4's 5- to 7-bit MatMuls and
  head), stored packed at those bits, which MatMulNBits has no form for, and unpacked when the session starts;
- `com.pipeline.BlockGather`, the token embedding's rows read from such a head's packed codes, so a tied table
  is stored once at its codes' width;
- `com.pipeline.GluRotate`, a gated MLP's act(gate) * up (SiLU or GELU-tanh) and the online rotation after
  it, one node where the graph has up to seven a layer (exporters/gated_mlp.py);
- `com.pipeline.CacheAttention`, onnxruntime's GroupQueryAttention (packed QKV, rotary, the cache in place)
  with less overhead a decode step and prompt chunks at the float rate (exporters/native_attention.py).

    python -m runtimes.kernels build [--ort-include DIR]   # needs cc and onnxruntime's C API headers
    python -m runtimes.kernels status

The library goes to a per-user cache named after the source's and the compiler flags' hash (a changed source
is never served by a stale build, an AVX2 build never taken for an AVX512 one); PIPELINE_KERNELS names another.
An x86-64 CPU gets the AVX512-VNNI build where it has those instructions (one vpdpbusd per 64 weight bytes),
else the AVX2 one (the products widened to int16: exact for full 8-bit weights, about a quarter of the
instruction throughput, which decode, bound by memory, hardly notices). `open_session` registers it whenever it is built and the CPU
has the instructions, so a model that needs it just loads.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from runtimes.errors import RuntimeUserError
from runtimes.providers import cpu_flags

SOURCE = Path(__file__).with_name("int8_matmul.c")
DOMAIN = "com.pipeline"  # the custom ops' domain (int8_matmul.c registers it)
OP = "StaticInt8MatMul"
BLOCK_OP = "BlockInt8MatMul"
GATHER_OP = "BlockGather"
GATED_OP = "GluRotate"
ATTENTION_OP = "CacheAttention"
OPS = (OP, BLOCK_OP, GATHER_OP, GATED_OP, ATTENTION_OP)
LIBRARY_ENV = "PIPELINE_KERNELS"        # path of the built library, instead of the cache
INCLUDE_ENV = "ORT_INCLUDE_DIR"         # directory holding onnxruntime_c_api.h
REQUIRED_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # /proc/cpuinfo names (x86-64 "flags")
AVX2_FLAGS = {"avx2", "fma"}  # the portable x86-64 build's
ARM_FEATURE = "asimddp"  # /proc/cpuinfo's AArch64 "Features" name of the dot product (sdot / udot)
COMMON_CFLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-Wall", "-Werror"]
ARCH_CFLAGS = {"x86_64": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
               "x86_64-avx2": ["-mavx2", "-mfma"],
               "aarch64": ["-march=armv8.2-a+dotprod"]}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
HEADER_DIRS = ["/usr/include/onnxruntime", "/usr/local/include/onnxruntime", "/usr/include",
               "/usr/local/include"]
HOW_TO_BUILD = ("`python -m runtimes.kernels build` (a C compiler and onnxruntime's C API headers: Debian's "
                "libonnxruntime-dev, or --ort-include DIR)")


def arch(machine: str | None = None) -> str | None:
    """"x86_64" or "aarch64" (the kernel's two architectures), None for any other."""
    return _MACHINES.get((machine or platform.machine()).lower())


def flavor(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """The build this CPU runs: "x86_64" (AVX512-VNNI), "x86_64-avx2" or "aarch64"; None where none runs."""
    which = arch(machine)
    if which == "aarch64":
        if cpuinfo is None:
            try:
                cpuinfo = Path("/proc/cpuinfo").read_text()
            except OSError:
                return None
        return which if any(line.startswith("Features") and ARM_FEATURE in line.split(":", 1)[1].split()
                            for line in cpuinfo.splitlines()) else None
    if which != "x86_64":
        return None
    flags = cpu_flags(cpuinfo) or set()
    return "x86_64" if REQUIRED_FLAGS <= flags else "x86_64-avx2" if AVX2_FLAGS <= flags else None


def cflags(machine: str | None = None, cpuinfo: str | None = None) -> list[str]:
    """The compiler flags of the build for `machine` (default: this one); on x86-64 the build this CPU (or
    `cpuinfo`'s) runs, the AVX512-VNNI one where it runs none (to build for another machine)."""
    if arch(machine) == "aarch64":
        return COMMON_CFLAGS + ARCH_CFLAGS["aarch64"]
    return COMMON_CFLAGS + ARCH_CFLAGS[flavor(cpuinfo, "x86_64") or "x86_64"]


def cpu_supported(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """x86-64 with AVX2 and FMA (or AVX512-VNNI), or AArch64 with the dot product."""
    return flavor(cpuinfo, machine) is not None


def requirement() -> str:
    return ("x86-64 with AVX2 and FMA (or AVX512-VNNI)" if arch() != "aarch64" else
            "AArch64 with the dot-product instructions (ARMv8.2 and later, /proc/cpuinfo: asimddp)")


def library_path() -> Path:
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-pipeline"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(cflags()).encode()).hexdigest()[:12]
    return cache / f"libpipeline_int8-{digest}.so"


def available() -> Path | None:
    """The built library, where this CPU can run it; None otherwise."""
    path = library_path()
    return path if path.is_file() and cpu_supported() else None


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run here, as the end of a user message; None when it can."""
    if not cpu_supported():
        return f"this CPU is not {requirement()}"
    if not library_path().is_file():
        return f"the kernel is not built: {HOW_TO_BUILD}"
    return None


def find_headers(include_dir: str | Path | None = None) -> Path:
    candidates = [Path(include_dir)] if include_dir else \
        [Path(d) for d in (os.environ.get(INCLUDE_ENV), *HEADER_DIRS) if d]
    for d in candidates:
        if (d / "onnxruntime_c_api.h").is_file():
            return d
    where = ", ".join(str(d) for d in candidates)
    raise RuntimeUserError(f"onnxruntime_c_api.h is not in {where}: install onnxruntime's C API headers (Debian: "
                           f"libonnxruntime-dev) or pass --ort-include DIR (or set {INCLUDE_ENV})")


def build(include_dir: str | Path | None = None, compiler: str | None = None, out: Path | None = None) -> Path:
    """Compile int8_matmul.c into the library `open_session` registers; returns its path.

    The headers may be older than the onnxruntime that loads the library: the C API only grows, and the library
    asks for the version it was compiled against.
    """
    if not cpu_supported():
        raise RuntimeUserError(f"the native int8 kernel is for {requirement()}, which this CPU is not: use the "
                               "portable w8a8 variant here")
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeUserError("no C compiler (cc, gcc or clang) on PATH: install one (Debian: gcc) or set CC")
    headers = find_headers(include_dir)
    out = out or library_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *cflags(), f"-I{headers}", str(SOURCE), "-o", tmp], capture_output=True,
                                text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeUserError(f"compiling {SOURCE.name} with {cc} failed: {first}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
