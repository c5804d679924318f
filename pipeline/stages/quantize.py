"""Stage `quantize`: a float variant -> an int8 (or int4 weight-only) variant, calibrated on held-out text."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.errors import UserError
from pipeline.data import token_windows
from pipeline.manifest import RunDir
from pipeline.validation import fits_context, flag, number, text
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

    def __post_init__(self):
        number("calib_windows", self.calib_windows, 1, MAX_WINDOWS)
        number("valid_windows", self.valid_windows, 0, MAX_WINDOWS)
        number("window", self.window, MIN_WINDOW)
        text("source", self.source)
        text("calib_text", self.calib_text, optional=True)
        flag("reduce_range", self.reduce_range, optional=True)
        for name in ("per_channel", "rotate"):
            flag(name, getattr(self, name))
        for name in ("block_size", "accuracy_level", "outlier_channels", "online_hadamard"):
            number(name, getattr(self, name))
        for name in ("max_ppl_increase", "w4_max_ppl_increase"):
            number(name, getattr(self, name), 0, integer=False)
        self.quant_config(reduce_range=False)  # the quantizer's own checks, before any work

    @property
    def decode_steps(self) -> int:
        return min(4, self.window // 4)  # each window: a prefill, then decode steps fed its real past KV

    def quant_config(self, reduce_range: bool):
        from exporters.quantize import QuantConfig

        return QuantConfig(recipe=self.recipe, calibrate_method=self.calibrate_method,
                           num_prefill=self.calib_windows, seq_len=self.window - self.decode_steps,
                           num_decode_steps=self.decode_steps,
                           per_channel=self.per_channel, max_ppl_increase=self.max_ppl_increase,
                           block_size=self.block_size, accuracy_level=self.accuracy_level,
                           fallback=self.fallback, w4_max_ppl_increase=self.w4_max_ppl_increase,
                           weight_rounding=self.weight_rounding, rotate=self.rotate,
                           outlier_channels=self.outlier_channels, online_hadamard=self.online_hadamard,
                           reduce_range=reduce_range)

    def resolved_source(self, run: RunDir) -> str:
        if self.source:
            return self.source
        return "fused" if "fused" in run.variants() else "fp32"


MAX_WINDOWS = 4096  # calibration / validation windows: more than any calibration text here fills
MIN_WINDOW = 8      # tokens per calibration window: a prefill and at least two decode steps


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
    from exporters.quantize import quantize as quantize_model

    source = config.resolved_source(run)
    if source == config.recipe:
        raise UserError(f"--source {source} would be replaced by its own {config.recipe} variant: quantize a float "
                        "variant (fp32 or fused)")
    with run.transaction() as tx:
        source_path = tx.read(source)
        fits_context("window", config.window, source_path, source)
        qcfg = config.quant_config(int8_gemm_saturates() if config.reduce_range is None else config.reduce_range)
        n = config.calib_windows + config.valid_windows
        windows = token_windows(run.root, "calib", config.calib_text, n, config.window)
        calib, valid = split_windows(windows, config.calib_windows)
        report = quantize_model(source_path, tx.variant_path(config.recipe), calib, qcfg, valid_ids=valid)
        tx.record("quantize", {**asdict(config), "source": source}, {source: str(source_path)},
                  {config.recipe: {"kind": "onnx", "path": f"variants/{config.recipe}/model.onnx", "parent": source}},
                  report)
    return report
