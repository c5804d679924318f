"""The bundle on an AArch64 device, emulated: the runtime alone (runtimes/, onnxruntime, numpy, tokenizers; no
torch) in an arm64 Python under qemu's user-mode emulator (tests/runtimes/arm64_env.py), against the same
bundles on this x86-64 machine: the logits of a prefill and four decode steps, and the device command's text.

What the two architectures compute differently, measured: the float graph within float rounding; static int8
(w8a8) and the native kernel's sdot path exactly, the latter also exactly equal to onnxruntime's own ARM int8
kernels; 4-bit MatMulNBits within 1% of the largest logit (its x86 and ARM kernels quantize activations per
block with different rounding).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.conftest import make_built_run
from tests.pipeline.test_cli import invoke

REPO = Path(__file__).resolve().parents[2]
PROMPT = "def function_1(x, y):"
PROBE = """
import json, sys
import numpy as np
from runtimes.generate import Generator, load_tokenizer
from runtimes.session import open_session

bundle, prompt = sys.argv[1], sys.argv[2]
ids = load_tokenizer(bundle + "/tokenizer.json").encode(prompt).ids
gen = Generator(open_session(bundle, threads=2))
logits = gen.prefill(ids, capacity=len(ids) + 8)[0]
steps = [logits.tolist()]
for _ in range(4):
    logits = gen.step(int(np.argmax(logits)))[0]
    steps.append(logits.tolist())
import platform
import runtimes
print(json.dumps({"machine": platform.machine(), "logits": steps, "runtimes": runtimes.__file__,
                  "imported": sorted(m for m in ("torch", "transformers", "onnx") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> dict:
    """The emulated device: its qemu, arm64 Python and site packages (downloaded once per session, ~10 s)."""
    dest = tmp_path_factory.mktemp("arm64")
    made = subprocess.run([sys.executable, str(REPO / "tests/runtimes/arm64_env.py"), str(dest)],
                          capture_output=True, text=True, timeout=900)
    if made.returncode != 0:
        pytest.skip(f"no emulated AArch64 environment here: {(made.stderr.strip().splitlines() or ['?'])[-1]}")
    source = dest / "runtimes-src"  # a copy, so pip's in-tree build leaves nothing in the checkout
    shutil.copytree(REPO / "runtimes", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    runtime = dest / "runtime"  # installed as the README says (pip install ./runtimes), for the device
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                str(runtime), str(source)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    return {"qemu": dest / "qemu-aarch64", "root": dest / "root", "path": f"{dest / 'site'}:{runtime}",
            "dir": dest}


def on_device(device: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # nothing of this machine's: its paths, and its native kernel library (an x86-64 build)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIPELINE_KERNELS")}
    return subprocess.run([str(device["qemu"]), "-cpu", "max", "-L", str(device["root"]),
                           str(device["root"] / "usr/bin/python3.11"), *args], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": device["path"], **(env or {})}, timeout=900,
                          cwd=device["dir"])  # not the checkout, whose runtimes/ would shadow the installed one


def probe(bundle: Path, device: dict | None = None, env: dict | None = None) -> dict:
    if device is None:
        run = subprocess.run([sys.executable, "-c", PROBE, str(bundle), PROMPT], capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
    else:
        run = on_device(device, "-c", PROBE, str(bundle), PROMPT, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, text_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arm-bundles")
    run = make_built_run(root, text_file)
    out = {}
    for variant in ("fused", "w8a8", "w4"):
        out[variant] = root / variant
        invoke("package", run, "--variant", variant, "--out", out[variant], "--target", "linux-aarch64")
    return out


@pytest.mark.parametrize("variant, atol", [("fused", 1e-5), ("w8a8", 0.0), ("w4", 0.01)])
def test_the_runtime_on_emulated_aarch64_computes_what_it_computes_here(device, bundles, variant, atol):
    x86, arm = probe(bundles[variant]), probe(bundles[variant], device)
    assert arm["machine"] == "aarch64" and arm["imported"] == []
    assert arm["runtimes"].startswith(str(device["dir"] / "runtime"))  # the installed copy, not the checkout
    a, b = np.array(x86["logits"]), np.array(arm["logits"])
    assert a.shape == b.shape == (5, 256)
    assert np.abs(a - b).max() <= atol * np.abs(a).max()


def test_the_device_command_prints_the_same_text_on_emulated_aarch64(device, bundles):
    args = ["-m", "runtimes", "generate", str(bundles["fused"]), "--prompt", PROMPT, "--max-new-tokens", "12"]
    here = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    there = on_device(device, *args)
    assert here.returncode == there.returncode == 0, there.stderr[-2000:]
    assert there.stdout == here.stdout


def test_the_native_kernels_sdot_path_under_onnxruntime_on_emulated_aarch64(device, bundles, tmp_path,
                                                                            native_kernels):
    """w8a8-native through onnxruntime on the emulated device, our kernel cross-compiled for it: the same
    logits as the x86 kernel and as onnxruntime's own int8 kernels on ARM (w8a8), to the bit."""
    from runtimes import kernels

    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("no AArch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    library = tmp_path / "libpipeline_int8.so"
    built = subprocess.run([cc, *kernels.cflags("aarch64"), f"-I{kernels.find_headers()}", str(kernels.SOURCE),
                            "-o", str(library)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    run = bundles["w8a8"].parent / "run"
    # every MatMul static (a head that did not share the tied table, as 7-bit weights do not, would otherwise move
    # onto BlockInt8MatMul, whose float sum over blocks each build takes in its own order)
    invoke("optimize", run, "--native-int8", "--static-head")
    native = tmp_path / "native"
    invoke("package", run, "--variant", "w8a8-native", "--out", native, "--target", "linux-aarch64")
    arm = probe(native, device, env={kernels.LIBRARY_ENV: str(library)})
    assert arm["machine"] == "aarch64"
    assert arm["logits"] == probe(native)["logits"] == probe(bundles["w8a8"], device)["logits"]
    missing = on_device(device, "-c", PROBE, str(native), PROMPT,
                        env={kernels.LIBRARY_ENV: str(tmp_path / "absent.so")})
    assert missing.returncode != 0 and "native int8 kernel" in missing.stderr  # it did need the library
