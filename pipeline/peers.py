"""Peers measured in the same run as our variants, each in a fresh process so peak memory is its own.

    python -m pipeline.peers pytorch  SOURCE --threads 2 --prompt-len 32 --new-tokens 64
    python -m pipeline.peers llamacpp MODEL.gguf ...
    python -m pipeline.peers optimum  SOURCE ...

Each prints one JSON object with the same keys as `python -m runtimes bench`: prefill_ms, decode_ms_p50,
decode_ms_p90, tokens_per_s, peak_rss_mb. A peer that is not installed is reported as missing, not faked.

Optimum (optimum-onnx) pins transformers < 4.58, older than this project needs, so it cannot share our
environment: it runs from its own interpreter, named by PIPELINE_OPTIMUM_PYTHON (the module is put on that
interpreter's path; it needs only numpy and onnxruntime from us, which optimum brings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes.bench import measure, peak_rss_mb

PEERS = {"pytorch": "torch", "optimum": "optimum.onnxruntime", "llamacpp": "llama_cpp"}
OPTIMUM_PYTHON = "PIPELINE_OPTIMUM_PYTHON"
INSTALL = {"pytorch": "pip install torch==2.13.0",
           "optimum": "optimum-onnx pins transformers<4.58, so give it its own environment: python -m venv ENV "
                      "&& ENV/bin/pip install 'torch<2.9' 'optimum-onnx[onnxruntime]' 'transformers<4.58' (its Llama "
                      "export fails in torch 2.13's tracer), "
                      f"then export {OPTIMUM_PYTHON}=ENV/bin/python",
           "llamacpp": "pip install 'edge-pipeline[llamacpp]' (llama-cpp-python builds from source, ~10 minutes)"}
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # holds the pipeline and runtimes packages


def interpreter(peer: str) -> str:
    """The Python that runs `peer`: ours, or for Optimum the one PIPELINE_OPTIMUM_PYTHON names."""
    return (os.environ.get(OPTIMUM_PYTHON) or sys.executable) if peer == "optimum" else sys.executable


def available(peer: str) -> bool:
    python = interpreter(peer)
    if python != sys.executable:
        try:
            return subprocess.run([python, "-c", f"import {PEERS[peer]}"], capture_output=True,
                                  timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    try:
        return importlib.util.find_spec(PEERS[peer]) is not None
    except ModuleNotFoundError:
        return False


def command(peer: str, model: str, *options: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that measure `peer` in a fresh process of its own interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return [interpreter(peer), "-m", "pipeline.peers", peer, model, *options], env


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """The same deterministic prompt every runner uses (ids drawn away from special tokens)."""
    return np.random.default_rng(seed).integers(min(100, vocab // 2), vocab - 1, n).tolist()


def timed(prefill: Callable[[], object], step: Callable[[object], object], new_tokens: int, warmup: int,
          repeats: int) -> dict:
    """runtimes.bench's harness (the same runs, warm-ups and summaries as our variants') and this process's peak."""
    return {**measure(prefill, step, new_tokens, warmup, repeats), "peak_rss_mb": peak_rss_mb()}


def bench_pytorch(source: str, threads: int, prompt_len: int, new_tokens: int, warmup: int, repeats: int) -> dict:
    import torch

    from models.hf import cache_keyword, load_hf_reference

    torch.set_num_threads(threads)
    model = load_hf_reference(source)
    ids = torch.tensor([prompt_ids(model.config.vocab_size, prompt_len)])
    key = cache_keyword()

    def greedy(out):  # (past, next token)
        return out[key], out.logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        return timed(lambda: greedy(model(ids, use_cache=True)),
                     lambda st: greedy(model(st[1], **{key: st[0]}, use_cache=True)),
                     new_tokens, warmup, repeats)


def bench_llamacpp(gguf: str, threads: int, prompt_len: int, new_tokens: int, warmup: int, repeats: int) -> dict:
    from llama_cpp import Llama

    n_ctx = prompt_len + new_tokens + 8
    # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores, indexed by position (the whole prompt
    # still goes through in one batch, as llama.cpp's own tools do)
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                verbose=False)
    ids = prompt_ids(llm.n_vocab(), prompt_len)

    def prefill() -> None:
        llm.reset()
        llm.eval(ids)

    def step(_) -> None:
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    return {**timed(prefill, step, new_tokens, warmup, repeats), **gguf_identity(gguf, llm.metadata)}


def gguf_identity(gguf: str, metadata: dict) -> dict:
    """Which file llama.cpp ran and its weight type (general.file_type, by llama.cpp's own names): a row that
    says "llama.cpp" must say what it measured."""
    import llama_cpp

    names = {getattr(llama_cpp, n): n.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
             for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_") and isinstance(getattr(llama_cpp, n), int)}
    ftype = metadata.get("general.file_type")
    return {"model": str(Path(gguf).resolve()), "file_bytes": Path(gguf).stat().st_size,
            "gguf_type": names.get(int(ftype), f"file_type {ftype}") if ftype is not None else None}


def bench_optimum(source: str, threads: int, prompt_len: int, new_tokens: int, warmup: int, repeats: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(source, export=True, session_options=opts)
    ids = torch.tensor([prompt_ids(model.config.vocab_size, prompt_len)])

    def greedy(out, n):  # (past, next token, tokens so far)
        return out.past_key_values, out.logits[:, -1:].argmax(-1), n

    def step(st):
        past, tok, n = st
        mask = torch.ones(1, n + 1, dtype=torch.int64)
        return greedy(model(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True), n + 1)

    return timed(lambda: greedy(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True), prompt_len),
                 step, new_tokens, warmup, repeats)


RUNNERS = {"pytorch": bench_pytorch, "llamacpp": bench_llamacpp, "optimum": bench_optimum}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.peers")
    p.add_argument("peer", choices=sorted(RUNNERS))
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    if not available(a.peer):
        print(json.dumps({"missing": True, "install": INSTALL[a.peer]}))
        return 0
    result = RUNNERS[a.peer](a.model, a.threads, a.prompt_len, a.new_tokens, a.warmup, a.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
