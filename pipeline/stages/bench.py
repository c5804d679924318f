"""Stage `bench`: every ONNX variant and the peers (PyTorch eager, Optimum, llama.cpp) in the same run.

Each measurement runs in its own subprocess (`python -m runtimes bench`, `python -m pipeline.peers`) so peak
memory is that runner's alone and one runner's allocator cannot warm another's caches. Timings on a shared
machine are noisy: read them as ratios within one run (the table prints decode speed-up over PyTorch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from models.errors import UserError
from pipeline import options, progress
from pipeline.manifest import RunDir
from pipeline.options import check_options, fits_context, option


MAX_REPEATS = 1000  # timed repetitions: a median of more says nothing new


@dataclass(frozen=True)
class BenchConfig:
    variant: tuple[str, ...] = options.variants("benchmark")
    provider: str = options.provider()
    threads: int = options.threads()  # for every runner, ours and the peers
    prompt_len: int = option(int, 32, "Prompt tokens (prefill).", lo=1)
    new_tokens: int = option(int, 64, "Decode steps timed.", lo=1)
    warmup: int = option(int, 2, "Untimed runs after the first (cold) one, before the timed repeats.", lo=0,
                         hi=MAX_REPEATS)
    # 5: fewer say too little about the spread, and the row is marked noisy (runtimes.bench.MIN_REPEATS)
    repeats: int = option(int, 5, "Timed repetitions (medians and min-max spread reported).", lo=1, hi=MAX_REPEATS)
    compare: tuple[str, ...] = option(str, ("pytorch",), "Peers measured in the same run: pytorch, optimum, "
                                      "llamacpp, or none; repeat the flag or separate by commas.", many=True)
    timeout_s: int = option(int, 1800, "Seconds each runner may take.", lo=1)

    def __post_init__(self):
        check_options(self)
        object.__setattr__(self, "compare", tuple(c for c in self.compare if c != "none"))


def run_json(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> dict:
    """Run a measuring subprocess; its last stdout line is one JSON object."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return {"error": lines[-1].removeprefix("error: ") if lines else f"exit {p.returncode}"}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "runner printed no JSON"}


def bench_variant(path: Path, config: BenchConfig, cache_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "runtimes", "bench", str(path), "--provider", config.provider,
           "--threads", str(config.threads), "--prompt-len", str(config.prompt_len),
           "--new-tokens", str(config.new_tokens), "--warmup", str(config.warmup), "--repeats", str(config.repeats),
           "--json"]
    if config.provider == "tensorrt":  # engines and timing caches live in the run, reused by the next bench
        cmd += ["--trt-cache-dir", str(cache_dir)]
    return run_json(cmd, config.timeout_s)


def peer_model(run: RunDir, peer: str) -> str:
    """What a peer loads: the source checkpoint. llama.cpp needs a .gguf file; Optimum exports from a Hugging Face
    directory, so a .gguf source is written out once as one (run/peers/hf, the dequantized float weights)."""
    source = run.artifact("source")["path"]
    if peer == "llamacpp" and not source.endswith(".gguf"):
        gguf = run.root / "peers" / "model.gguf"
        if not gguf.exists():
            raise UserError("llama.cpp needs a .gguf model: export from a .gguf file, or put one at "
                            f"{gguf}")
        return str(gguf)
    if peer == "optimum" and source.endswith(".gguf"):
        return str(hf_directory(source, run.root / "peers" / "hf"))
    return source


def checkpoint_tensors(model) -> dict:
    """The state dict as a checkpoint stores it: a tensor shared by several names (tied embeddings) once, under
    its first name, `model.embed_tokens.weight`, which is what transformers reads and ties `lm_head` to.
    (safetensors' save_model keeps `lm_head.weight` instead; transformers 4.57 then leaves the input embedding
    on the meta device, and Optimum's export fails on it.)"""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.contiguous()
    return tensors


def hf_directory(gguf: str, out: Path) -> Path:
    """The GGUF model as a Hugging Face checkpoint directory (weights, config, tokenizer), written atomically."""
    from safetensors.torch import save_file

    from models.files import publish, staging_dir
    from models.hf import export_tokenizer, load_hf_reference

    if (out / "config.json").is_file():
        return out
    with staging_dir(out) as staging:
        tmp = staging / out.name
        tmp.mkdir()
        model = load_hf_reference(gguf)
        # save_pretrained refuses a model that came from a GGUF ("not serializable"); its weights are plain
        # float tensors once loaded, so write them and the config directly
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(checkpoint_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        export_tokenizer(gguf, tmp)
        publish(tmp, out)
    return out


def bench_peer(run: RunDir, peer: str, config: BenchConfig) -> dict:
    from pipeline.peers import INSTALL, available, command

    if peer not in INSTALL:
        raise UserError(f"unknown peer {peer!r}: choose from {', '.join(sorted(INSTALL))}")
    if not available(peer):
        return {"missing": True, "install": INSTALL[peer]}
    cmd, env = command(peer, peer_model(run, peer), "--threads", str(config.threads),
                       "--prompt-len", str(config.prompt_len), "--new-tokens", str(config.new_tokens),
                       "--warmup", str(config.warmup), "--repeats", str(config.repeats))
    return run_json(cmd, config.timeout_s, env)


def bench(run: RunDir, config: BenchConfig) -> dict:
    from runtimes.providers import resolve

    resolve(config.provider)  # an unknown or absent provider fails here, with its install line
    names = list(config.variant) or run.variants()
    if not names:
        raise UserError(f"run {run.root} has no ONNX variants to benchmark: run `pipeline export` first")
    paths = {n: run.verified(n) for n in names}
    for n, path in paths.items():
        fits_context("prompt_len + new_tokens", config.prompt_len + config.new_tokens, path, n)
    rows = {}
    runners = [*config.compare, *paths]
    for name in progress.each(runners, "bench", unit="runner"):
        rows[name] = (bench_variant(paths[name], config, run.root / "cache" / config.provider / name)
                      if name in paths else bench_peer(run, name, config))
    base = rows.get("pytorch", {}).get("decode_ms_p50")
    for r in rows.values():
        if base and r.get("decode_ms_p50"):
            r["decode_speedup_vs_pytorch"] = base / r["decode_ms_p50"]
    failed = [name for name, r in rows.items() if r.get("error")]
    results = {"provider": config.provider, "threads": config.threads, "prompt_len": config.prompt_len,
               "new_tokens": config.new_tokens, "rows": rows, "failed": failed, "passed": not failed}
    run.record("bench", asdict(config), {n: str(p) for n, p in paths.items()}, results)
    return results


def render_table(results: dict) -> str:
    head = (f"{'runner':<12} {'prefill ms':>10} {'decode p50':>10} {'p90':>7} {'tok/s':>7} {'x pytorch':>9} "
            f"{'peak MB':>8} {'file MB':>8}")
    lines = [f"provider {results['provider']}, {results['threads']} threads, batch 1, "
             f"{results['prompt_len']}-token prompt, {results['new_tokens']} decode steps", head, "-" * len(head)]
    for name, r in results["rows"].items():
        if r.get("missing"):
            lines.append(f"{name:<12} not installed: {r['install']}")
        elif r.get("error"):
            lines.append(f"{name:<12} error: {r['error']}")
        else:
            size = f"{r['file_bytes'] / 1e6:>8.2f}" if r.get("file_bytes") else f"{'-':>8}"
            speedup = r.get("decode_speedup_vs_pytorch")  # absent when PyTorch was not compared
            speedup = f"{speedup:>8.2f}x" if speedup else f"{'-':>9}"
            lines.append(f"{name:<12} {r['prefill_ms']:>10.2f} {r['decode_ms_p50']:>10.2f} {r['decode_ms_p90']:>7.2f} "
                         f"{r['tokens_per_s']:>7.1f} {speedup} {r['peak_rss_mb']:>8.0f} {size}")
    return "\n".join(lines)
