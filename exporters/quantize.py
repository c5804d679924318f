"""ONNX fp32 -> int8/int4: static QDQ (optionally smoothed, with a measured accuracy budget) or weight-only.

Recipes:
  static  onnxruntime quantize_static: QDQ, int8 symmetric weights (7-bit range by default, see below), uint8
          activations, calibrated on prefill and decode feeds (exporters/calibration.py). Only MatMuls whose
          weight is an initializer; embeddings (Gather) stay float.
  w8a8    static + rotations folded into the weights (exporters/rotation.py) + SmoothQuant smoothing
          (exporters/smoothing.py), whose largest outlier channels are split off into small float MatMuls, + an
          online Hadamard rotation before each down_proj (rotation.py's `online_hadamard`) + mixed precision:
          the quantized model's perplexity is measured on validation ids and, over budget, MatMuls are ranked
          by the KL on the logits with only that MatMul in int8 (`QuantSwitch` makes that one session, not
          one model per MatMul), and the most sensitive ones leave static int8 until the budget is met
          (verified on the real model). They fall back (`fallback`) to int8 weight-only MatMulNBits (default:
          on the CPU its accuracy level 4 quantizes the activation per block at run time, so they still compute
          in int8 and stream int8 weights), or to float (`fallback="float"`: a graph that is all static QDQ or
          float, as NPU execution providers require).
  w8, w4  weight-only MatMulNBits (blockwise symmetric): the int8/int4 weights are unpacked per block inside the
          kernel, activations stay float (or int8 per block with accuracy_level 4). Calibration text only serves
          the GPTQ rounding (`BlockwiseRounding`); w4 moves its most damaging MatMuls to 8 bits within a budget.

Choices read from onnxruntime's source (1.32):
  * activations are uint8: on x86 the CPU QDQ fusion only accepts int8 activations on ARM
    (`QDQIsInt8Allowed()`), so int8 activations would leave DQ -> float MatMul in the graph, slower than fp32;
    uint8 x int8 (U8S8) is MLAS's fast path on x86 and fine on ARM.
  * MatMul outputs are not quantized (`OpTypesToExcludeOutputQuantization`): every consumer (GQA, SiLU, norms)
    is float, so Q/DQ there only adds error; DQ -> MatMul (no Q) fuses to MatMulIntegerToFloat.
  * per-channel weight scales are on axis 1, the output channel of a (K, N) MatMul weight. That is already
    ORT's QDQ default for MatMul; it is set explicitly (`QDQOpTypePerChannelSupportToAxis`) and tested.
  * weights are 7-bit where they must be (`reduce_range`): on x86 without VNNI (AVX2), MLAS's U8S8 kernel adds
    pairs of u8*s8 products in saturating int16 (255*127*2 > 32767). Per-channel scales put every column at
    the full +-127, so it saturates everywhere: SmolLM2-135M went from perplexity 38 to 650,000 with 8-bit
    per-channel weights (95 with the same graph run unfused in float), 86 with 7-bit. This, not the axis,
    is why per-channel came out worse than per-tensor. With VNNI (and on ARM) 8-bit weights are exact and
    halve the weight rounding step: SmolLM2's w8a8 held-out KL 0.0164 -> 0.0117. `pipeline quantize` picks
    7 bits exactly where its machine saturates; the written model records which (WEIGHT_BITS_KEY), and the
    runtime refuses 8-bit weights on a saturating CPU.
  * calibration memory is bounded with `CalibStridedMinMax` = 1: the calibrator folds each sample into its
    ranges / histograms before the next. It works for every method (`CalibMaxIntermediateOutputs` in 1.32 clears
    the collected outputs without folding them in, so it would silently calibrate on the last partial batch),
    and the histogram calibrators need it anyway: they stack one stride's tensors with np.asarray, which fails
    when prefill (S tokens) and decode (1 token) samples share a stride.
  * a MatMul left float must read the float activation: quantize_static shares one Q/DQ pair among all
    readers of a tensor, so `restore_float_readers` undoes that for the readers that are not int8.
  * the fused graph's contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization) are unknown to ONNX
    shape inference; without types ORT skips every activation after them and silently produces weight-only
    DQ. ORT's symbolic shape inference, run first, knows them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from exporters.calibration import CalibrationPlan, KVCacheCalibrationReader, cpu_session, declared, empty_past, \
    session_contract, step_feed
from exporters.contract import LOGITS, Contract, read_contract, set_metadata
from exporters.export import EXTERNAL_DATA_THRESHOLD, model_files, move_model, save_model_auto
from exporters.gptq import fits, gptq, gptq_blockwise, input_hessians
from exporters.optimize import load_onnx
from exporters.rotation import ONLINE_SUFFIX, hadamard, online_hadamard, online_matrix, rotate
from exporters.smoothing import ActivationStats, best_alpha, collect_activation_stats, find_smooth_groups, \
    outlier_matmuls, pick_outliers, smooth, weight_matmuls
from models.errors import UserError

RECIPES = ("static", "w8a8", "w8", "w4")
ROUNDINGS = ("gptq", "nearest")
FALLBACKS = ("w8", "float")
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
WEIGHT_BITS_KEY = "pipeline.int8_weight_bits"  # metadata: "7" (reduce_range) or "8", static QDQ weights only


@dataclass(frozen=True)
class QuantConfig:
    recipe: str = "w8a8"            # "static" | "w8a8" | "w8" | "w4" (see the module docstring)
    calibrate_method: str | None = None  # activation ranges: "minmax" | "percentile" (99.999% of |x|) | "entropy"
                                    # (KL); None: percentile for w8a8 (SmolLM2 held out: KL 0.0117 -> 0.0083 with
                                    # 8-bit weights, 0.0164 -> 0.0113 with 7-bit), minmax for plain static
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
    w4_max_ppl_increase: float = 0.08  # w4: MatMuls move to 8 bits, most damaging first, until within this
    head_bits: int = 8              # w4: the output projection (lm_head) at 8 bits, as llama.cpp's Q4_K_M keeps
                                    # output.weight at 6; 4 = like every other MatMul
    rotate: bool = True             # w8a8: fold randomized Hadamard rotations (exporters/rotation.py) into the
                                    # weights before smoothing, so no channel of the residual stream is an outlier
    online_hadamard: int = 128      # w8a8 with rotate: block size of the online Hadamard rotation before each
                                    # down_proj, after the outlier split (exporters/rotation.py); 0: none. Without
                                    # R1 it measured worse (tiny test model: +5.9% vs +4.9%), so rotate gates it
    outlier_channels: int = 16      # w8a8: per smoothed activation, at most this many channels over 4x the 99th
                                    # percentile channel peak leave the int8 MatMul for a small float one
                                    # (exporters/smoothing.py, `split_channels`); 0: none

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"unknown quantization recipe {self.recipe!r} (choose from {', '.join(RECIPES)})")
        if self.w4_max_ppl_increase < 0:
            raise UserError(f"w4_max_ppl_increase cannot be negative, got {self.w4_max_ppl_increase}")
        if self.head_bits not in (4, 8):
            raise UserError(f"head_bits must be 4 or 8, got {self.head_bits}")
        if self.embedding_bits not in (8, 32):
            raise UserError(f"embedding_bits must be 8 or 32 (float), got {self.embedding_bits}")
        if self.weight_rounding not in ROUNDINGS:
            raise UserError(f"unknown weight rounding {self.weight_rounding!r} (choose from {', '.join(ROUNDINGS)})")
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
        if self.online_hadamard and hadamard(self.online_hadamard) is None:
            raise UserError(f"online_hadamard must be 0 or a Hadamard order 2^a * 12^b (e.g. 64, 128), "
                            f"got {self.online_hadamard}")
        if self.outlier_channels < 0:
            raise UserError(f"outlier_channels cannot be negative, got {self.outlier_channels}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must lie in [0, 1], got {self.alpha}")
        self.plan  # validates the calibration sizes

    @property
    def plan(self) -> CalibrationPlan:
        return CalibrationPlan(self.num_prefill, self.seq_len, self.num_decode_steps)


# ----------------------------------------------------------------------------------------------- evaluation


def _sequences(ids_list: list[list[int]], contract: Contract) -> list[np.ndarray]:
    """Each sequence cut into chunks the model can hold (positions < max_position_embeddings); chunks under
    2 tokens dropped. Ids outside the vocabulary are a user error, not an onnxruntime Gather failure."""
    limit = contract.max_position_embeddings
    chunks = [np.asarray(ids[i:i + limit], np.int64) for ids in ids_list for i in range(0, len(ids), limit)]
    if any(c.size and (c.min() < 0 or c.max() >= contract.vocab_size) for c in chunks):
        raise UserError(f"validation token ids must lie in [0, {contract.vocab_size}) (the model's vocabulary): "
                        f"was the text tokenized with another tokenizer?")
    return [c for c in chunks if c.size >= 2]


def _log_probs(session: ort.InferenceSession, contract: Contract, ids: np.ndarray,
               extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Teacher-forced prefill of `ids`: log-softmax of the logits, (len - 1, vocab), predicting ids[1:]."""
    feed = declared(step_feed(ids, 0, empty_past(contract)), {i.name for i in session.get_inputs()})
    logits = session.run([LOGITS], {**feed, **(extra or {})})[0][0, :-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def _perplexity(log_probs: Callable[[np.ndarray], np.ndarray], sequences: list[np.ndarray]) -> float:
    nll, count = 0.0, 0
    for ids in sequences:
        nll -= float(log_probs(ids)[np.arange(ids.size - 1), ids[1:]].sum())
        count += ids.size - 1
    if count == 0:
        raise UserError("perplexity needs at least one validation sequence of 2 or more tokens")
    return float(np.exp(nll / count))


def perplexity(model_path: str | Path, ids_list: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all `ids_list` tokens, each sequence run as one prefill (chunked to the
    model's max_position_embeddings)."""
    session = cpu_session(model_path)
    contract = session_contract(session)
    return _perplexity(lambda ids: _log_probs(session, contract, ids),
                       _sequences(ids_list, contract))


# ---------------------------------------------------------------------------------------------- the graph


def _load_checked(model_path: Path) -> onnx.ModelProto:
    """The model, if it is one `pipeline export` wrote (it carries the contract) and is float32."""
    model = load_onnx(model_path)
    try:
        contract = read_contract(model)
    except ValueError as e:
        raise UserError(str(e)) from e
    if contract.kv_dtype != "float32" or any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise UserError(f"{model_path} is a float16 model: quantize the float32 export (or its fused graph "
                        f"without --fp16)")
    return model


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: tuple(inits[n.input[1]].dims) for n in weight_matmuls(model)}


def _flops(shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Multiply-adds per token of each weight MatMul: K*N."""
    return {name: k * n for name, (k, n) in shapes.items()}


def _targets(model: onnx.ModelProto, exclude: tuple[str, ...]) -> list[str]:
    """Weight MatMuls to quantize; an excluded name that is not a weight MatMul is a user error (typo)."""
    shapes = _weight_shapes(model)
    unknown = sorted(set(exclude) - set(shapes))
    if unknown:
        raise UserError(f"cannot exclude {unknown}: not weight MatMul nodes of this model "
                        f"(e.g. {next(iter(shapes), 'none')!r})")
    return [n for n in shapes if n not in exclude]


def _with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shape inference, which knows onnxruntime's contrib ops (see the module docstring)."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # an op it cannot type: quantizing would silently skip everything after it
        raise UserError(f"shape inference failed before quantization ({type(e).__name__}: {e}); the graph has an "
                        f"operator onnxruntime's symbolic shape inference does not support") from e
    add_pre_process_metadata(inferred)  # what ORT's quant_pre_process marks: shapes are inferred
    return inferred


def mark_weight_bits(path: Path, bits: int) -> None:
    """Record in the model's metadata how many bits its static int8 weights use (WEIGHT_BITS_KEY): the runtime
    refuses full 8-bit weights on a CPU whose int8 kernels would saturate (runtimes/providers.py)."""
    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    set_metadata(model, WEIGHT_BITS_KEY, str(bits))
    onnx.save_model(model, str(path))


def _files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in model_files(path))


@contextlib.contextmanager
def _quiet():
    """Silence onnxruntime's quantization tooling for the duration, and undo its global logging changes.

    quantize_static logs advice through the root logger, its histogram calibrators print to stdout, its sessions
    warn on stderr, and importing matmul_nbits_quantizer runs logging.basicConfig(level=INFO), which would make
    every later INFO log of the process appear. The CLI prints the report, not this chatter.
    """
    root = logging.getLogger()
    level, handlers, disabled = root.level, root.handlers[:], logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.disable(disabled)
        ort.set_default_logger_severity(2)


# ------------------------------------------------------------------------------------------ static (QDQ)


@dataclass(frozen=True)
class StaticJob:
    """Everything one quantize_static call needs; the calibration cache makes every call after the first
    (the budget search writes the chosen mix of int8 and float) reuse the ranges instead of recalibrating."""
    fp32_path: Path      # shape-inferred (and for w8a8 smoothed) float model
    cache_path: Path     # calibration ranges, written by the first call
    reader: KVCacheCalibrationReader
    config: QuantConfig
    rounded: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # MatMul -> GPTQ (q, scale)
    fallback_rounding: "BlockwiseRounding | None" = None  # GPTQ for the MatMuls that fall back to w8


def quantize_qdq(job: StaticJob, nodes: list[str], out_path: Path) -> None:
    """Quantize exactly `nodes` (weight MatMuls) to QDQ int8; with none, the float model is copied."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not nodes:
        model = onnx.load(str(job.fp32_path))
        if _embeds(job.config):
            quantize_embeddings(model, job.config.block_size)
        save_model_auto(model, out_path)
        return
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[job.config.calibrate_method]
    extra = {"OpTypesToExcludeOutputQuantization": ["MatMul"],
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             "CalibStridedMinMax": 1,
             "WeightSymmetric": True}
    big = sum(p.stat().st_size for p in model_files(job.fp32_path)) >= EXTERNAL_DATA_THRESHOLD
    cached = job.cache_path.is_file()
    with _quiet():
        quantize_static(str(job.fp32_path), str(out_path), None if cached else job.reader,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=job.config.per_channel, reduce_range=job.config.reduce_range,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=big,
                        calibrate_method=method, extra_options=extra, calibration_cache_path=str(job.cache_path))
    if _embeds(job.config) or job.rounded:  # every model the search measures is the one it would write
        graph = onnx.load(str(out_path))
        restore_float_readers(graph, set(nodes))
        set_rounded_weights(graph, {n: job.rounded[n] for n in nodes if n in job.rounded})
        if _embeds(job.config):
            quantize_embeddings(graph, job.config.block_size)
        save_model_auto(graph, out_path)
        return
    graph = onnx.load(str(out_path), load_external_data=False)  # weights stay where they are
    if restore_float_readers(graph, set(nodes)):
        onnx.save_model(graph, str(out_path))


def set_rounded_weights(model: onnx.ModelProto, rounded: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Replace the int8 weight and scale behind each named QDQ MatMul's weight DequantizeLinear."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in rounded:
            dq = made_by[node.input[1]]
            q, scale = rounded[node.name]
            for name, value in ((dq.input[0], q), (dq.input[1], scale)):
                if tuple(inits[name].dims) != value.shape:
                    raise RuntimeError(f"{node.name}: {name} has shape {tuple(inits[name].dims)}, not {value.shape}")
                inits[name].CopyFrom(numpy_helper.from_array(value, name))


def weight_hessians(model: onnx.ModelProto, targets: list[str], reader: KVCacheCalibrationReader,
                    workdir: Path) -> tuple[dict[str, np.ndarray], int]:
    """Input Hessians (X^T X over the calibration feeds) of the `targets` MatMuls, by activation name."""
    nodes = {n.name: n for n in model.graph.node}
    return input_hessians(model, sorted({nodes[t].input[0] for t in targets}), reader.feeds(), workdir)


def gptq_weights(model: onnx.ModelProto, targets: list[str], hessians: dict[str, np.ndarray], tokens: int,
                 levels: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """GPTQ-rounded int8 weights and scales of `targets`, from the input Hessians of `model` (the smoothed
    float graph) over `tokens` calibration tokens (a weight too wide for them keeps nearest rounding, see
    `gptq.fits`); and what to report."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    rounded, nearest = {}, []
    for t in targets:
        w = numpy_helper.to_array(inits[nodes[t].input[1]])
        if not fits(w.shape[0], tokens):
            nearest.append(t)
            continue
        rounded[t] = gptq(w, hessians[nodes[t].input[0]], levels)
    return rounded, {"calibration_tokens": tokens, "nearest_too_few_tokens": nearest}


def write_mix(job: StaticJob, static_nodes: list[str], fallback_nodes: list[str], out_path: Path) -> None:
    """`static_nodes` as static QDQ int8, `fallback_nodes` as the config's fallback (w8 weight-only or float)."""
    quantize_qdq(job, static_nodes, out_path)
    if fallback_nodes and job.config.fallback == "w8":
        model = onnx.load(str(out_path))
        if job.fallback_rounding is not None:
            job.fallback_rounding.apply(model, {name: 8 for name in fallback_nodes})
        save_model_auto(_nbits(model, 8, job.config, include=fallback_nodes), out_path)


def _nbits(model: onnx.ModelProto, bits: int, config: QuantConfig,
           include: list[str] | None = None) -> onnx.ModelProto:
    """MatMulNBits (blockwise symmetric) for the float weight MatMuls: `include` only, or all but the excluded."""
    exclude = set(config.exclude)
    if include is not None:  # the quantizer's own nodes_to_include adds to the op types instead of narrowing
        exclude |= {n.name for n in model.graph.node if n.op_type == "MatMul"} - set(include)
    with _quiet():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size, is_symmetric=True,
                                         accuracy_level=config.accuracy_level, nodes_to_exclude=sorted(exclude),
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    return quantizer.model.model  # the same ModelProto, metadata (the contract) included


def restore_float_readers(model: onnx.ModelProto, quantized: set[str]) -> bool:
    """Give every reader of a quantized activation that is not an int8 MatMul the float tensor back.

    quantize_static inserts one shared Q/DQ pair per activation and rewires *all* its readers to the DQ output
    (DedicatedQDQPair only helps when two or more readers are quantized): with q and k left in float and v in
    int8, q and k would silently run as float MatMuls on rounded inputs, slower and less accurate than asked.
    Returns whether anything changed.
    """
    made_by = {o: n for n in model.graph.node for o in n.output}
    rounded = {dq.output[0]: made_by[dq.input[0]].input[0] for dq in model.graph.node
               if dq.op_type == "DequantizeLinear" and made_by.get(dq.input[0], dq).op_type == "QuantizeLinear"}
    changed = False
    for node in model.graph.node:
        if node.name not in quantized:
            for i, name in enumerate(node.input):
                if name in rounded:
                    node.input[i], changed = rounded[name], True
    return changed


def qdq_quantized(model: onnx.ModelProto) -> set[str]:
    """MatMuls whose both inputs come from DequantizeLinear: what ORT fuses into an int8 MatMulIntegerToFloat."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node
            if n.op_type == "MatMul" and all(producers.get(i) == "DequantizeLinear" for i in n.input[:2])}


class QuantSwitch:
    """The float model with each target MatMul's int8 rounding behind its own on/off input.

    Both inputs of every target go through `Where(gate, DQ(Q(x)), x)`, with the exact scales, zero points and
    int8 weights of the all-int8 graph, so one session evaluates any mix of int8 and float MatMuls (what the
    int8 kernels compute, up to float rounding) without writing or loading a model per mix. That makes
    quantize-one-at-a-time sensitivity affordable at 200+ MatMuls, and the budget search cheap.
    """

    def __init__(self, fp32: onnx.ModelProto, int8: onnx.ModelProto, targets: list[str], workdir: Path):
        inits = {t.name: t for t in int8.graph.initializer}
        made_by = {o: n for n in int8.graph.node for o in n.output}
        int8_nodes = {n.name: n for n in int8.graph.node}

        def route(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
            a_dq, w_dq = (made_by[i] for i in int8_nodes[node.name].input[:2])
            return self._switch(model, node, a_dq, w_dq, inits)

        self._build(fp32, targets, route, workdir)

    def _build(self, fp32: onnx.ModelProto, targets: list[str],
               route: Callable[[onnx.ModelProto, onnx.NodeProto], list[onnx.NodeProto]], workdir: Path) -> None:
        """Insert `route`'s nodes before every target, add one boolean gate input per target, open a session."""
        self.gates = {name: f"quant_switch.{i}" for i, name in enumerate(targets)}
        nodes = []
        for node in fp32.graph.node:
            if node.name in self.gates:
                nodes += route(fp32, node)
            nodes.append(node)
        del fp32.graph.node[:]
        fp32.graph.node.extend(nodes)
        fp32.graph.input.extend(helper.make_tensor_value_info(g, onnx.TensorProto.BOOL, [])
                                for g in self.gates.values())
        path = workdir / "switch.onnx"
        save_model_auto(fp32, path)
        self.session = cpu_session(path)
        self.contract = session_contract(self.session)

    def _switch(self, model: onnx.ModelProto, node: onnx.NodeProto, a_dq: onnx.NodeProto, w_dq: onnx.NodeProto,
                inits: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
        """Route `node`'s activation and weight through gated copies of the int8 graph's Q/DQ."""
        gate, tag = self.gates[node.name], self.gates[node.name] + "."
        for name in {*a_dq.input[1:], *w_dq.input}:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = tag + name
            model.graph.initializer.append(copy)
        a_params, w_params = [tag + n for n in a_dq.input[1:]], [tag + n for n in w_dq.input]
        x, w = node.input[0], node.input[1]
        node.input[0], node.input[1] = tag + "x", tag + "w"
        return [helper.make_node("QuantizeLinear", [x, *a_params], [tag + "xq"]),
                helper.make_node("DequantizeLinear", [tag + "xq", *a_params], [tag + "xdq"]),
                helper.make_node("Where", [gate, tag + "xdq", x], [tag + "x"]),
                helper.make_node("DequantizeLinear", w_params, [tag + "wdq"], axis=_axis(w_dq)),
                helper.make_node("Where", [gate, tag + "wdq", w], [tag + "w"])]

    def log_probs(self, ids: np.ndarray, in_int8: Collection[str]) -> np.ndarray:
        gates = {g: np.array(name in in_int8) for name, g in self.gates.items()}
        return _log_probs(self.session, self.contract, ids, gates)

    def perplexity(self, ids_list: list[list[int]], in_int8: Collection[str]) -> float:
        return _perplexity(lambda ids: self.log_probs(ids, in_int8),
                           _sequences(ids_list, self.contract))


class WeightSwitch(QuantSwitch):
    """The float model with each target MatMul's weight switchable to a stand-in (e.g. its 4-bit rounding):
    `Where(gate, W', W)`, the same one-session evaluation of any mix as QuantSwitch, for weight-only recipes."""

    def __init__(self, fp32: onnx.ModelProto, alternatives: dict[str, np.ndarray], workdir: Path):
        def route(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
            tag = self.gates[node.name] + "."
            model.graph.initializer.append(numpy_helper.from_array(alternatives[node.name], tag + "w_alt"))
            w = node.input[1]
            node.input[1] = tag + "w"
            return [helper.make_node("Where", [self.gates[node.name], tag + "w_alt", w], [tag + "w"])]

        self._build(fp32, list(alternatives), route, workdir)


def _axis(dq: onnx.NodeProto) -> int:
    return next((a.i for a in dq.attribute if a.name == "axis"), 1)


def _first_tokens(ids_list: list[list[int]], count: int) -> list[list[int]]:
    """The first `count` tokens of `ids_list`, keeping the sequence boundaries."""
    out = []
    for ids in ids_list:
        if count <= 0:
            break
        out.append(list(ids[:count]))
        count -= len(out[-1])
    return out


def one_at_a_time_kl(switch: QuantSwitch, targets: list[str], ids_list: list[list[int]]) -> dict[str, float]:
    """Mean per-token KL(float || only this MatMul int8) of the next-token distributions, for each target.

    End to end, not per layer: the output error of a MatMul says little about its effect (a q/k projection
    with a tiny relative error can move a peaked softmax a lot, a down_proj with a larger one may not matter).
    """
    sequences = _sequences(ids_list, switch.contract)
    reference = [switch.log_probs(ids, ()) for ids in sequences]
    tokens = sum(ids.size - 1 for ids in sequences)
    kl = {}
    for name in targets:
        total = sum(float((np.exp(ref) * (ref - switch.log_probs(ids, {name}))).sum())
                    for ids, ref in zip(sequences, reference))
        kl[name] = total / max(tokens, 1)
    return kl


def smallest_prefix(n: int, meets: Callable[[int], bool]) -> int:
    """Smallest k in 1..n with meets(k) (meets(0) is known to fail), by doubling then bisection: 2*log2(n)
    evaluations instead of n, assuming more MatMuls in float never costs perplexity. n if nothing meets."""
    lo, hi = 0, 1  # invariant: lo fails; hi meets, or hi == n
    while hi < n and not meets(hi):
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi


def take_out_until_budget(switch: QuantSwitch, targets: list[str], fp32_ppl: float, budget: float,
                          valid_ids: list[list[int]], sensitivity_tokens: int,
                          measure: Callable[[list[str]], float],
                          flops: dict[str, int]) -> tuple[list[str], dict[str, float], dict]:
    """Mixed precision by measured sensitivity, shared by w8a8 and w4: the least FLOPs of `targets` to take out
    of the low-precision form so that perplexity stays within `budget` of `fp32_ppl`.

    Ranks by one-at-a-time KL on `switch` (gate on = the low-precision form, off = float) per FLOP (`flops`: K*N
    of each weight), the greedy answer to this knapsack: SmolLM2's lm_head causes less KL than its worst down_proj
    but holds 21% of the FLOPs (32 down_projs' worth), so taking it out first buys little accuracy for much
    low-precision share. Searches the prefix
    length on the simulation, then `measure`s the real model (it writes it, the prefix in the recipe's
    fallback form, and returns its perplexity); if the real model misses the budget (its kernels disagree with
    the simulation, e.g. int16 saturation without reduce_range, or the fallback's own error), more come out,
    25% more at a time, until it meets it. The last model measured is the one chosen.
    Returns (taken out, one-at-a-time KL of every target, search details for the report).
    """
    kl = one_at_a_time_kl(switch, targets, _first_tokens(valid_ids, sensitivity_tokens))
    ranking = sorted(targets, key=lambda name: kl[name] / flops[name], reverse=True)
    simulated: dict[int, float] = {}

    def simulated_meets(k: int) -> bool:
        simulated[k] = switch.perplexity(valid_ids, set(ranking[k:]))
        return simulated[k] / fp32_ppl - 1.0 <= budget

    k, n = smallest_prefix(len(ranking), simulated_meets), len(ranking)
    measured: dict[int, float] = {}
    while True:
        measured[k] = measure(ranking[:k])
        if measured[k] / fp32_ppl - 1.0 <= budget or k == n:
            break
        k = min(n, k + max(1, k // 4))  # small steps: each one taken out costs low-precision share
    details = {"kl_one_at_a_time": {name: kl[name] for name in ranking},  # in ranking order
               "simulated_ppl_by_count": dict(sorted(simulated.items())), "ppl_by_count": measured}
    return ranking[:k], kl, details


def _smooth_model(model: onnx.ModelProto, reader: KVCacheCalibrationReader, config: QuantConfig,
                  workdir: Path, rotated: bool = False) -> dict:
    """Smooth in place; reports the alphas and the largest activation magnitude before and after.

    `rotated`: the residual stream was rotated, so the norm outputs have no outlier channels left to migrate;
    only the gated-MLP products (down_proj inputs, which no rotation reaches) are smoothed. On SmolLM2 with the
    down_proj at weight-only (benchmarks/rotation_ablation.py, held out) that measured +0.20% perplexity, top-1
    0.952, KL 0.0119; smoothing the rotated norm outputs too: +1.42%, 0.962, 0.0091 (docs/benchmarks.md)."""
    groups = [g for g in find_smooth_groups(model, config.exclude) if not rotated or g.first_column is not None]
    if not groups:
        return {"groups": 0}
    stats = collect_activation_stats(model, [g.activation for g in groups], reader.feeds(), workdir)
    act_max = {name: st.abs_max for name, st in stats.items()}
    outliers = {name: pick_outliers(a, config.outlier_channels) for name, a in act_max.items()}
    report: dict = {"groups": len(groups)}
    if config.alpha is None:
        inits = {t.name: t for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        levels = 64 if config.reduce_range else 127
        # the gated-MLP products get the online Hadamard after this (`_static`): choose alpha for what is then
        # quantized, the rotated input and weights with the split channels added back exactly
        rotation = online_matrix(config.online_hadamard) if config.rotate and config.online_hadamard else None
        chosen = {}
        for g in groups:
            weights = [numpy_helper.to_array(inits[nodes[m].input[1]]) for m in g.matmuls]
            st, split = stats[g.activation], outliers[g.activation]
            if rotation is not None and g.first_column is not None and weights[0].shape[0] % len(rotation) == 0:
                chosen[g.activation] = best_alpha(st, weights, levels, rotation=rotation, split=split)
                continue
            rest = np.setdiff1d(np.arange(act_max[g.activation].size), split)
            if rest.size < st.abs_max.size:  # the split channels leave the int8 MatMul: choose alpha for the rest
                st = ActivationStats(st.abs_max[rest], st.low[rest], st.high[rest], st.rows[:, rest])
                weights = [w[rest] for w in weights]
            chosen[g.activation] = best_alpha(st, weights, levels)
        alpha = {name: a for name, (a, _) in chosen.items()}
        report["alpha"] = {"auto": {name: {"alpha": a, "relative_error": e} for name, (a, e) in chosen.items()}}
    else:
        alpha = report["alpha"] = config.alpha
    scales = smooth(model, groups, act_max, alpha, outliers)

    def rest_max(name: str, s: np.ndarray) -> float:
        return float(np.delete(act_max[name] / s, outliers[name]).max(initial=0.0))
    report.update(max_abs_activation_before=float(max(a.max() for a in act_max.values())),
                  max_abs_activation_after=max(rest_max(k, s) for k, s in scales.items()),
                  outlier_channels={name: [int(c) for c in o] for name, o in outliers.items() if o.size})
    return report


def _static(model: onnx.ModelProto, model_path: Path, staged: Path, calib_ids: list[list[int]],
            valid_ids: list[list[int]] | None, config: QuantConfig, workdir: Path) -> dict:
    if not calib_ids or not any(len(ids) for ids in calib_ids):
        raise UserError(f"recipe {config.recipe!r} needs calibration text: the calibration set is empty")
    reader = KVCacheCalibrationReader(model_path, calib_ids, config.plan)
    details: dict = {"calibration_samples": len(reader), "calibrate_method": config.calibrate_method,
                     "per_channel": config.per_channel, "reduce_range": config.reduce_range,
                     "fallback": config.fallback if config.recipe == "w8a8" else None}
    if config.recipe == "w8a8":
        rotated = False
        if config.rotate:
            rotation = rotate(model)
            details["rotation"], rotated = rotation.as_dict(), rotation.residual
        gated = [m for g in find_smooth_groups(model, config.exclude) if g.first_column is not None for m in g.matmuls]
        details["smoothing"] = _smooth_model(model, reader, config, workdir, rotated)
        if config.rotate and config.online_hadamard:
            details["online_hadamard"] = online_hadamard(model, gated, config.online_hadamard)
    split_off = outlier_matmuls(model)
    targets = [t for t in _targets(model, config.exclude) if t not in split_off]
    details["weight_rounding"] = config.weight_rounding if config.recipe == "w8a8" else "nearest"
    rounded, fallback_rounding = {}, None
    if details["weight_rounding"] == "gptq":
        hessians, tokens = weight_hessians(model, targets, reader, workdir)
        rounded, details["gptq"] = gptq_weights(model, targets, hessians, tokens, 64 if config.reduce_range else 127)
        if config.fallback == "w8":
            fallback_rounding = BlockwiseRounding(model, targets, hessians, tokens, config.block_size)
    job = StaticJob(workdir / "fp32.onnx", workdir / "calibration.json", reader, config, rounded, fallback_rounding)
    save_model_auto(_with_value_info(model), job.fp32_path)
    quantize_qdq(job, targets, staged)
    reasons = {name: "excluded by config" for name in config.exclude}
    now = _weight_shapes(model)
    added = {name: now[name] for name in split_off}
    reasons.update({name: f"outlier channels of {main}: {now[name][0]} of its {now[main][0]} inputs, in float"
                    for name, main in split_off.items()})
    for name in details.get("online_hadamard", {}).get("matmuls", []):  # float, K*b multiply-adds per token
        added[f"{name}{ONLINE_SUFFIX}/matmul"] = (now[name][0], config.online_hadamard)
        reasons[f"{name}{ONLINE_SUFFIX}/matmul"] = f"online Hadamard rotation of {name}'s input, in float"
    details["ppl"] = _ppl_pair(model_path, staged, valid_ids) if valid_ids else None
    if config.recipe == "w8a8" and valid_ids and targets and details["ppl"]["increase"] > config.max_ppl_increase:
        def measure(taken_out: list[str]) -> float:
            write_mix(job, [t for t in targets if t not in taken_out], taken_out, staged)
            return perplexity(staged, valid_ids)

        switch = QuantSwitch(onnx.load(str(job.fp32_path)), onnx.load(str(staged)), targets, workdir)
        keep, kl, search = take_out_until_budget(switch, targets, details["ppl"]["fp32"], config.max_ppl_increase,
                                                 valid_ids, config.sensitivity_tokens, measure,
                                                 _flops(_weight_shapes(model)))
        how = "int8 weight-only fallback" if config.fallback == "w8" else "float"
        reasons.update({name: f"sensitive: KL {kl[name]:.3g} with only this MatMul in int8 -> {how}"
                        for name in keep})
        final = search["ppl_by_count"][len(keep)]
        details["sensitivity"] = search
        details["ppl"] = {**details["ppl"], "all_int8": details["ppl"]["quantized"], "quantized": final,
                          "increase": final / details["ppl"]["fp32"] - 1.0}
    return {"details": details, "reasons": reasons, "added_shapes": added}


# ------------------------------------------------------------------------------------ weight-only (NBits)


def _output_projection(model: onnx.ModelProto) -> str | None:
    """The weight MatMul that writes the logits (lm_head), if there is one."""
    weights = {n.name for n in weight_matmuls(model)}
    return next((n.name for n in model.graph.node if LOGITS in n.output and n.name in weights), None)


def nbits_quantized(model: onnx.ModelProto, bits: int | None = None) -> set[str]:
    """Original names of the MatMuls that became MatMulNBits (of `bits`, or any); ORT appends `_Q{bits}`."""
    found = set()
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            b = next(a.i for a in n.attribute if a.name == "bits")
            if bits is None or b == bits:
                found.add(n.name.removesuffix(f"_Q{b}"))
    return found


class BlockwiseRounding:
    """GPTQ-rounded stand-ins for the weights of `targets` on MatMulNBits' grid (exporters/gptq.py), computed once
    per (MatMul, bits) from the input Hessians over the calibration feeds. Written into a copy of the float model
    before MatMulNBitsQuantizer runs, they come out of it unchanged (same scales, same grid points)."""

    def __init__(self, model: onnx.ModelProto, targets: list[str], hessians: dict[str, np.ndarray], tokens: int,
                 block_size: int):
        nodes = {n.name: n for n in model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}
        readers = Counter(i for n in model.graph.node for i in n.input)
        self.weight = {t: nodes[t].input[1] for t in targets if readers[nodes[t].input[1]] == 1}
        self.activation = {t: nodes[t].input[0] for t in self.weight}
        self.hessians, self.tokens = hessians, tokens
        self.nearest = sorted(t for t in targets if t not in self.weight
                              or not fits(self.inits[self.weight[t]].dims[0], tokens))
        self.block_size, self._cache = block_size, {}

    def rounded(self, name: str, bits: int) -> np.ndarray | None:
        if name in self.nearest or name not in self.weight:
            return None
        if (name, bits) not in self._cache:
            w = numpy_helper.to_array(self.inits[self.weight[name]])
            self._cache[name, bits] = gptq_blockwise(w, self.hessians[self.activation[name]], bits, self.block_size)
        return self._cache[name, bits]

    def apply(self, model: onnx.ModelProto, bits_of: dict[str, int]) -> None:
        """Replace, in `model` (a copy of the float model), each named MatMul's weight by its rounding."""
        inits = {t.name: t for t in model.graph.initializer}
        for name, bits in bits_of.items():
            w = self.rounded(name, bits)
            if w is not None:
                inits[self.weight[name]].CopyFrom(numpy_helper.from_array(w, self.weight[name]))


def _weight_only(model: onnx.ModelProto, model_path: Path, staged: Path, config: QuantConfig,
                 calib_ids: list[list[int]], valid_ids: list[list[int]] | None, workdir: Path) -> dict:
    _targets(model, config.exclude)  # validates the excluded names
    bits = 8 if config.recipe == "w8" else 4
    head = _output_projection(model) if bits == 4 and config.head_bits == 8 else None
    eight = [head] if head is not None and head not in config.exclude else []
    reasons = {name: "excluded by config" for name in config.exclude}
    details = {"bits": bits, "block_size": config.block_size, "accuracy_level": config.accuracy_level}
    if bits == 4:
        reasons.update({n: "output projection (head_bits 8)" for n in eight})
    targets = [n.name for n in weight_matmuls(model) if n.name not in config.exclude]
    rounding = None
    details["weight_rounding"] = config.weight_rounding if any(len(ids) for ids in calib_ids) else "nearest"
    if details["weight_rounding"] == "gptq":
        reader = KVCacheCalibrationReader(model_path, calib_ids, config.plan)
        rounding = BlockwiseRounding(model, targets, *weight_hessians(model, targets, reader, workdir),
                                     config.block_size)
        details["gptq"] = {"calibration_tokens": rounding.tokens, "nearest_too_few_tokens": rounding.nearest}

    def write(at_8: list[str]) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        if rounding is not None:
            rounding.apply(m, {t: 8 if t in at_8 else bits for t in targets})
        if at_8:
            m = _nbits(m, 8, config, include=at_8)
        m = _nbits(m, bits, config)
        if _embeds(config):
            quantize_embeddings(m, config.block_size)
        save_model_auto(m, staged)

    def measure(at_8: list[str]) -> float:
        write(eight + at_8)
        return perplexity(staged, valid_ids)

    write(eight)
    details["ppl"] = _ppl_pair(model_path, staged, valid_ids) if valid_ids else None
    if bits == 4 and valid_ids:
        fp32 = details["ppl"]["fp32"]
        details["ppl_all_4bit"] = details["ppl"]["quantized"]
        if details["ppl"]["increase"] > config.w4_max_ppl_increase:
            inits = {t.name: t for t in model.graph.initializer}

            def stand_in(node: onnx.NodeProto) -> np.ndarray:  # the 4-bit weight that would be written
                rounded = rounding.rounded(node.name, 4) if rounding is not None else None
                if rounded is not None:
                    return rounded
                return fake_nbits(numpy_helper.to_array(inits[node.input[1]]), 4, config.block_size)
            alternatives = {n.name: stand_in(n) for n in weight_matmuls(model)
                            if n.name not in eight and n.name not in config.exclude}
            switch_model = onnx.ModelProto()
            switch_model.CopyFrom(model)
            switch = WeightSwitch(switch_model, alternatives, workdir)
            upgraded, kl, search = take_out_until_budget(switch, list(alternatives), fp32, config.w4_max_ppl_increase,
                                                         valid_ids, config.sensitivity_tokens, measure,
                                                         _flops(_weight_shapes(model)))
            reasons.update({n: f"sensitive: KL {kl[n]:.3g} with only this MatMul in 4 bits -> 8 bits"
                            for n in upgraded})
            details["w4_search"] = search
            final = search["ppl_by_count"][len(upgraded)]  # the model last written is this one
            details["ppl"] = {"fp32": fp32, "quantized": final, "increase": final / fp32 - 1.0}
    return {"details": details, "reasons": reasons}


def fake_nbits(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """w (K, N) rounded as symmetric `bits`-bit blocks of `block_size` along K (K padded to a whole block)."""
    k, n = w.shape
    pad = -k % block_size
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block_size, n)
    top = 2 ** (bits - 1)
    # MLAS's symmetric blocks: the value of largest magnitude maps exactly to -top (the scale takes its sign)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None, :], axis=1)
    scale = peak / -top
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale), -top, top - 1) * scale
    return q.reshape(-1, n)[:k]


# ------------------------------------------------------------------------------------------------ embedding


def quantize_embeddings(model: onnx.ModelProto, block_size: int) -> list[str]:
    """Each Gather from a 2-D float table that nothing else reads becomes GatherBlockQuantized (com.microsoft):
    uint8 with zero point 128 (symmetric int8), one scale per `block_size` values of a row. Returns the tables.

    Only a row per token is read, so this costs no time; it is about size: SmolLM2-135M's 49152 x 576 table is
    113 MB in float, a sixth of the model, and MatMul quantization alone never touches it.
    """
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    done = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or axis != 0
                or readers[table.name] != 1 or table.dims[1] % block_size):
            continue
        w = numpy_helper.to_array(table)
        blocks = w.reshape(w.shape[0], -1, block_size)
        scale = (np.abs(blocks).max(-1) / 127).astype(np.float32)
        scale[scale == 0] = 1.0
        q = (np.clip(np.round(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8).reshape(w.shape)
        base = table.name
        model.graph.initializer.remove(table)
        model.graph.initializer.extend([numpy_helper.from_array(q, base + "_Q8"),
                                        numpy_helper.from_array(scale, base + "_scales"),
                                        numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), base + "_zp")])
        inputs = [base + "_Q8", node.input[1], base + "_scales", base + "_zp"]
        gathered = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=node.name + "_Q8",
                                    domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size,
                                    bits=8)
        node.CopyFrom(gathered)
        done.append(base)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _embeds(config: QuantConfig) -> bool:
    """Whether the recipe quantizes the embedding table (not `static`: the stock recipe, left as ORT makes it)."""
    return config.embedding_bits == 8 and config.recipe != "static"


# ------------------------------------------------------------------------------------------------- entry


def _ppl_pair(ref: Path, model: Path, valid_ids: list[list[int]]) -> dict:
    fp32, q = perplexity(ref, valid_ids), perplexity(model, valid_ids)
    return {"fp32": fp32, "quantized": q, "increase": q / fp32 - 1.0}


def _report(shapes: dict[str, tuple[int, int]], activation_matmuls: list[str], staged: Path, config: QuantConfig,
            result: dict) -> dict:
    """Which MatMuls are quantized, and how, is read back from the written graph, not assumed from what was asked.

    quantized_*: the recipe's own form (QDQ int8 for static/w8a8, MatMulNBits for w8/w4); fallback_*: the
    MatMuls kept at 8-bit weight-only instead (w8a8's and w4's sensitive ones, w4's output projection);
    float_matmuls: everything else, with the reason.
    """
    after = onnx.load(str(staged), load_external_data=False)
    bits = {"w8": 8, "w4": 4}.get(config.recipe)
    done = (nbits_quantized(after, bits) if bits else qdq_quantized(after)) & set(shapes)
    fallback = (set() if bits == 8 else nbits_quantized(after, 8)) & set(shapes)
    tables = [n.input[0].removesuffix("_Q8") for n in after.graph.node if n.op_type == "GatherBlockQuantized"]
    reasons = {name: "multiplies two activations (attention)" for name in activation_matmuls}
    reasons.update(result["reasons"])
    reasons.update({n: "onnxruntime did not quantize it" for n in shapes if n not in done | fallback
                    and n not in reasons})
    flops = _flops(shapes)
    total = max(sum(flops.values()), 1)
    return {"recipe": config.recipe, "weight_bits": bits or 8, "activation_bits": None if bits else 8,
            "quantized_matmuls": sorted(done),
            "fallback_matmuls": {n: reasons[n] for n in sorted(fallback)},
            "float_matmuls": {n: why for n, why in sorted(reasons.items()) if n not in fallback},
            "quantized_flop_share": sum(flops[n] for n in done) / total,
            "fallback_flop_share": sum(flops[n] for n in fallback) / total,
            "embedding": {"bits": 8 if tables else 32, "block_size": config.block_size if tables else None,
                          "tables": tables},
            **result["details"], "config": asdict(config)}


def quantize(model_path: str | Path, out_path: str | Path, calib_ids: list[list[int]],
             config: QuantConfig = QuantConfig(), valid_ids: list[list[int]] | None = None) -> dict:
    """Quantize `model_path` into `out_path` (written atomically, external data when over 2 GB).

    `calib_ids` / `valid_ids`: token id sequences (tokenized by the caller) for calibration and for the
    perplexity measurement. Returns the report: recipe, sizes, quantized MatMuls, float MatMuls with the reason,
    share of weight-MatMul FLOPs (K*N per token) that runs quantized, perplexity before/after when `valid_ids`.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    model = _load_checked(model_path)
    shapes = _weight_shapes(model)
    activation_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in shapes]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out_path.parent))
    try:
        staged = workdir / out_path.name
        if config.recipe in ("w8", "w4"):
            result = _weight_only(model, model_path, staged, config, calib_ids, valid_ids, workdir)
        else:
            result = _static(model, model_path, staged, calib_ids, valid_ids, config, workdir)
        if config.recipe in ("static", "w8a8"):
            mark_weight_bits(staged, 7 if config.reduce_range else 8)
        report = _report({**shapes, **result.get("added_shapes", {})}, activation_matmuls, staged, config, result)
        report.update(size_before=_files_size(model_path), size_after=_files_size(staged))
        move_model(staged, out_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report
