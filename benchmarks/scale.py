"""1B-class checkpoints through the pipeline: wall time and peak RSS of every stage, each in its own process.

Builds the published configs of Llama-3.2-1B, Qwen2.5-1.5B, Qwen3-1.7B and Gemma-3-1B with random weights,
stored as their checkpoints
are (bfloat16, sharded safetensors with model.safetensors.index.json), without ever holding the model: each
shard's tensors are drawn and written one shard at a time. Then runs

    export -> optimize -> quantize (w4, w8a8) -> check -> bench -> package

as `python -m pipeline ...` children and reads each child's own peak RSS from os.wait4. A stage that fails or
is killed (the out-of-memory killer) is recorded as such, and the stages after it that need its output are
skipped. `--stages` picks a prefix, `--timeout` bounds each stage. Prints a markdown table for
docs/benchmarks.md and writes the rows as JSON beside the run.

    python benchmarks/scale.py --model llama-3.2-1b --out /tmp/scale --stages export,quantize-w4-nearest,check

`quantize-w8-nearest` and `quantize-w4-nearest` are the weight-only recipes rounded to nearest and only
measured (`--no-search`); `quantize-w8`, `quantize-w4` and `quantize-w8a8` run the defaults (GPTQ, the search),
which quantize's own estimate refuses up front where they do not fit; `quantize-w8a8-no-search` is w8a8's
defaults written and measured without the search.
`--max-memory GiB` is passed on to quantize (to measure past its estimate). `llamacpp-peers` makes llama.cpp's
Q8_0 and Q4_K_M of the same weights (its converter, given by `--llamacpp-convert`, and its quantizer), where
`bench --compare llamacpp,llamacpp:q4_k_m` finds them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the published config.json of each model (only the fields the decoder reads), random weights
CONFIGS = {
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16"},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
        "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
        "torch_dtype": "bfloat16"},
    "qwen3-1.7b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28,
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
        "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1,
        "pad_token_id": 0, "torch_dtype": "bfloat16"},
}
STAGES = ("export", "llamacpp-peers", "optimize", "quantize-w8-nearest", "quantize-w4-nearest", "quantize-w8",
          "quantize-w4", "quantize-w8a8-no-search", "quantize-w8a8", "check", "bench", "package")
SHARD_BYTES = 1 << 30


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, n = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // n
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if cfg["model_type"] in ("qwen3", "gemma3_text"):
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if cfg["model_type"] == "gemma3_text":
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (n * hd, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, n * hd),
                       p + "mlp.gate_proj.weight": (cfg["intermediate_size"], h),
                       p + "mlp.up_proj.weight": (cfg["intermediate_size"], h),
                       p + "mlp.down_proj.weight": (h, cfg["intermediate_size"])})
        if cfg["model_type"] == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (n * hd,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def write_checkpoint(name: str, out: Path, tokenizer: Path | None, cfg: dict | None = None) -> Path:
    """Random bf16 weights in ~1 GB shards, an index, the config; norms near one, matrices N(0, 0.02). `cfg`:
    a config of the same fields in place of the named model's."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").is_file():
        return out
    cfg = cfg or CONFIGS[name]
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard, size, weight_map, shards = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        if shard:
            shards.append(dict(shard))
            save_file(shard, str(out / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    for tname, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g) if tname.endswith("norm.weight") else \
                0.02 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        shard[tname] = t.to(torch.bfloat16)
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = len(shards)
    for k, part in enumerate(shards, 1):
        final = out / f"model-{k:05d}-of-{total:05d}.safetensors"
        (out / f"part-{k:05d}.safetensors").rename(final)
        weight_map.update(dict.fromkeys(part, final.name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out


def llamacpp_peers(ckpt: Path, out: Path, run: Path, convert: Path | None) -> None:
    """llama.cpp's files of the same weights, for `bench --compare llamacpp,llamacpp:q4_k_m`: the checkpoint
    converted by llama.cpp's own convert_hf_to_gguf.py (bf16, OUT/MODEL-bf16.gguf), then quantized by its
    llama_model_quantize to Q8_0 (RUN/peers/model.gguf) and Q4_K_M (RUN/peers/q4_k_m.gguf)."""
    from smollm2 import llamacpp_quantize

    if convert is None or not convert.is_file():
        sys.exit("llamacpp-peers needs --llamacpp-convert: llama.cpp's convert_hf_to_gguf.py (in llama.cpp's "
                 "sources, e.g. llama-cpp-python's sdist under vendor/llama.cpp)")
    bf16 = out / f"{ckpt.name}-bf16.gguf"
    if not bf16.exists():
        tmp = bf16.with_name(f".{bf16.name}.tmp")
        # the converter imports its own gguf-py and conversion package, which sit beside it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(convert.parent / "gguf-py"), str(convert.parent)])}
        subprocess.run([sys.executable, str(convert), str(ckpt), "--outtype", "bf16", "--outfile", str(tmp)],
                       env=env, check=True)
        tmp.rename(bf16)
    llamacpp_quantize(bf16, run / "peers" / "model.gguf", "MOSTLY_Q8_0")
    llamacpp_quantize(bf16, run / "peers" / "q4_k_m.gguf", "MOSTLY_Q4_K_M")


def run_stage(args: list[str], timeout: float, command: list[str] | None = None) -> dict:
    """`python -m pipeline ARGS` (or `command`) in a child: {"seconds", "peak_rss_gb", "exit"} from the child's
    own rusage."""
    print("$ " + (" ".join(command[1:]) if command else "pipeline " + " ".join(args)), file=sys.stderr, flush=True)
    command = command or [sys.executable, "-m", "pipeline", *args]
    start = time.perf_counter()
    # files, not pipes: a child that prints more than a pipe holds (llama.cpp's quantizer logs every tensor)
    # would block on a pipe nobody reads until it exits
    out_file, err_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    child = subprocess.Popen(command, stdout=out_file, stderr=err_file, start_new_session=True)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    out, err = (f.seek(0) or f.read().decode(errors="replace") for f in (out_file, err_file))
    code = os.waitstatus_to_exitcode(status)
    row = {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "exit": code,
           "stdout": out[-1500:], "stderr": err[-1500:]}
    if code < 0:
        row["killed_by"] = signal.Signals(-code).name + (" (timeout)" if seconds >= timeout else "")
    print(f"  {row['seconds']} s, peak RSS {row['peak_rss_gb']} GB, exit {code}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="llama-3.2-1b")
    ap.add_argument("--out", type=Path, required=True, help="working directory (checkpoint, run, bundle)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {', '.join(STAGES)}")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage before it is killed")
    ap.add_argument("--max-memory", type=float, help="GiB passed to quantize's --max-memory (to measure a stage "
                    "its own estimate would refuse)")
    ap.add_argument("--calib-text", type=Path, help="calibration text (default: this Python's LICENSE)")
    ap.add_argument("--text", type=Path, help="evaluation text for check (default: this Python's idlelib NEWS)")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json to ship with the checkpoint (the bench "
                    "and package stages need one; ids beyond it are never produced)")
    ap.add_argument("--llamacpp-convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py, for the "
                    "llamacpp-peers stage (it also needs llama-cpp-python, and sentencepiece for the converter)")
    ap.add_argument("--checkpoint-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-peers-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.checkpoint_only:
        write_checkpoint(a.model, a.out / a.model, a.tokenizer)
        return
    if a.llamacpp_peers_only:
        llamacpp_peers(a.out / a.model, a.out, a.out / f"run-{a.model}", a.llamacpp_convert)
        return
    stages = [s for s in a.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        sys.exit(f"unknown stages: {', '.join(unknown)}")
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib = a.calib_text or stdlib / "LICENSE.txt"
    text = a.text or stdlib / "idlelib" / "NEWS.txt"
    t0 = time.perf_counter()
    # in a child: a process's peak RSS counts its parent's pages at fork, so this one stays small
    subprocess.run([sys.executable, __file__, "--checkpoint-only", "--model", a.model, "--out", str(a.out)]
                   + (["--tokenizer", str(a.tokenizer)] if a.tokenizer else []), check=True)
    ckpt = a.out / a.model
    print(f"checkpoint {ckpt} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    run = a.out / f"run-{a.model}"
    max_memory = ["--max-memory", str(a.max_memory)] if a.max_memory else []
    commands = {
        "export": ["export", "--model", str(ckpt), "--out", str(run), "--json"],
        "optimize": ["optimize", str(run), "--json"],
        # weight-only, rounded to nearest and measured, no search: the forms that hold one float copy
        "quantize-w8-nearest": ["quantize", str(run), "--recipe", "w8", "--weight-rounding", "nearest",
                                "--calib-text", str(calib), "--json", *max_memory],
        "quantize-w4-nearest": ["quantize", str(run), "--recipe", "w4", "--weight-rounding", "nearest", "--no-search",
                                "--calib-text", str(calib), "--json", *max_memory],
        # the defaults: GPTQ (streamed Hessians), and w4's search on its exact 4/8-bit switch
        "quantize-w8": ["quantize", str(run), "--recipe", "w8", "--calib-text", str(calib), "--json", *max_memory],
        "quantize-w4": ["quantize", str(run), "--recipe", "w4", "--calib-text", str(calib), "--json", *max_memory],
        "quantize-w8a8": ["quantize", str(run), "--recipe", "w8a8", "--calib-text", str(calib), "--json",
                          *max_memory],
        # w8a8 with its defaults (rotations, smoothing, GPTQ) written and measured, without the search
        "quantize-w8a8-no-search": ["quantize", str(run), "--recipe", "w8a8", "--no-search", "--calib-text",
                                    str(calib), "--json", *max_memory],
        "check": ["check", str(run), "--text", str(text), "--json"],
        "bench": ["bench", str(run), "--threads", "2", "--prompt-len", "32", "--new-tokens", "32", "--json"],
        "package": ["package", str(run), "--out", str(a.out / f"bundle-{a.model}")],
    }
    rows = {}
    peers = [sys.executable, __file__, "--llamacpp-peers-only", "--model", a.model, "--out", str(a.out)] + (
        ["--llamacpp-convert", str(a.llamacpp_convert)] if a.llamacpp_convert else [])
    for stage in stages:
        rows[stage] = run_stage(commands.get(stage, []), a.timeout, peers if stage == "llamacpp-peers" else None)
        if rows[stage]["exit"] not in (0, 1) and stage in ("export",):
            break
    (a.out / f"scale-{a.model}.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{a.model} (random weights, bf16 sharded), {os.cpu_count()} cores:\n")
    print("| stage | wall | peak RSS | result |\n|---|---|---|---|")
    for stage, r in rows.items():
        result = "ok" if r["exit"] == 0 else r.get("killed_by") or (r["stderr"].strip().splitlines() or ["?"])[-1]
        print(f"| {stage} | {r['seconds']:.0f} s | {r['peak_rss_gb']:.2f} GB | {result} |")


if __name__ == "__main__":
    main()
