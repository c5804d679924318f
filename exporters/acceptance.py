"""What a variant must keep of the float model's behaviour, per variant kind: one table read by both `check`
(pipeline/stages/check.py, against PyTorch on held-out text) and quantize's budget search (exporters/quantization/,
against the float ONNX model on calibration-side text), so that what quantize accepts, check passes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float | None = None   # largest |logit difference| allowed (None: not judged)
    min_top1: float = 0.0               # teacher-forced top-1 agreement with PyTorch
    max_kl: float | None = None         # mean KL(PyTorch || ONNX) per token, nats
    max_ppl_increase: float | None = None  # relative perplexity increase over PyTorch
    min_greedy_match: float = 0.0       # share of greedy decode tokens equal to PyTorch's (prefix-aligned)


# fp32 graphs must be exact to float rounding; fp16 to half-precision rounding; int8 keeps the model's quality.
THRESHOLDS = {
    "fp32": Thresholds(max_abs_diff=1e-3, min_top1=0.999, max_kl=1e-5, max_ppl_increase=0.001, min_greedy_match=1.0),
    "fused": Thresholds(max_abs_diff=1e-3, min_top1=0.999, max_kl=1e-5, max_ppl_increase=0.001, min_greedy_match=1.0),
    "fused-fp16": Thresholds(max_abs_diff=0.1, min_top1=0.98, max_kl=2e-3, max_ppl_increase=0.01),
    # float32 weights with a float16 KV cache (`optimize --kv-fp16`); a quantized -kv16 is judged as its source
    "fused-kv16": Thresholds(max_abs_diff=0.5, min_top1=0.99, max_kl=1e-4, max_ppl_increase=0.002),
    "w8a8": Thresholds(min_top1=0.90, max_kl=0.05, max_ppl_increase=0.05),
    "static": Thresholds(min_top1=0.85, max_kl=0.10, max_ppl_increase=0.10),
    "w8": Thresholds(min_top1=0.95, max_kl=0.02, max_ppl_increase=0.02),
    "w4": Thresholds(min_top1=0.85, max_kl=0.10, max_ppl_increase=0.10),
    # a GGUF's own blocks: only the int8 activations of MatMulNBits' accuracy level 4 differ from the reference
    "gguf": Thresholds(min_top1=0.95, max_kl=0.02, max_ppl_increase=0.02),
}
