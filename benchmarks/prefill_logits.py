"""Prefill of a long prompt against the runtime before the edge-memory work, on the same files in one run.

"before": the whole prompt in one run through the copying cache (`HostCache`), every position's logits
computed and returned, as the runtime did when issue "Edge memory" was filed. "now": the default generation
loop (the in-place cache, 256-token chunks, the last position's logits only, `logits_to_keep`). Each
configuration runs in a child process of its own, every file's and mode's in turn each round (so the rows of
several files compare too), so each peak RSS is its own; prints prefill ms (median of the repeats), the ratio and
the peak, and checks that both give the same last-position logits.

    python benchmarks/prefill_logits.py runs/smol/variants/w8a8-native/model.onnx --prompt-len 1536
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("before", "now")


def child(path: str, mode: str, prompt_len: int, threads: int, out: str) -> None:
    import numpy as np

    from runtimes.generate import Generator
    from runtimes.providers import cpu
    from runtimes.session import open_session

    session = open_session(path, cpu(threads=threads))
    if mode == "before":
        gen = Generator(session, io_binding=False)
        gen._keeps_last = False  # every position's logits, as before logits_to_keep
    else:
        gen = Generator(session)
    prompt = np.random.default_rng(0).integers(0, session.contract.vocab_size, prompt_len)
    t0 = time.perf_counter()
    logits = gen.prefill(prompt, capacity=prompt_len + 1)
    ms = (time.perf_counter() - t0) * 1e3
    np.save(out, logits)
    print(json.dumps({"prefill_ms": ms, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="+", help="model.onnx files (fused graphs)")
    ap.add_argument("--prompt-len", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.model[0], a.child[0], a.prompt_len, a.threads, a.child[1])
        return
    print(f"prompt {a.prompt_len} tokens, {a.threads} threads, median of {a.repeats} alternating runs\n")
    print("| model | before: prefill ms / peak MB | now | prefill before / now | last logits max diff |")
    print("|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = {(model, mode): [] for model in a.model for mode in MODES}
    for _ in range(a.repeats):  # every file and mode in turn in each round, so files compare with each other too
        for i, (model, mode) in enumerate(rows):
            out = f"/tmp/prefill-{os.getpid()}-{i}.npy"
            p = subprocess.run([sys.executable, __file__, model, "--prompt-len", str(a.prompt_len), "--threads",
                                str(a.threads), "--child", mode, out], capture_output=True, text=True, env=env,
                               check=True)
            rows[model, mode].append(json.loads(p.stdout.strip().splitlines()[-1]))
    import numpy as np

    for k, model in enumerate(a.model):
        last = {m: np.load(f"/tmp/prefill-{os.getpid()}-{2 * k + j}.npy") for j, m in enumerate(MODES)}
        diff = float(np.abs(last["before"] - last["now"]).max())
        ms = {m: statistics.median(r["prefill_ms"] for r in rows[model, m]) for m in MODES}
        peak = {m: max(r["peak_mb"] for r in rows[model, m]) for m in MODES}
        print(f"| {Path(model).parent.name} | {ms['before']:.0f} / {peak['before']:.0f} | {ms['now']:.0f} / "
              f"{peak['now']:.0f} | {ms['before'] / ms['now']:.2f}× | {diff:.2g} |", flush=True)

if __name__ == "__main__":
    main()
