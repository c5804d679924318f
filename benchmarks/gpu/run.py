"""The GPU check in one prepared run: CUDA (and TensorRT, where it loads) against PyTorch on the same GPU.

For each model shape (random weights from the published config: timing needs no real weights, and real ones are
too large to carry): write the checkpoint (bf16, sharded, as published), `pipeline export` (the built, fused
graph) and `pipeline optimize --fp16`, then
  1. check: fp16 logits of onnxruntime's CUDA provider against PyTorch fp16 on the same GPU, on random token
     windows, judged by the thresholds `check` uses for fused-fp16 (exporters/acceptance.py);
  2. bench: prefill at --prompt-len tokens and decode ms/token (median step) for onnxruntime with
     - io_binding: the KV cache on the device, rebound step to step (runtimes.caches `BoundCache`),
     - static: the fixed-capacity cache on the device (`StaticCache`),
     - cuda_graph: the same with every decode step replaying one captured CUDA graph (`cuda(graph=True)`),
     and for PyTorch eager fp16 (its dynamic cache) and, with --torch-compile, `generate` with a static cache
     and the forward under torch.compile (mode reduce-overhead), as users run it;
  3. on the first shape, the user's own commands on the provider, small: `pipeline check --variant fused-fp16
     --provider cuda` and `pipeline bench --variant fused-fp16 --provider cuda --cuda-graph` (a byte-level
     tokenizer of 256 ids goes with each checkpoint: random weights come with none);
  4. the targets of issue "CUDA and TensorRT figures": decode >= 2x eager (io_binding / static) and >= 3x with
     CUDA graphs, prefill no slower than eager, fp16 logits within check's tolerance.
Then TensorRT: its provider is asked for and, where its libraries are absent, the exact reason is recorded.
Everything goes to OUT/gpu.json, rewritten after every step, so a run cut short still reports what it did.
Steps whose files exist in --work are not redone (a rerun on the warm machine starts at the benchmarks).
`--provider cpu` runs the same code on the CPU (the rehearsal here, and the tests).

Rehearsal plan (device time is 15 minutes for all calls together; the machine goes back 30 s after a call):
  here, once:  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                 --platform manylinux_2_28_x86_64 -d /tmp/w onnxruntime-gpu==1.31.1      (255.6 MB, CUDA 13)
               echo /.gpu/ >> .git/info/exclude
               python benchmarks/gpu/wheels.py split /tmp/w/onnxruntime_gpu-*.whl --out .gpu  (5 parts of 56 MiB)
               python benchmarks/gpu/run.py --provider cpu --model tiny --out /tmp/gpu-rehearsal  (the tests do it)
  device:      `status` first (free): can_start_another must be true.
    calls 1-5  run(command="ls -l .gpu/*", carry=[".gpu/p00"]) ... carry=[".gpu/p04"], back to back: the
               first starts the machine (1-2 min), each later one moves 56 MiB (seconds); parts stay on the warm
               machine because no later call names their folders
    call 6     run(command="bash benchmarks/gpu/device.sh --model smollm2-135m --model llama-3.2-1b",
               timeout_s=420): joins and checks the wheel, installs it beside the image's torch 2.11, runs this
               script with --budget 360; about 4-6 min (1B: checkpoint 20 s, export 60-90 s, fp16 60 s,
               benches 60 s), which leaves one rerun (call 6 again: its --work files are reused) within 15 min
    then       give_back; figures from OUT/gpu.json into docs/benchmarks.md ("On a GPU").
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE.parent)]

from scale import CONFIGS, write_checkpoint  # noqa: E402  (benchmarks/scale.py)

# a shape small enough for the CPU rehearsal and the tests (its own name; the others are published configs)
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 256, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
MODES = ("io_binding", "static", "cuda_graph")
TARGETS = {"decode_vs_eager": 2.0, "decode_vs_eager_cuda_graph": 3.0, "prefill_vs_eager": 1.0}


class Report:
    """gpu.json, rewritten after every step."""

    def __init__(self, out: Path, args: dict):
        self.path = out / "gpu.json"
        self.data = {"args": args, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}}
        self.start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def step(self, where: dict, key: str, fn, *args, record: bool = True, **kwargs):
        """where[key] = fn(...) (or {} where not `record`: a value that is no figure), or {"error": ...} where it
        raised; the report saved either way. Returns the value, or None where it raised."""
        t0 = time.perf_counter()
        print(f"[{self.elapsed():5.0f} s] {key} ...", file=sys.stderr, flush=True)
        try:
            value = fn(*args, **kwargs)
            where[key] = value if record else {}
        except Exception as e:  # one step's failure is a figure of this check, not the end of it
            value = None
            where[key] = {"error": f"{type(e).__name__}: {e}"[:2000],
                          "where": traceback.format_exc(limit=3)[-1500:]}
        if isinstance(where[key], dict):
            where[key].setdefault("seconds", round(time.perf_counter() - t0, 1))
        self.save()
        return value

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def environment(provider: str) -> dict:
    import numpy
    import onnxruntime as ort

    env = {"python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": numpy.__version__,
           "onnxruntime_providers": ort.get_available_providers(), "provider": provider}
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = None
    return env


def preload_cuda_libraries() -> str:
    """onnxruntime-gpu finds CUDA and cuDNN in the pip packages torch brought (onnxruntime >= 1.21)."""
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        return "onnxruntime has no preload_dlls"
    ort.preload_dlls()
    return "preloaded"


def pipeline(*args: str, ok: tuple[int, ...] = (0,)) -> dict:
    """`python -m pipeline ARGS --json` in a child; its JSON result (and exit code where `ok` allows more than
    0, as check's 1 for a missed threshold), or the error it printed."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline", *args, "--json"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [*os.environ.get("PYTHONPATH", "").split(os.pathsep), str(ROOT)]).strip(os.pathsep)})
    if p.returncode not in ok:
        raise RuntimeError(f"pipeline {args[0]} exited {p.returncode}: {p.stderr.strip()[-800:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "exit": p.returncode,
            "result": json.loads(p.stdout) if p.stdout.strip() else None}


def pipeline_commands(run: str, provider: str) -> dict:
    """The user's own commands on the provider, small: `check` of the fp16 variant (PyTorch as its reference,
    its fused-fp16 thresholds) and `bench` of it (with CUDA graphs on CUDA)."""
    check = pipeline("check", run, "--variant", "fused-fp16", "--provider", provider, "--windows", "2", "--window",
                     "128", "--steps", "8", ok=(0, 1))
    row = check["result"]["variants"][0]
    graph = ["--cuda-graph"] if provider == "cuda" else []
    bench = pipeline("bench", run, "--variant", "fused-fp16", "--provider", provider, *graph, "--compare", "none",
                     "--prompt-len", "128", "--new-tokens", "32", "--repeats", "3")
    b = bench["result"]["rows"]["fused-fp16"]
    return {"check": {k: row.get(k) for k in ("provider", "max_abs_diff", "top1", "kl", "failed")},
            "check_exit": check["exit"], "check_s": check["seconds"],
            "bench": {k: b.get(k) for k in ("provider_in_use", "prefill_ms", "decode_ms_p50", "peak_rss_mb", "error")},
            "bench_s": bench["seconds"], "cuda_graph": bool(graph)}


def byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json of 256 ids (every shape's vocabulary holds them): the pipeline's check and
    bench tokenize text, and a random-weight checkpoint has no tokenizer of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def prepare(name: str, cfg: dict, work: Path) -> dict:
    """Checkpoint, export (built, fused) and the fp16 variant; steps whose outputs exist are kept."""
    ckpt, run = work / name, work / f"run-{name}"
    t0 = time.perf_counter()
    write_checkpoint(name, ckpt, byte_tokenizer(work / "tokenizer.json"), cfg)
    out = {"checkpoint_s": round(time.perf_counter() - t0, 1)}
    if not (run / "variants" / "fused" / "model.onnx").is_file():
        out["export"] = pipeline("export", "--model", str(ckpt), "--out", str(run))["seconds"]
    if not (run / "variants" / "fused-fp16" / "model.onnx").is_file():
        out["optimize_fp16"] = pipeline("optimize", str(run), "--fp16")["seconds"]
    out["checkpoint"], out["fp32"], out["fp16"] = (str(ckpt), str(run / "variants" / "fused" / "model.onnx"),
                                                   str(run / "variants" / "fused-fp16" / "model.onnx"))
    return out


def torch_model(ckpt: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def spec_for(provider: str, mode: str = "io_binding"):
    from runtimes.providers import cpu, cuda

    if provider == "cpu":
        return cpu()
    return cuda(graph=mode == "cuda_graph")


def check_fp16(model, path: str, provider: str, vocab: int, windows: int, window: int) -> dict:
    """fp16 logits of the provider against PyTorch's on the same device, teacher-forced on random windows."""
    import numpy as np
    import torch

    from exporters.acceptance import THRESHOLDS
    from pipeline.stages.check import compare_logits, prefill_logits
    from runtimes.session import open_session

    session = open_session(path, spec_for(provider))
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(windows):
        ids = rng.integers(0, vocab, (1, window))
        with torch.no_grad():
            ref = model(torch.from_numpy(ids).to(model.device)).logits[0].float().cpu().numpy()
        got = prefill_logits(session, ids).astype(np.float32)
        rows.append(compare_logits(ref[:-1].astype(np.float64), got[:-1].astype(np.float64), ids[0, 1:]))
    t = THRESHOLDS["fused-fp16"]
    r = {"provider": session.provider, "windows": windows, "window": window,
         "max_abs_diff": max(w["max_abs_diff"] for w in rows),
         "top1": float(np.mean([w["top1"] for w in rows])), "kl": float(np.mean([w["kl"] for w in rows])),
         "thresholds": {"max_abs_diff": t.max_abs_diff, "min_top1": t.min_top1, "max_kl": t.max_kl}}
    r["passed"] = bool(r["max_abs_diff"] <= t.max_abs_diff and r["top1"] >= t.min_top1 and r["kl"] <= t.max_kl)
    return r


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_onnx(path: str, provider: str, mode: str, prompt, new_tokens: int, repeats: int) -> dict:
    """Prefill ms and decode ms/token (the median step) of one cache mode, after one warm-up generation (which
    is also when a CUDA graph is captured)."""
    import numpy as np

    from runtimes.generate import Generator
    from runtimes.session import open_session

    session = open_session(path, spec_for(provider, mode))
    gen = Generator(session, io_binding=True, static=mode != "io_binding")
    capacity = len(prompt) + new_tokens + 1
    prefill, steps = [], []
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        logits = gen.prefill(prompt, capacity=capacity)
        t1 = time.perf_counter()
        times = []
        for _ in range(new_tokens):
            s = time.perf_counter()
            logits = gen.step(int(np.argmax(logits[0])))
            times.append(time.perf_counter() - s)
        if k:  # the first is the warm-up
            prefill.append((t1 - t0) * 1e3)
            steps.append(statistics.median(times) * 1e3)
    return {"provider": session.provider, "prefill_ms": statistics.median(prefill),
            "decode_ms": statistics.median(steps), "decode_ms_min": min(steps), "decode_ms_max": max(steps)}


def bench_torch_eager(model, prompt, new_tokens: int, repeats: int) -> dict:
    """PyTorch eager: prefill (last position's logits), then one forward per token with its dynamic cache."""
    import torch

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    ids = torch.tensor([prompt], device=model.device)
    # transformers renamed the forward's past_key_values to cache (5.2x); the device's may be older
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefill, steps = [], []
    with torch.no_grad():
        for k in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.item()
            t1 = time.perf_counter()
            past, times = getattr(out, name), []
            for _ in range(new_tokens):
                s = time.perf_counter()
                out = model(token, use_cache=True, **{name: past})
                past, token = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
                token.item()
                times.append(time.perf_counter() - s)
            if k:
                prefill.append((t1 - t0) * 1e3)
                steps.append(statistics.median(times) * 1e3)
    return {"prefill_ms": statistics.median(prefill), "decode_ms": statistics.median(steps),
            "decode_ms_min": min(steps), "decode_ms_max": max(steps)}


def bench_torch_compiled(model, prompt, new_tokens: int, repeats: int) -> dict:
    """`generate` with a static cache and the forward under torch.compile (reduce-overhead: CUDA graphs), as
    users run it: decode ms/token from generating N tokens against 1, after two warm-ups (the compilation)."""
    import torch

    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor([prompt], device=model.device)
    kwargs = {"do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def generate(n: int) -> float:
        sync()
        ms = timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs))
        sync()
        return ms

    t0 = time.perf_counter()
    generate(new_tokens), generate(new_tokens)
    compile_s = time.perf_counter() - t0
    one = statistics.median(generate(1) for _ in range(repeats))
    full = statistics.median(generate(new_tokens) for _ in range(repeats))
    return {"compile_s": round(compile_s, 1), "first_token_ms": one,
            "decode_ms": (full - one) / max(new_tokens - 1, 1)}


def tensorrt_attempt(path: str) -> dict:
    """Ask onnxruntime for TensorRT; where it does not load, why (runtimes.providers `load_failure`: not in the
    build, or the library onnxruntime could not open); where it does, a few greedy tokens of the fp16 graph."""
    import onnxruntime as ort

    from runtimes.generate import greedy_tokens
    from runtimes.providers import TENSORRT_EP, load_failure, tensorrt
    from runtimes.session import open_session

    why = load_failure(TENSORRT_EP)
    out = {"listed": TENSORRT_EP in ort.get_available_providers(), "loaded": why is None, "reason": why}
    if why is None:
        session = open_session(path, tensorrt(fp16=True, cache_dir="/tmp/trt_cache"))
        out["provider"], out["tokens"] = session.provider, greedy_tokens(session, [1, 2, 3, 4], 4)
    return out


def targets(bench: dict, check: dict | None) -> dict:
    eager = bench.get("torch_eager") or {}
    out = {}
    for mode in MODES:
        r = bench.get(mode) or {}
        if "decode_ms" in r and "decode_ms" in eager:
            need = TARGETS["decode_vs_eager_cuda_graph" if mode == "cuda_graph" else "decode_vs_eager"]
            speed = eager["decode_ms"] / r["decode_ms"]
            out[f"decode_{mode}_vs_eager"] = {"ratio": round(speed, 2), "target": need, "met": speed >= need}
        if "prefill_ms" in r and "prefill_ms" in eager:
            ratio = eager["prefill_ms"] / r["prefill_ms"]
            out[f"prefill_{mode}_vs_eager"] = {"ratio": round(ratio, 2), "target": TARGETS["prefill_vs_eager"],
                                               "met": ratio >= TARGETS["prefill_vs_eager"]}
    if check and "passed" in check:
        out["fp16_logits_within_check"] = {"met": check["passed"]}
    return out


def run_model(report: Report, name: str, cfg: dict, a, first: bool = False) -> None:
    import numpy as np

    entry = report.data["models"].setdefault(name, {"config": {k: cfg[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")}})
    files = report.step(entry, "prepare", prepare, name, cfg, a.work)
    if files is None:
        return
    device = "cuda" if a.provider == "cuda" else "cpu"
    model = report.step(entry, "torch_load", torch_model, files["checkpoint"], device, a.dtype, record=False)
    entry["torch_load"].update(device=device, dtype=a.dtype)
    path = files["fp16"] if a.dtype == "float16" else files["fp32"]
    check = None
    if model is not None:
        check = report.step(entry, "check", check_fp16, model, path, a.provider, cfg["vocab_size"], a.windows,
                            a.window)
    prompt = np.random.default_rng(1).integers(0, cfg["vocab_size"], a.prompt_len).tolist()
    bench = entry.setdefault("bench", {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                                       "repeats": a.repeats})
    for mode in MODES if a.provider == "cuda" else MODES[:2]:
        report.step(bench, mode, bench_onnx, path, a.provider, mode, prompt, a.new_tokens, a.repeats)
    if model is not None:
        report.step(bench, "torch_eager", bench_torch_eager, model, prompt, a.new_tokens, a.repeats)
        if a.torch_compile and report.elapsed() < a.budget - a.compile_reserve:
            report.step(bench, "torch_compile", bench_torch_compiled, model, prompt, a.new_tokens, a.repeats)
        elif a.torch_compile:
            bench["torch_compile"] = {"skipped": f"less than {a.compile_reserve:.0f} s of the budget left"}
    if first and report.elapsed() < a.budget:  # the pipeline's own commands, on the first shape only
        report.step(entry, "pipeline_commands", pipeline_commands, str(Path(files["fp16"]).parents[2]), a.provider)
    entry["targets"] = targets(bench, check)
    report.save()
    del model


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where gpu.json goes ($OUT on the device)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpuwork"), help="checkpoints and runs (kept: a "
                    "rerun reuses them)")
    ap.add_argument("--model", action="append", default=[], help=f"shape(s): {', '.join(CONFIGS)}, tiny "
                    "(default: smollm2-135m and llama-3.2-1b)")
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the rehearsal (the same code, the CPU provider standing in)")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=2, help="check: random token windows")
    ap.add_argument("--window", type=int, default=256, help="check: tokens per window")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd generate")
    ap.add_argument("--tensorrt", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--budget", type=float, default=360.0, help="seconds; optional steps are skipped past it")
    ap.add_argument("--compile-reserve", type=float, default=120.0, help="seconds torch.compile is given")
    a = ap.parse_args(argv)
    a.model = a.model or ["smollm2-135m", "llama-3.2-1b"]
    unknown = [m for m in a.model if m not in CONFIGS and m != "tiny"]
    if unknown:
        ap.error(f"unknown model shape(s) {', '.join(unknown)}: choose from {', '.join([*CONFIGS, 'tiny'])}")
    for flag in ("prompt_len", "new_tokens", "repeats", "windows", "window"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    report = Report(a.out, {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()})
    report.step(report.data, "environment", environment, a.provider)
    if a.provider == "cuda":
        report.step(report.data, "cuda_libraries", lambda: {"status": preload_cuda_libraries()})
    for name in a.model:
        if report.elapsed() > a.budget:
            report.data["models"][name] = {"skipped": "past the time budget"}
            continue
        run_model(report, name, TINY if name == "tiny" else CONFIGS[name], a, first=name == a.model[0])
    if a.tensorrt:
        fp16 = next((m["prepare"]["fp16"] for m in report.data["models"].values()
                     if isinstance(m.get("prepare"), dict) and "fp16" in m["prepare"]), None)
        if fp16 is not None:
            report.step(report.data, "tensorrt", tensorrt_attempt, fp16)
    report.data["finished"] = True
    report.save()
    print(json.dumps({n: m.get("targets") for n, m in report.data["models"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
