"""A real model's bundles on an emulated AArch64 device, against this machine (as tests/pipeline/test_device_arm64.py
does for a tiny model): logits of a prefill and decode steps, and the greedy tokens, for each variant.

    python benchmarks/arm64.py runs/smol --variants fused,w8a8,w4,w8a8-native --out /tmp/arm

Packages each variant (`--target linux-aarch64`), fetches the emulated device once into OUT/device
(tests/runtimes/arm64_env.py: an arm64 Python under qemu 10, onnxruntime's aarch64 wheel), installs the runtime
there from ./runtimes, cross-compiles the native kernel for it when a w8a8-native variant is asked for
(gcc-aarch64-linux-gnu), and prints one Markdown row per variant. Emulation says nothing about speed: on a board,
`python -m runtimes bench BUNDLE --prompt-len 32 --new-tokens 64`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROBE = """
import json, sys
import numpy as np
from runtimes.generate import Generator, load_tokenizer
from runtimes.session import open_session

bundle, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = load_tokenizer(bundle + "/tokenizer.json").encode(prompt).ids
gen = Generator(open_session(bundle, threads=2))
logits = gen.prefill(ids, capacity=len(ids) + steps + 1)[0]
rows, tokens = [logits.tolist()], []
for _ in range(steps):
    tokens.append(int(np.argmax(logits)))
    logits = gen.step(tokens[-1])[0]
    rows.append(logits.tolist())
print(json.dumps({"logits": rows, "tokens": tokens}))
"""


def sh(*args, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if run.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:4]))} ... failed:\n{run.stderr[-2000:]}")
    return run


def device(out: Path, native: bool) -> dict:
    dest = out / "device"
    sh(sys.executable, REPO / "tests/runtimes/arm64_env.py", dest)
    runtime = dest / "runtime"
    if not runtime.exists():
        source = out / "runtimes-src"
        shutil.copytree(REPO / "runtimes", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        sh(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", runtime, source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIPELINE_KERNELS")}
    env["PYTHONPATH"] = f"{dest / 'site'}:{runtime}"
    if native:
        from runtimes import kernels
        from runtimes.errors import RuntimeUserError

        try:
            kernels.find_headers()
        except RuntimeUserError as e:
            sys.exit(f"w8a8-native on the device needs the kernel cross-compiled: {e}")
        library = out / "libpipeline_int8-aarch64.so"
        sh("aarch64-linux-gnu-gcc", *kernels.cflags("aarch64"), f"-I{kernels.find_headers()}", kernels.SOURCE,
           "-o", library)
        env[kernels.LIBRARY_ENV] = str(library)
    return {"cmd": [dest / "qemu-aarch64", "-cpu", "max", "-L", dest / "root", dest / "root/usr/bin/python3.11"],
            "env": env, "cwd": dest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--variants", default="fused,w8a8,w4")
    p.add_argument("--out", default="runs/arm64")
    p.add_argument("--prompt", default="The GNU Free Documentation License is a form of copyleft")
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    variants = a.variants.split(",")
    arm = device(out, any(v.endswith("-native") for v in variants))
    print("| variant | max abs logit difference (x86-64 vs AArch64) | relative to the largest logit | greedy tokens "
          "equal |\n|---|---|---|---|")
    for v in variants:
        bundle = out / v
        sh(sys.executable, "-m", "pipeline", "package", a.run, "--variant", v, "--out", bundle,
           "--target", "linux-aarch64")
        here = json.loads(sh(sys.executable, "-c", PROBE, bundle, a.prompt, a.steps).stdout.splitlines()[-1])
        there = json.loads(sh(*arm["cmd"], "-c", PROBE, bundle, a.prompt, a.steps, env=arm["env"],
                              cwd=arm["cwd"]).stdout.splitlines()[-1])
        x, y = np.array(here["logits"]), np.array(there["logits"])
        diff = float(np.abs(x - y).max())
        print(f"| {v} | {diff:.3g} | {diff / float(np.abs(x).max()):.2g} | "
              f"{'yes' if here['tokens'] == there['tokens'] else 'no: ' + str(here['tokens']) + ' / ' + str(there['tokens'])} |",
              flush=True)


if __name__ == "__main__":
    main()
