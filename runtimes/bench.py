"""Latency and memory of one model variant on one provider: prefill, per-token decode, cold start, peak RSS.

Peak RSS is the process's high-water mark, so it is only honest for one variant per process: the orchestrator
runs `python -m runtimes bench MODEL --json` once per variant, each in a fresh subprocess.

The first run is timed apart from the rest (`cold_start_ms` = session creation + first run): on TensorRT that
is where engines are built, or loaded from the cache on later runs; warmup and repeats measure steady state.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import RuntimeUserError
from runtimes.generate import Generator, check_request
from runtimes.providers import ProviderSpec, cpu
from runtimes.session import open_session, resolve_model_path


@dataclass(frozen=True)
class RunTimes:
    """One timed generation: the prompt's prefill and every decode step, in seconds."""
    prefill: float
    steps: tuple[float, ...]


def timed_run(prefill: Callable[[], Any], step: Callable[[Any], Any], new_tokens: int) -> RunTimes:
    """`prefill() -> state`, then `new_tokens` greedy `step(state) -> state` calls, each timed on its own.

    The one timing harness of every runner in a bench table, ours and the peers (pipeline/peers.py), so their
    figures mean the same thing."""
    clock = time.perf_counter
    start = clock()
    state = prefill()
    prefilled = clock() - start
    steps = []
    for _ in range(new_tokens):
        start = clock()
        state = step(state)
        steps.append(clock() - start)
    return RunTimes(prefilled, tuple(steps))


def greedy_calls(generator: Generator, prompt: np.ndarray, new_tokens: int) -> tuple[Callable, Callable]:
    """(prefill, step) for timed_run / measure: `prompt` (B, S) with room for `new_tokens`, then greedy steps."""
    return (lambda: generator.prefill(prompt, capacity=prompt.shape[1] + new_tokens),
            lambda logits: generator.step(logits.argmax(axis=-1)))


NOISY_SPREAD = 0.10  # (max - min) / median of the repeats' decode figures above this: the row is not to be trusted
MIN_REPEATS = 5      # fewer timed repeats than this say too little about the spread to call a row steady


def spread(values: list[float]) -> tuple[float, float, float]:
    """(min, median, max) of the per-repeat figures."""
    return min(values), float(np.median(values)), max(values)


def noisy_reason(decode_ms_repeats: list[float]) -> str | None:
    """Why a row's decode figure is not to be trusted, or None: too few repeats, or a spread over NOISY_SPREAD."""
    if len(decode_ms_repeats) < MIN_REPEATS:
        return f"fewer than {MIN_REPEATS} repeats ({len(decode_ms_repeats)})"
    low, mid, high = spread(decode_ms_repeats)
    if mid > 0 and (high - low) / mid > NOISY_SPREAD:
        return f"decode spread {(high - low) / mid:.1%} (over {NOISY_SPREAD:.0%})"
    return None


def measure(prefill: Callable[[], Any], step: Callable[[Any], Any], new_tokens: int, warmup: int, repeats: int,
            batch: int = 1) -> dict:
    """One cold run (timed apart), `warmup` untimed runs, then `repeats` timed ones, summarized:
    prefill_ms is the median over repeats; decode_ms_p50/p90 are over every decode step of every repeat;
    tokens_per_s counts all sequences of the batch over the median decode time of a repeat.

    The spread over the repeats: prefill_ms_min/max, and decode_ms_min/max over each repeat's median step
    (decode_ms_repeats lists them). `noisy` is true, with `noisy_reason`, when (max - min) / median of those
    exceeds NOISY_SPREAD or there are fewer than MIN_REPEATS repeats."""
    first = timed_run(prefill, step, new_tokens)
    for _ in range(warmup):
        timed_run(prefill, step, new_tokens)
    runs = [timed_run(prefill, step, new_tokens) for _ in range(repeats)]
    steps_ms = np.array([s for r in runs for s in r.steps]) * 1e3
    prefill_ms = [r.prefill * 1e3 for r in runs]
    decode_ms = [float(np.median(r.steps)) * 1e3 for r in runs]
    reason = noisy_reason(decode_ms)
    return {"first_run_ms": (first.prefill + sum(first.steps)) * 1e3,
            "prefill_ms": spread(prefill_ms)[1],
            "prefill_ms_min": min(prefill_ms),
            "prefill_ms_max": max(prefill_ms),
            "prefill_ms_repeats": prefill_ms,
            "decode_ms_p50": float(np.percentile(steps_ms, 50)),
            "decode_ms_p90": float(np.percentile(steps_ms, 90)),
            "decode_ms_min": min(decode_ms),
            "decode_ms_max": max(decode_ms),
            "decode_ms_repeats": decode_ms,
            "noisy": reason is not None,
            "noisy_reason": reason,
            "tokens_per_s": batch * new_tokens / float(np.median([sum(r.steps) for r in runs]))}


def model_bytes(path: Path) -> int:
    """The model file plus its external-data file (`<name>.data`, as the exporter writes it), if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB.

    Linux: VmHWM from /proc/self/status, which belongs to this process image. ru_maxrss is not: the kernel
    carries it across fork and exec, so a runner started by a big parent (the pipeline after training) would
    report the parent's peak. Elsewhere ru_maxrss is the best there is (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise RuntimeUserError(f"{name} is {value}: it must be at least 1")


def bench_model(model_path: str | Path, spec: ProviderSpec | None = None, prompt_len: int = 32,
                new_tokens: int = 64, warmup: int = 2, repeats: int = 5, threads: int | None = 2,
                batch: int = 1, seed: int = 0) -> dict:
    """Time `model_path` on `spec` (default CPU) with a random prompt; one flat, JSON-ready dict (see measure)."""
    _require_positive(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, batch=batch)
    if warmup < 0:
        raise RuntimeUserError(f"warmup is {warmup}: it must be 0 or more")
    spec = spec or cpu()
    path = resolve_model_path(model_path)
    start = time.perf_counter()
    session = open_session(path, spec, threads)
    created = time.perf_counter() - start
    check_request(session, prompt_len, new_tokens)
    generator = Generator(session)
    prompt = np.random.default_rng(seed).integers(0, session.contract.vocab_size, (batch, prompt_len))
    times = measure(*greedy_calls(generator, prompt, new_tokens), new_tokens, warmup, repeats, batch)
    return {
        "model": str(path),
        "provider": spec.name,
        "provider_in_use": session.provider,
        "threads": threads,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "kv_dtype": session.kv_dtype.name,
        "session_create_ms": created * 1e3,
        "cold_start_ms": created * 1e3 + times["first_run_ms"],
        **times,
        "file_bytes": model_bytes(path),
        "peak_rss_mb": peak_rss_mb(),
    }
