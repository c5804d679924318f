"""Decode speed of the two CPU KV-cache modes on one fused model: copying (`HostCache`) against in place
(`SharedCache`, the default for fused graphs), alternating in one process so that both see the same machine.

    python benchmarks/kv_cache.py runs/smol/variants/fused/model.onnx --prompt-len 1024
    python benchmarks/kv_cache.py runs/smol/variants/w8a8/model.onnx --prompt-len 32 --repeats 10

Prints the median decode ms/token of each timed run and the median over runs, per mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtimes.bench import greedy_calls, timed_run  # noqa: E402
from runtimes.caches import HostCache, SharedCache  # noqa: E402
from runtimes.generate import Generator  # noqa: E402
from runtimes.session import open_session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a fused model.onnx (GroupQueryAttention)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    session = open_session(a.model, threads=a.threads)
    modes = {"copying (HostCache)": Generator(session, io_binding=False), "in place (SharedCache)": Generator(session)}
    if not isinstance(modes["in place (SharedCache)"]._cache, SharedCache):
        sys.exit(f"{a.model} is not a fused graph: its CPU cache is {HostCache.__name__} either way")
    prompt = np.random.default_rng(0).integers(0, session.contract.vocab_size, (1, a.prompt_len))
    times: dict[str, list[float]] = {name: [] for name in modes}
    for g in modes.values():  # warm-up
        timed_run(*greedy_calls(g, prompt, a.new_tokens), a.new_tokens)
    for _ in range(a.repeats):
        for name, g in modes.items():
            steps = timed_run(*greedy_calls(g, prompt, a.new_tokens), a.new_tokens).steps
            times[name].append(float(np.median(steps)) * 1e3)
    print(f"{a.model}: {a.prompt_len}-token prompt, {a.new_tokens} decode steps, {a.threads} threads")
    for name, t in times.items():
        print(f"  {name:24s} {np.median(t):7.2f} ms/token  (runs: {', '.join(f'{x:.2f}' for x in t)})")


if __name__ == "__main__":
    main()
