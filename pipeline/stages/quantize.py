"""Stage `quantize`: a float variant -> an int8 (or int4 weight-only) variant, calibrated on held-out text."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.data import token_windows
from pipeline.manifest import RunDir
from runtimes.providers import int8_gemm_saturates


@dataclass(frozen=True)
class QuantizeStageConfig:
    recipe: str = "w8a8"            # static | w8a8 | w8 | w4
    source: str = ""                # variant to quantize; "" = fused if present, else fp32
    calibrate_method: str | None = None  # minmax | percentile | entropy; None: percentile for w8a8, else minmax
    per_channel: bool = True        # per-output-channel weight scales
    calib_windows: int = 16         # prefill windows of calibration text (each also seeds decode steps); 16 of
                                    # 128 tokens: more tokens than a 1536-wide MatMul has inputs, for GPTQ
    window: int = 128               # tokens per window
    valid_windows: int = 16         # calibration-side validation windows for the sensitivity search (~2k tokens:
                                    # fewer make a 2% perplexity budget noise)
    max_ppl_increase: float = 0.02  # w8a8: largest relative perplexity increase accepted before mixed precision
    block_size: int = 32            # w8/w4: MatMulNBits block size
    accuracy_level: int = 4         # w8/w4: MatMulNBits compute accuracy (4 = int8 activations on CPU)
    calib_text: str | None = None   # text file for calibration instead of the corpus's calib split
    fallback: str = "w8"            # w8a8: sensitive MatMuls become "w8" (int8 weight-only) or stay "float"
    w4_max_ppl_increase: float = 0.08  # w4: MatMuls move to 8 bits, most damaging first, until within this
    weight_rounding: str = "gptq"   # w8a8/w8/w4: "gptq" or "nearest"
    rotate: bool = True             # w8a8: fold randomized Hadamard rotations into the weights first
    outlier_channels: int = 16      # w8a8: most channels per smoothed activation split off into a float MatMul
    online_hadamard: int = 128      # w8a8 with rotate: online Hadamard block before each down_proj (0: none)
    reduce_range: bool | None = None  # static/w8a8: 7-bit weights; None: exactly where this machine's int8
                                    # kernels saturate (x86 without VNNI, runtimes.providers.int8_gemm_saturates)

    def resolved_source(self, run: RunDir) -> str:
        if self.source:
            return self.source
        return "fused" if "fused" in run.variants() else "fp32"


def split_windows(windows: list[list[int]], n_calib: int) -> tuple[list[list[int]], list[list[int]] | None]:
    """Up to `n_calib` calibration windows, the rest validation, interleaved so both sample the whole text.

    Calibration comes first when the text is short: no validation windows then (the search is skipped).
    """
    n_valid = len(windows) - n_calib
    if n_valid <= 0:
        return windows, None
    picks = {int((j + 0.5) * len(windows) / n_valid) for j in range(n_valid)}
    return ([w for i, w in enumerate(windows) if i not in picks],
            [w for i, w in enumerate(windows) if i in picks])


def quantize(run: RunDir, config: QuantizeStageConfig) -> dict:
    from exporters.quantize import QuantConfig, quantize as quantize_model

    source = config.resolved_source(run)
    run.artifact(source)
    n = config.calib_windows + config.valid_windows
    windows = token_windows(run.root, "calib", config.calib_text, n, config.window)
    calib, valid = split_windows(windows, config.calib_windows)
    decode_steps = min(4, config.window // 4)  # each window: a prefill, then decode steps fed its real past KV
    qcfg = QuantConfig(recipe=config.recipe, calibrate_method=config.calibrate_method,
                       num_prefill=config.calib_windows, seq_len=config.window - decode_steps,
                       num_decode_steps=decode_steps,
                       per_channel=config.per_channel, max_ppl_increase=config.max_ppl_increase,
                       block_size=config.block_size, accuracy_level=config.accuracy_level,
                       fallback=config.fallback, w4_max_ppl_increase=config.w4_max_ppl_increase,
                       weight_rounding=config.weight_rounding, rotate=config.rotate,
                       outlier_channels=config.outlier_channels, online_hadamard=config.online_hadamard,
                       reduce_range=int8_gemm_saturates() if config.reduce_range is None else config.reduce_range)
    out = run.variant_path(config.recipe)
    report = quantize_model(run.variant_path(source), out, calib, qcfg, valid_ids=valid)
    run.record("quantize", {**asdict(config), "source": source}, {source: str(run.variant_path(source))},
               {config.recipe: {"kind": "onnx", "path": f"variants/{config.recipe}/model.onnx", "parent": source}},
               report)
    return report
