"""Stage `quantize`: a float variant -> an int8 (or int4 weight-only) variant, calibrated on held-out text."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from exporters.quantization.config import CALIBRATE_METHODS, FALLBACKS, RECIPES, ROUNDINGS
from models.errors import UserError
from pipeline import progress
from pipeline.data import leading_special, load_tokenizer, token_windows
from pipeline.manifest import RunDir
from pipeline.options import check_options, fits_context, option
from runtimes.providers import int8_gemm_saturates



MAX_WINDOWS = 4096  # calibration / validation windows: more than any calibration text here fills
MIN_WINDOW = 8      # tokens per calibration window: a prefill and at least two decode steps


@dataclass(frozen=True)
class QuantizeStageConfig:
    recipe: str = option(str, "w8a8", "w8a8: static int8 with smoothing and sensitivity-chosen mixed precision; "
                         "static: plain QDQ int8; w8/w4: weight-only MatMulNBits; gguf: a GGUF source's own "
                         "quantized blocks, exactly (4-bit types as 4-bit MatMulNBits, 5- to 8-bit ones as 8-bit).",
                         choices=RECIPES)
    source: str = option(str, "", "Variant to quantize (default: fused if present, else fp32).")
    method: str | None = option(str, None, "Activation calibration method. Default: percentile (99.999% of |x|) "
                                "for w8a8, minmax for static.", choices=CALIBRATE_METHODS, optional=True)
    per_channel: bool = option(bool, True, "Weight scale granularity: one scale per output channel, or per "
                               "tensor.", off="--per-tensor")
    calib_windows: int = option(int, 16, "Calibration windows of text (each also seeds decode steps; w8a8's GPTQ "
                                "rounds a MatMul only with more tokens than inputs).", lo=1, hi=MAX_WINDOWS)
    window: int = option(int, 128, "Tokens per calibration window (at most the model's context).", lo=MIN_WINDOW)
    valid_windows: int = option(int, 16, "Calibration-side validation windows for the sensitivity search (fewer "
                                "make a 2% perplexity budget noise).", lo=0, hi=MAX_WINDOWS)
    max_ppl_increase: float = option(float, 0.02, "w8a8: largest relative perplexity increase before MatMuls "
                                     "leave static int8.", lo=0)
    fallback: str = option(str, "w8", "w8a8: what the MatMuls the budget takes out of static int8 become: int8 "
                           "weight-only (MatMulNBits) or float (a pure QDQ graph, for NPU execution providers).",
                           choices=FALLBACKS)
    w4_max_ppl_increase: float = option(float, 0.08, "w4: MatMuls move to --w4-high-bits, most damaging first, "
                                        "until perplexity is within this.", lo=0)
    w4_high_bits: int = option(int, 8, "w4: the width the search moves a MatMul to: 8, or 5 to 7 (codes of that "
                               "width in 8-bit MatMulNBits blocks: as large a file on onnxruntime alone, stored at "
                               "their width by `optimize --native-int8`).", lo=5, hi=8)
    head_bits: int = option(int, 8, "w4: the output projection's width, 5 to 8 (5 to 7 as narrow codes in 8-bit "
                            "blocks, like --w4-high-bits; a tied table reads the same codes), or 4 like the other "
                            "MatMuls.", lo=4, hi=8)
    search: bool = option(bool, True, "w8a8/w4: the budget search (MatMuls leave the recipe's form, most "
                          "damaging first, until within budget); --no-search writes every MatMul in the recipe's "
                          "form and only measures it (w4: the 8-bit forms are then never packed).",
                          off="--no-search")
    block_size: int = option(int, 32, "w8/w4: MatMulNBits block size (a power of 2, at least 16).", lo=16)
    zero_points: bool = option(bool, False, "w4: 4-bit blocks spanning their own [min, max], with a zero point "
                               "each (half a byte a block more); --symmetric: MLAS's symmetric grid.",
                               off="--symmetric")
    accuracy_level: int = option(int, 4, "w8/w4: MatMulNBits compute accuracy (4: int8 activations on CPU).",
                                 lo=0, hi=4)
    calib_text: str | None = option(str, None, "Text file to calibrate on (default: the corpus's calib split).",
                                    optional=True)
    weight_rounding: str = option(str, "gptq", "w8a8/w8/w4: weights rounded by GPTQ (least output error on the "
                                  "calibration text) or to nearest.", choices=ROUNDINGS)
    rotate: bool = option(bool, True, "w8a8/w4: fold randomized Hadamard rotations into the weights (residual "
                          "stream and attention values; w8a8: before smoothing), exact in float and adding no ops; "
                          "and the online one of --online-hadamard.", off="--no-rotate")
    online_hadamard: int = option(int, 128, "w8a8/w4 with --rotate: block size of an online Hadamard rotation "
                                  "before each down_proj, and before qkv, gate_up and o_proj where the folded "
                                  "rotations cannot reach them (Gemma's norms): three float ops each that make the "
                                  "input fit static int8 or 4-bit blocks; 0: none.", lo=0)
    outlier_channels: int = option(int, 16, "w8a8: at most this many channels of each smoothed activation, those "
                                   "over 4x its 99th-percentile channel peak, leave the int8 MatMul for a small "
                                   "float one (0: none).", lo=0)
    pin_first_token: bool = option(bool, True, "w8a8: the keys and values of the token every prompt opens with "
                                   "(the tokenizer's BOS, where a model keeps its attention sink), at position 0, as "
                                   "float constants of the graph; calibration samples only the tokens after it. "
                                   "Nothing to pin for a tokenizer that adds no BOS.", off="--no-pin-first-token")
    reduce_range: bool | None = option(bool, None, "w8a8/static: 7-bit weights, for x86 CPUs without VNNI, whose "
                                       "int8 kernels overflow with 8-bit ones (the runtime refuses such a model "
                                       "there). Default: on exactly when this machine is one.",
                                       off="--no-reduce-range", optional=True)
    max_memory: float | None = option(float, None, "GiB the stage may hold (default: the memory this machine has "
                                      "available); it refuses before calibrating when its estimate is over.",
                                      optional=True, lo=0.1)

    def __post_init__(self):
        check_options(self)
        self.quant_config(reduce_range=False)  # the quantizer's own checks (block size, Hadamard order) first

    @property
    def decode_steps(self) -> int:
        return min(4, self.window // 4)  # each window: a prefill, then decode steps fed its real past KV

    def quant_config(self, reduce_range: bool, gguf: str | None = None, first_token: int | None = None):
        from exporters.quantize import QuantConfig

        return QuantConfig(recipe=self.recipe, calibrate_method=self.method,
                           num_prefill=self.calib_windows, seq_len=self.window - self.decode_steps,
                           num_decode_steps=self.decode_steps,
                           per_channel=self.per_channel, max_ppl_increase=self.max_ppl_increase,
                           block_size=self.block_size, accuracy_level=self.accuracy_level,
                           fallback=self.fallback, w4_max_ppl_increase=self.w4_max_ppl_increase,
                           w4_high_bits=self.w4_high_bits, head_bits=self.head_bits,
                           search=self.search, zero_points=self.zero_points,
                           weight_rounding=self.weight_rounding, rotate=self.rotate,
                           outlier_channels=self.outlier_channels, online_hadamard=self.online_hadamard,
                           reduce_range=reduce_range, gguf=gguf,
                           first_token=first_token if self.pin_first_token else None)

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


def memory_budget(config: QuantizeStageConfig, source: str, source_path) -> dict:
    """The estimate of what quantizing will hold (exporters/quantization/memory.py) against --max-memory or the
    memory available; over it, one line before any work starts."""
    import psutil

    from exporters.quantization.memory import estimate

    need = estimate(source_path, config.recipe, config.weight_rounding, config.window, search=config.search,
                    block_size=config.block_size, rotate=config.rotate)
    if config.max_memory is not None:
        limit, what = int(config.max_memory * (1 << 30)), f"--max-memory {config.max_memory:g} GiB"
    else:
        limit = psutil.virtual_memory().available
        what = f"the {limit / (1 << 30):.1f} GiB this machine has available"
    if need.total > limit:
        no_hessians = "--weight-rounding nearest needs no Hessians"
        ways = [no_hessians] if need.hessian_bytes else []
        lean_recipe = config.recipe if config.recipe in ("w4", "w8", "gguf") else "w8"  # written, then measured
        lean = estimate(source_path, lean_recipe, "nearest", config.window, search=False, block_size=config.block_size)
        if lean.total < min(need.total, limit):
            flags = " ".join(f for f in (f"--recipe {lean_recipe}" if lean_recipe != config.recipe else "",
                                         "--weight-rounding nearest" if lean_recipe != "gguf" else "",
                                         "--no-search" if lean_recipe == "w4" else "",
                                         "--no-rotate" if lean_recipe == "w4" and config.rotate else "") if f)
            about = f"about {lean.total / (1 << 30):.1f} GiB"
            ways = [f"{no_hessians}: {about}"] if ways and flags == "--weight-rounding nearest" else \
                ways + [f"{flags} needs {about}"]
        advice = f" ({'; '.join(ways)})" if ways else ""
        raise UserError(f"quantizing {source} to {config.recipe} needs {need.describe()}; more than {what}: "
                        f"use a machine with more memory{advice}")
    return {**need.to_dict(), "limit_bytes": limit}


def gguf_source(run: RunDir, tx, source: str) -> str:
    """The GGUF file `source` was built from (verified unchanged since export), for the gguf recipe."""
    art = run.artifact("source")
    if art.get("format") != "gguf":
        raise UserError(f"--recipe gguf keeps a GGUF file's own blocks; this run was exported from {art.get('path')} "
                        f"({art.get('format')}): use --recipe w4 or w8")
    if source != "fused" or run.artifact(source).get("stage") != "export":  # built by export, not optimize
        raise UserError(f"--recipe gguf rewrites the graph `pipeline export --graph built` writes (variant fused); "
                        f"--source {source} is not it")
    return str(tx.read("source"))


def quantize(run: RunDir, config: QuantizeStageConfig) -> dict:
    from exporters.quantize import quantize as quantize_model
    from runtimes.bench import peak_rss_mb

    source = config.resolved_source(run)
    if source == config.recipe:
        raise UserError(f"--source {source} would be replaced by its own {config.recipe} variant: quantize a float "
                        "variant (fp32 or fused)")
    steps = ["calibration text", "calibrate, search and write", "publish"]
    with progress.phases(f"quantize {config.recipe}", steps) as phase, run.transaction() as tx:
        phase(steps[0])
        source_path = tx.read(source)
        fits_context("window", config.window, source_path, source)
        memory = memory_budget(config, source, source_path)
        qcfg = config.quant_config(int8_gemm_saturates() if config.reduce_range is None else config.reduce_range,
                                   gguf_source(run, tx, source) if config.recipe == "gguf" else None,
                                   next(iter(leading_special(load_tokenizer(run.root))), None))
        n = config.calib_windows + config.valid_windows
        windows = token_windows(run.root, "calib", config.calib_text, n, config.window)
        calib, valid = split_windows(windows, config.calib_windows)
        phase(steps[1])
        report = quantize_model(source_path, tx.variant_path(config.recipe), calib, qcfg, valid_ids=valid)
        report["memory"] = {**memory, "peak_rss_bytes": int(peak_rss_mb() * (1 << 20))}
        tx.record("quantize", {**asdict(config), "source": source}, {source: str(source_path)},
                  {config.recipe: {"kind": "onnx", "path": f"variants/{config.recipe}/model.onnx", "parent": source}},
                  report)
        phase(steps[2])
    return report


def _some(names: list[str], shown: int = 8) -> str:
    """A list for a person: the first few names, and how many more `--json` lists."""
    more = f", ... ({len(names) - shown} more: --json lists them all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def render(r: dict) -> str:
    """The quantize report for a person: size, what runs in which form, and why the rest stays float."""
    lines = [f"{r['recipe']}: {r['size_before'] / 1e6:.2f} MB -> {r['size_after'] / 1e6:.2f} MB "
             f"({r['size_after'] / r['size_before']:.2f}x); {len(r['quantized_matmuls'])} MatMuls quantized, "
             f"{100 * r['quantized_flop_share']:.0f}% of weight-MatMul FLOPs"]
    if r.get("fallback_matmuls"):
        lines.append(f"  8-bit weight-only instead: {len(r['fallback_matmuls'])} MatMuls, "
                     f"{100 * r['fallback_flop_share']:.0f}% of FLOPs: " + _some(list(r["fallback_matmuls"])))
    if "reduce_range" in r:
        lines.append("  static int8 weights: " + ("7-bit (reduce range: for x86 CPUs without VNNI)"
                                                  if r["reduce_range"] else "8-bit"))
    if r.get("ppl"):
        lines.append(f"  calibration-side perplexity: fp32 {r['ppl']['fp32']:.3f} -> {r['ppl']['quantized']:.3f} "
                     f"({100 * r['ppl']['increase']:+.2f}%)")
    added = r.get("added_float_matmuls", {})
    split, online = added.get("outlier_split", []), added.get("online_hadamard", [])
    if split:
        channels = sum(len(c) for c in r["smoothing"]["outlier_channels"].values())
        lines.append(f"  outlier channels split off into float: {channels} channels of "
                     f"{len(r['smoothing']['outlier_channels'])} activations ({len(split)} small MatMuls)")
    if online:
        lines.append(f"  online Hadamard ({r['online_hadamard']['block']}-wide blocks, float) before "
                     f"{len(online)} MatMuls")
    left = {n: why for n, why in r["float_matmuls"].items()
            if n not in {*r["activation_matmuls"], *split, *online}}
    if left:
        lines.append("  left in float: " + _some([f"{n} ({why})" for n, why in left.items()]))
    return "\n".join(lines)
