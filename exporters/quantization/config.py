"""What `quantize` is asked: the recipe and every option of its passes, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from exporters.acceptance import THRESHOLDS, Thresholds
from exporters.calibration import CalibrationPlan
from exporters.rotation import hadamard_order
from models.errors import UserError

RECIPES = ("static", "w8a8", "w8", "w4", "gguf")
ROUNDINGS = ("gptq", "nearest")
FALLBACKS = ("w8", "float")
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
WEIGHT_BITS_KEY = "pipeline.int8_weight_bits"  # metadata: "7" (reduce_range) or "8", static QDQ weights only


ROTATING = ("w8a8", "w4")  # the recipes that fold the rotations in (docs/quantization.md has both ablations)
# the widest online Hadamard block: its b x b float matrix is built in float64 (128 MiB at 4096) and applied to
# every token; blocks are 64 to 512 in practice
MAX_ONLINE_HADAMARD = 4096


@dataclass(frozen=True)
class QuantConfig:
    recipe: str = "w8a8"            # "static" | "w8a8" | "w8" | "w4" (see the module docstring)
    calibrate_method: str | None = None  # activation ranges: "minmax" | "percentile" (99.999% of |x|) | "entropy"
                                    # (KL); None: percentile for w8a8 (lower held-out KL there, see docs/),
                                    # minmax for plain static
    per_channel: bool = True        # one weight scale per output channel (axis 1 of the (K, N) weight)
    num_prefill: int = 32           # calibration windows; each is one prefill sample of seq_len tokens ...
    seq_len: int = 128              # ... of this many tokens ...
    num_decode_steps: int = 4       # ... followed by this many single-token samples fed the real past KV
    block_size: int = 32            # MatMulNBits: weights per scale along K (power of 2, >= 16)
    accuracy_level: int = 4         # MatMulNBits compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fast on CPU)
    max_ppl_increase: float = 0.02  # w8a8: allowed relative perplexity increase over fp32 on valid_ids (0.02 = 2%)
    sensitivity_tokens: int = 256   # w8a8: valid_ids tokens each MatMul's one-at-a-time sensitivity is measured on
    alpha: float | None = None      # w8a8 smoothing: s = max|X|^alpha / max|W|^(1-alpha); higher: more range to W.
                                    # None: per activation, the alpha with the least fake-quantized output error
    reduce_range: bool = True       # 7-bit weights: no int16 saturation in U8S8 on x86 without VNNI (see above);
                                    # the pipeline stage sets it from the machine (int8_gemm_saturates)
    exclude: tuple[str, ...] = ()   # MatMul node names always left in float
    fallback: str = "w8"            # w8a8: what the sensitive MatMuls become, "w8" (MatMulNBits) or "float"
    weight_rounding: str = "gptq"   # w8a8/w8/w4: weights rounded by GPTQ (least output error on the calibration
                                    # tokens, exporters/gptq.py) or to "nearest" (onnxruntime's own)
    embedding_bits: int = 8         # w8a8/w8/w4: token-embedding table as GatherBlockQuantized (8), or float (32)
    w4_max_ppl_increase: float = 0.08  # w4: MatMuls move to w4_high_bits, most damaging first, until within this
    w4_high_bits: int = 8           # w4: the width the search moves a MatMul to: 8, or 5-7 (codes of that width
                                    # in 8-bit MatMulNBits blocks, which `optimize --native-int8` stores packed)
    search: bool = True             # w8a8/w4: the budget search; False: every target in the recipe's form, measured
    zero_points: bool = False       # w4: 4-bit blocks span their [min, max] with a zero point each (nbits.py);
                                    # False: symmetric, MLAS's default grid
    head_bits: int = 8              # w4: the output projection (lm_head) at this width, 5-8 (llama.cpp's Q4_K_M
                                    # keeps output.weight at 6; 5-7 are narrow codes in 8-bit blocks, nbits.py),
                                    # or 4: like every other MatMul
    rotate: bool = True             # w8a8/w4: fold randomized Hadamard rotations (exporters/rotation.py) into the
                                    # weights (w8a8: before smoothing), so no channel of the residual stream is an
                                    # outlier
    online_hadamard: int = 128      # w8a8/w4 with rotate: block size of the online Hadamard rotation before each
                                    # down_proj, and before qkv, gate_up and o_proj where R1 and R2 cannot reach,
                                    # after the outlier split (exporters/rotation.py); 0: none. Without
                                    # R1 it measured worse, so rotate gates it
    outlier_channels: int = 16      # w8a8: per smoothed activation, at most this many channels over 4x the 99th
                                    # percentile channel peak leave the int8 MatMul for a small float one
                                    # (exporters/smoothing.py, `split_channels`); 0: none
    judge_like_check: bool = True   # w8a8/w4 search: a model is within budget only if it also meets check's top-1
                                    # and KL thresholds for the recipe (exporters/acceptance.py); False: perplexity
    gguf: str | None = None         # gguf: the GGUF file the source graph was built from (its blocks are kept)
    top1_z: float = 2.0             # ... top-1 by a margin of this many binomial standard errors of its estimate on
                                    # valid_ids: check evaluates other text, so a bare pass there is a coin flip
    first_token: int | None = None  # w8a8: the token every prompt opens with (the tokenizer's BOS), whose keys and
                                    # values at position 0 the graph then takes as float constants, and which the
                                    # calibration runs first and never samples (quantization/prefix.py); None: none

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"unknown quantization recipe {self.recipe!r} (choose from {', '.join(RECIPES)})")
        if self.gguf is not None and self.recipe != "gguf":
            raise UserError(f"a GGUF file to keep the blocks of is for the gguf recipe, not {self.recipe}")
        if self.w4_max_ppl_increase < 0:
            raise UserError(f"w4_max_ppl_increase cannot be negative, got {self.w4_max_ppl_increase}")
        if self.w4_high_bits not in (5, 6, 7, 8):
            raise UserError(f"w4_high_bits must be 5 to 8, got {self.w4_high_bits}")
        if not 4 <= self.head_bits <= 8:
            raise UserError(f"head_bits must be 4 to 8, got {self.head_bits}")
        if self.embedding_bits not in (8, 32):
            raise UserError(f"embedding_bits must be 8 or 32 (float), got {self.embedding_bits}")
        if self.weight_rounding not in ROUNDINGS:
            raise UserError(f"unknown weight rounding {self.weight_rounding!r} (choose from {', '.join(ROUNDINGS)})")
        if self.recipe == "w8a8" and not self.per_channel and self.weight_rounding == "gptq":
            raise UserError("GPTQ rounds w8a8's weights on per-channel scales: --per-tensor needs "
                            "--weight-rounding nearest")
        if self.fallback not in FALLBACKS:
            raise UserError(f"unknown fallback {self.fallback!r} (choose from {', '.join(FALLBACKS)})")
        if self.calibrate_method is None:
            object.__setattr__(self, "calibrate_method", "percentile" if self.recipe == "w8a8" else "minmax")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise UserError(f"unknown calibration method {self.calibrate_method!r} "
                            f"(choose from {', '.join(CALIBRATE_METHODS)})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"block_size must be a power of 2 and at least 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.sensitivity_tokens < 2:
            raise UserError(f"sensitivity_tokens must be at least 2, got {self.sensitivity_tokens}")
        if self.max_ppl_increase < 0:
            raise UserError(f"max_ppl_increase is a relative increase and cannot be negative, "
                            f"got {self.max_ppl_increase}")
        if self.online_hadamard and not (hadamard_order(self.online_hadamard)
                                         and self.online_hadamard <= MAX_ONLINE_HADAMARD):
            raise UserError(f"online_hadamard must be 0 or a Hadamard order 2^a * 12^b up to {MAX_ONLINE_HADAMARD} "
                            f"(e.g. 64, 128), got {self.online_hadamard}")
        if self.top1_z < 0:
            raise UserError(f"top1_z cannot be negative, got {self.top1_z}")
        if self.outlier_channels < 0:
            raise UserError(f"outlier_channels cannot be negative, got {self.outlier_channels}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must lie in [0, 1], got {self.alpha}")
        self.plan  # validates the calibration sizes

    @property
    def plan(self) -> CalibrationPlan:
        prefix = (self.first_token,) if self.first_token is not None and self.recipe == "w8a8" else ()
        return CalibrationPlan(self.num_prefill, self.seq_len, self.num_decode_steps, prefix)

    @property
    def rotates(self) -> bool:
        """Whether the recipe folds the rotations in (`rotate`, for the recipes that can)."""
        return self.rotate and self.recipe in ROTATING

    @property
    def weight_only_bits(self) -> int | None:
        """Bits of the recipe's MatMulNBits (8, 4), or None for the static int8 recipes."""
        return {"w8": 8, "w4": 4, "gguf": 4}.get(self.recipe)

    @property
    def quantizes_embeddings(self) -> bool:
        """Whether the recipe quantizes the embedding table (not `static`: the stock recipe, left as ORT makes it)."""
        return self.embedding_bits == 8 and self.recipe != "static"

    @property
    def weight_levels(self) -> int:
        """Largest static int8 weight level GPTQ and the smoothing's error model round to (7 or 8 bits)."""
        return 64 if self.reduce_range else 127

    def acceptance(self, max_ppl_increase: float) -> Thresholds:
        """What the budget search accepts: `max_ppl_increase`, and check's top-1 and KL for this recipe."""
        t = THRESHOLDS.get(self.recipe) if self.judge_like_check else None
        if t is None:
            return Thresholds(max_ppl_increase=max_ppl_increase)
        return Thresholds(min_top1=t.min_top1, max_kl=t.max_kl, max_ppl_increase=max_ppl_increase)
