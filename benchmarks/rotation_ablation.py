"""Which rotations and which smoothing make SmolLM2's static int8 hold up on held-out text: an ablation.

Reads a run directory that `benchmarks/smollm2.py` made (its fused variant and its text/calib.txt, text/eval.txt),
builds the float graph of one configuration, quantizes every weight MatMul to static W8A8 (GPTQ rounding, minmax
ranges over prefill and decode steps, as `pipeline quantize --recipe w8a8` does before its budget search), and
prints held-out perplexity increase, top-1 agreement and KL against the fused fp32 graph: all MatMuls static,
then with the 30 down_proj at 8-bit weight-only.

    python benchmarks/rotation_ablation.py --run runs/smol --rotate r1r2 --smooth down
    python benchmarks/rotation_ablation.py --run runs/smol --rotate none --smooth all --online-block 128

--rotate none|r1r2: QuaRot's R1 (residual stream) and R2 (value heads), folded into the weights
(exporters/rotation.py). --smooth all|down|none: SmoothQuant on every group, on the down_proj inputs only, or
not at all. --online-block B: an online block-diagonal Hadamard (B-wide blocks, random signs) inserted before
every down_proj, the rotation that cannot be folded (the SwiGLU product sits between up_proj and down_proj);
measured and not built into the quantizer (see docs/benchmarks.md). About 10 minutes a configuration, 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.calibration import KVCacheCalibrationReader, cpu_session, session_contract  # noqa: E402
from exporters.quantize import (QuantConfig, StaticJob, _log_probs, _save, _sequences, _smooth_model,  # noqa: E402
                                _targets, _with_value_info, gptq_weights, quantize_qdq, weight_hessians,
                                write_mix)
from exporters.rotation import hadamard, rotate  # noqa: E402
from pipeline.data import token_windows  # noqa: E402
from pipeline.stages.quantize import split_windows  # noqa: E402


def online_hadamard(model: onnx.ModelProto, block: int, seed: int = 0) -> None:
    """x -> (x * signs) reshaped to (..., K/block, block) @ H_block, before every down_proj; its weight absorbs
    the inverse. The Hadamard initializer is 3-D, so the quantizer leaves these MatMuls in float."""
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    h = hadamard(block)
    for node in [n for n in model.graph.node if n.op_type == "MatMul" and "down_proj" in n.name]:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        k, p = w.shape[0], node.name
        signs = rng.choice([-1.0, 1.0], k)
        r = (np.eye(k) * signs).reshape(k, k // block, block) @ h  # x @ r.reshape(k, k) is what the nodes compute
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((r.reshape(k, k).T @ w).astype(np.float32),
                                                              node.input[1]))
        model.graph.initializer.extend([
            numpy_helper.from_array(signs.astype(np.float32), f"{p}/had_signs"),
            numpy_helper.from_array(np.array([0, 0, k // block, block], np.int64), f"{p}/had_blocks"),
            numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{p}/had_flat"),
            numpy_helper.from_array(h[None].astype(np.float32), f"{p}/had_h")])
        added = [helper.make_node("Mul", [node.input[0], f"{p}/had_signs"], [f"{p}/had_0"], name=f"{p}/had_mul"),
                 helper.make_node("Reshape", [f"{p}/had_0", f"{p}/had_blocks"], [f"{p}/had_1"], name=f"{p}/had_r1"),
                 helper.make_node("MatMul", [f"{p}/had_1", f"{p}/had_h"], [f"{p}/had_2"], name=f"{p}/had_mm"),
                 helper.make_node("Reshape", [f"{p}/had_2", f"{p}/had_flat"], [f"{p}/had_3"], name=f"{p}/had_r2")]
        node.input[0] = f"{p}/had_3"
        at = list(model.graph.node).index(node)
        for i, n in enumerate(added):
            model.graph.node.insert(at + i, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory made by benchmarks/smollm2.py")
    p.add_argument("--rotate", choices=["none", "r1r2"], default="r1r2")
    p.add_argument("--smooth", choices=["all", "down", "none"], default="down")
    p.add_argument("--online-block", type=int, default=0)
    p.add_argument("--calib-windows", type=int, default=32)
    args = p.parse_args()
    run = Path(args.run)
    fused = run / "variants/fused/model.onnx"
    calib, _ = split_windows(token_windows(run, "calib", str(run / "text/calib.txt"), args.calib_windows + 16, 128),
                             args.calib_windows)
    held_out = token_windows(run, "valid", str(run / "text/eval.txt"), 2, 512)
    config = QuantConfig(recipe="w8a8", num_prefill=args.calib_windows, seq_len=124, num_decode_steps=4)
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
    if args.smooth != "none":
        _smooth_model(model, reader, config, Path(tempfile.mkdtemp()), rotated=args.smooth == "down")
    if args.online_block:
        online_hadamard(model, args.online_block)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        job = StaticJob(work / "fp32.onnx", work / "calibration.json", reader, config)
        _save(_with_value_info(model), job.fp32_path)
        print(f"float graph: {evaluate(job.fp32_path)}", flush=True)
        targets = _targets(model, ())
        hessians, tokens = weight_hessians(model, targets, reader, work)
        rounded, _ = gptq_weights(model, targets, hessians, tokens, 64)
        job = StaticJob(job.fp32_path, job.cache_path, reader, config, rounded)
        out = work / "w8a8.onnx"
        quantize_qdq(job, targets, out)
        label = f"rotate {args.rotate}, smooth {args.smooth}, online block {args.online_block or '-'}"
        print(f"{label}: all {len(targets)} MatMuls static: {evaluate(out)}", flush=True)
        down = [x for x in targets if "down_proj" in x]
        write_mix(job, [x for x in targets if x not in down], down, out)
        print(f"{label}: down_proj 8-bit weight-only: {evaluate(out)} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
