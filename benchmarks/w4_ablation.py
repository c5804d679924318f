"""Which 4-bit grid and which float passes make SmolLM2's w4 hold up on held-out text: an ablation.

Reads a run directory that `benchmarks/smollm2.py` made (its fused variant and its text/calib.txt, text/eval.txt),
quantizes the fused graph with `--recipe w4` as `pipeline quantize` does (GPTQ rounding, the 8-bit head, the
calibration text split into 16 calibration and 16 validation windows of 128 tokens), in one configuration, and
prints the file size, the share of weight-MatMul FLOPs left at 4 bits and held-out perplexity increase, top-1
agreement and KL against the fused fp32 graph, on text/eval.txt (2 windows of 512 tokens) and on each --text.

    python benchmarks/w4_ablation.py --run runs/smol                                 # w4's defaults
    python benchmarks/w4_ablation.py --run runs/smol --zero-points --no-search       # every MatMul at 4 bits
    python benchmarks/w4_ablation.py --run runs/smol --no-rotate --no-search
    python benchmarks/w4_ablation.py --run runs/smol --validation tail               # the search judged elsewhere

--zero-points: 4-bit blocks spanning their [min, max] with a zero point each (`pipeline quantize --zero-points`);
default symmetric. --no-search: every MatMul but the head at 4 bits, measured; default: the budget search moves
MatMuls to 8 bits, most damaging first, until the calibration-side validation windows are within 8% perplexity
and check's top-1 and KL. Rotations, as `pipeline quantize` does by default: w8a8's rotations folded into the
float weights before GPTQ (QuaRot's R1 and R2, exporters/rotation.py, and the online 128-wide Hadamard before
every down_proj); --no-rotate: none. --validation tail: the search judges on the calibration text's second half
(16 windows spread over it) and GPTQ calibrates on its first half, instead of the two interleaved. About 2-4
minutes a configuration, 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.onnx_io import files_size  # noqa: E402
from exporters.quantization.evaluate import agreement, sequences, session_log_probs  # noqa: E402
from exporters.quantize import QuantConfig, quantize  # noqa: E402
from pipeline.data import token_windows  # noqa: E402
from pipeline.stages.quantize import split_windows  # noqa: E402

CALIB, VALID, WINDOW = 16, 16, 128  # `pipeline quantize`'s defaults


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory made by benchmarks/smollm2.py")
    p.add_argument("--zero-points", action="store_true", help="4-bit blocks with zero points")
    p.add_argument("--no-search", dest="search", action="store_false", help="every MatMul but the head at 4 bits")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the rotations in first (quantize's default; --no-rotate: not)")
    p.add_argument("--validation", choices=("interleaved", "tail"), default="interleaved",
                   help="the search's validation windows: interleaved with the calibration windows (quantize's "
                   "way), or the text's second half, documents GPTQ never saw")
    p.add_argument("--text", action="append", default=[], help="another held-out text (4 windows of 512)")
    args = p.parse_args()
    run = Path(args.run)
    fused = run / "variants/fused/model.onnx"
    windows = token_windows(run, "calib", str(run / "text/calib.txt"), CALIB + VALID, WINDOW)
    calib, valid = split_windows(windows, CALIB) if args.validation == "interleaved" else \
        (windows[:CALIB], windows[CALIB:])
    reference, contract = session_log_probs(fused)
    texts = [("eval.txt", sequences(token_windows(run, "valid", str(run / "text/eval.txt"), 2, 512), contract))]
    for extra in args.text:
        texts.append((Path(extra).name, sequences(token_windows(run, "valid", extra, 4, 512), contract)))
    label = (f"{'zero points' if args.zero_points else 'symmetric'}, {'rotated' if args.rotate else 'not rotated'}, "
             f"{'searched' if args.search else 'all 4-bit'}"
             f"{', validation on the tail' if args.validation == 'tail' and args.search else ''}")
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, out = fused, work / "w4" / "model.onnx"
        config = QuantConfig(recipe="w4", num_prefill=CALIB, seq_len=WINDOW - 4, num_decode_steps=4,
                             zero_points=args.zero_points, search=args.search, rotate=args.rotate)
        report = quantize(source, out, calib, config, valid)
        print(f"{label}: {files_size(out) / 1e6:.1f} MB, {report['quantized_flop_share']:.0%} of weight-MatMul "
              f"FLOPs at 4 bits, "
              f"calibration-side ppl {report['ppl']['increase']:+.2%}", flush=True)
        got = session_log_probs(out)[0]
        for name, seqs in texts:
            a = agreement(reference, got, seqs)
            print(f"{label}: {name}: ppl {a.ppl_increase:+.2%}, top-1 {a.top1:.3f}, KL {a.kl:.4f}", flush=True)
    print(f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
