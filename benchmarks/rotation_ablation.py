"""Which rotations and which smoothing make SmolLM2's static int8 hold up on held-out text: an ablation.

Reads a run directory that `benchmarks/smollm2.py` made (its fused variant and its text/calib.txt, text/eval.txt),
builds the float graph of one configuration, quantizes every weight MatMul to static W8A8 (GPTQ rounding, minmax
ranges over prefill and decode steps, as `pipeline quantize --recipe w8a8` does before its budget search), and
prints held-out perplexity increase, top-1 agreement and KL against the fused fp32 graph: all MatMuls static,
then with the 30 down_proj at 8-bit weight-only.

    python benchmarks/rotation_ablation.py --run runs/smol                       # what w8a8 does by default
    python benchmarks/rotation_ablation.py --run runs/smol --online-block 0 --outlier-channels 0
    python benchmarks/rotation_ablation.py --run runs/smol --rotate none --smooth all --online-block 0

--rotate none|r1r2: QuaRot's R1 (residual stream) and R2 (value heads), folded into the weights
(exporters/rotation.py). --smooth all|down|none: SmoothQuant on every group, on the down_proj inputs only, or
not at all. --outlier-channels N: with smoothing, up to N channels per smoothed activation (those over 4x its
99th-percentile channel peak) split off into a float MatMul (exporters/smoothing.py). --online-block B: the
online block Hadamard before every down_proj (exporters/rotation.py's `online_hadamard`; 0: none), the rotation
that cannot be folded (the SwiGLU product sits between up_proj and down_proj). --method: activation ranges;
--weight-bits 7|8: reduce_range or not. The defaults are `pipeline quantize --recipe w8a8`'s. About 5-10
minutes a configuration, 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.calibration import KVCacheCalibrationReader, cpu_session, session_contract  # noqa: E402
from exporters.quantize import (QuantConfig, StaticJob, _log_probs, _save, _sequences, _smooth_model,  # noqa: E402
                                _targets, _with_value_info, gptq_weights, quantize_qdq, weight_hessians,
                                write_mix)
from exporters.rotation import online_hadamard, rotate  # noqa: E402
from exporters.smoothing import find_smooth_groups, outlier_matmuls  # noqa: E402
from pipeline.data import token_windows  # noqa: E402
from pipeline.stages.quantize import split_windows  # noqa: E402
from runtimes.providers import int8_gemm_saturates  # noqa: E402


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
    reader = KVCacheCalibrationReader(fused, calib, config.plan)
    ref = cpu_session(fused)
    contract = session_contract(ref)
    seqs = _sequences(held_out, contract)
    refs = [_log_probs(ref, contract, s) for s in seqs]

    def evaluate(path: Path) -> str:
        session = cpu_session(path)
        nll = ref_nll = n = agree = kl = 0.0
        for ids, r in zip(seqs, refs):
            lp = _log_probs(session, contract, ids)
            at = np.arange(ids.size - 1)
            nll -= lp[at, ids[1:]].sum()
            ref_nll -= r[at, ids[1:]].sum()
            n += ids.size - 1
            agree += (lp.argmax(-1) == r.argmax(-1)).sum()
            kl += (np.exp(r) * (r - lp)).sum()
        return f"held-out ppl {np.exp(nll / n) / np.exp(ref_nll / n) - 1:+.2%}, top-1 {agree / n:.3f}, KL {kl / n:.4f}"

    t = time.time()
    model = onnx.load(str(fused))
    rotated = args.rotate == "r1r2" and rotate(model).residual
    gated = [m for g in find_smooth_groups(model) if g.first_column is not None for m in g.matmuls]
    if args.smooth != "none":
        _smooth_model(model, reader, config, Path(tempfile.mkdtemp()), rotated=args.smooth == "down")
    if args.online_block:
        online_hadamard(model, gated, args.online_block)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        job = StaticJob(work / "fp32.onnx", work / "calibration.json", reader, config)
        _save(_with_value_info(model), job.fp32_path)
        print(f"float graph: {evaluate(job.fp32_path)}", flush=True)
        split_off = outlier_matmuls(model)
        targets = [t for t in _targets(model, ()) if t not in split_off]
        hessians, tokens = weight_hessians(model, targets, reader, work)
        rounded, _ = gptq_weights(model, targets, hessians, tokens, 64 if config.reduce_range else 127)
        job = StaticJob(job.fp32_path, job.cache_path, reader, config, rounded)
        out = work / "w8a8.onnx"
        quantize_qdq(job, targets, out)
        label = (f"rotate {args.rotate}, smooth {args.smooth}, outlier channels <= {args.outlier_channels}, "
                 f"online block {args.online_block or '-'}, {config.calibrate_method} ranges, "
                 f"{7 if config.reduce_range else 8}-bit weights")
        print(f"{label}: all {len(targets)} MatMuls static: {evaluate(out)}", flush=True)
        down = [x for x in targets if x.endswith("down_proj/MatMul")]
        write_mix(job, [x for x in targets if x not in down], down, out)
        print(f"{label}: down_proj 8-bit weight-only: {evaluate(out)} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
