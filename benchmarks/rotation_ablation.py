"""Which rotations and which smoothing make SmolLM2's static int8 hold up on held-out text: an ablation.

Reads a run directory that `benchmarks/smollm2.py` made (its fused variant and its text/calib.txt, text/eval.txt),
builds the float graph of one configuration, quantizes every weight MatMul to static W8A8 (GPTQ rounding, activation
ranges over prefill and decode steps, as `pipeline quantize --recipe w8a8` does before its budget search), and
prints held-out perplexity increase, top-1 agreement and KL against the fused fp32 graph: all MatMuls static,
then with the 30 down_proj at 8-bit weight-only (MatMulNBits rounded by GPTQ on its grid: what the search's w8
fallback writes).

    python benchmarks/rotation_ablation.py --run runs/smol                       # what w8a8 does by default
    python benchmarks/rotation_ablation.py --run runs/smol --online-block 0 --outlier-channels 0
    python benchmarks/rotation_ablation.py --run runs/smol --rotate none --smooth all --online-block 0

--rotate none|r1r2: QuaRot's R1 (residual stream) and R2 (value heads), folded into the weights
(exporters/rotation.py). --smooth all|down|none: SmoothQuant on every group, on the down_proj inputs only, or
not at all. --outlier-channels N: with smoothing, up to N channels per smoothed activation (those over 4x its
99th-percentile channel peak) split off into a float MatMul (exporters/smoothing.py). --online-block B: the
online block Hadamard before every down_proj (exporters/rotation.py's `online_hadamard`; 0: none), the rotation
that cannot be folded (the SwiGLU product sits between up_proj and down_proj); the smoothing strengths are chosen
for it. --method: activation ranges; --weight-bits 7|8: reduce_range or not. The defaults are `pipeline quantize
--recipe w8a8`'s, and with them the script runs exactly its passes (exporters/quantization/recipes.py) up to the
budget search; the options replace the configs of the `smooth` and `online_hadamard` steps (the recipe ties both
to the rotation). Calibration and held-out windows are as many as the texts hold, up to --calib-windows and 2.
About 5-10 minutes a configuration, 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.onnx_io import save_model_auto  # noqa: E402
from exporters.quantization import passes  # noqa: E402
from exporters.quantization.config import QuantConfig  # noqa: E402
from exporters.quantization.evaluate import agreement, sequences, session_log_probs  # noqa: E402
from exporters.quantization.recipes import RECIPES  # noqa: E402
from pipeline.data import token_windows  # noqa: E402
from pipeline.stages.quantize import split_windows  # noqa: E402
from runtimes.providers import int8_gemm_saturates  # noqa: E402

SMOOTH_GROUPS = {"all": "all", "down": "gated", "none": "none"}  # --smooth -> SmoothConfig.groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory made by benchmarks/smollm2.py")
    p.add_argument("--rotate", choices=["none", "r1r2"], default="r1r2")
    p.add_argument("--smooth", choices=["all", "down", "none"], default="down")
    p.add_argument("--online-block", type=int, default=128)
    p.add_argument("--outlier-channels", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--method", choices=["minmax", "percentile", "entropy"], default=None,
                   help="activation ranges (default: w8a8's, percentile)")
    p.add_argument("--weight-bits", type=int, choices=[7, 8], default=None,
                   help="static int8 weights: 7 (reduce_range) or 8; default: what `pipeline quantize` picks here")
    args = p.parse_args()
    run = Path(args.run)
    fused = run / "variants/fused/model.onnx"
    calib, _ = split_windows(token_windows(run, "calib", str(run / "text/calib.txt"), args.calib_windows + 16, 128),
                             args.calib_windows)
    held_out = token_windows(run, "valid", str(run / "text/eval.txt"), 2, 512)
    config = QuantConfig(recipe="w8a8", num_prefill=args.calib_windows, seq_len=124, num_decode_steps=4,
                         outlier_channels=args.outlier_channels, calibrate_method=args.method,
                         rotate=args.rotate == "r1r2", online_hadamard=args.online_block,
                         reduce_range=int8_gemm_saturates() if args.weight_bits is None else args.weight_bits == 7)
    reference, contract = session_log_probs(fused)
    seqs = sequences(held_out, contract)

    def evaluate(path: Path) -> str:
        a = agreement(reference, session_log_probs(path)[0], seqs)
        return f"held-out ppl {a.ppl_increase:+.2%}, top-1 {a.top1:.3f}, KL {a.kl:.4f}"

    # w8a8's steps, the configs of these two replaced as asked (with the defaults, by what the recipe makes)
    ablated = {"smooth": lambda c: replace(c, groups=SMOOTH_GROUPS[args.smooth], online_block=args.online_block),
               "online_hadamard": lambda c: passes.OnlineHadamardConfig(args.online_block) if args.online_block
               else None}
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = onnx.load(str(fused))
        q = passes.Quantizing(model, fused, work / "model.onnx", work, calib, None, config.exclude)
        q.targets = passes.targets(model, config.exclude)
        for step in RECIPES["w8a8"]:
            if step.name == "search":  # measured below instead: all static, then down_proj weight-only
                break
            if step.name == "targets":  # the float passes are done: exact in float, so ppl +0.00%
                save_model_auto(q.model, work / "float.onnx")
                print(f"float graph: {evaluate(work / 'float.onnx')}", flush=True)
            step_config = step.config(config)
            if step.name in ablated:
                step_config = ablated[step.name](step_config)
            if step_config is not None:
                q = step.run(q, step_config)
        label = (f"rotate {args.rotate}, smooth {args.smooth}, outlier channels <= {args.outlier_channels}, "
                 f"online block {args.online_block or '-'}, {config.calibrate_method} ranges, "
                 f"{7 if config.reduce_range else 8}-bit weights")
        print(f"{label}: all {len(q.targets)} MatMuls static: {evaluate(q.staged)}", flush=True)
        q.write([x for x in q.targets if x.endswith("down_proj/MatMul")])
        print(f"{label}: down_proj 8-bit weight-only: {evaluate(q.staged)} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
