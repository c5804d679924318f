"""Pass `qdq`: static int8 as QDQ through onnxruntime's quantize_static (weights symmetric per output channel,
uint8 activations calibrated on prefill and decode feeds), GPTQ-rounded weights written into it, and the mix of
QDQ and fallback MatMuls the budget search asks for. Why each onnxruntime option is set: exporters/quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporters import progress
from exporters.calibration import KVCacheCalibrationReader
from exporters.gptq import fits, gptq
from exporters.graph import GraphIndex
from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD, files_size, save_model_auto, tensor_array
from exporters.probe import input_hessians
from exporters.quantization.config import WEIGHT_BITS_KEY
from exporters.quantization.embedding import quantize_embeddings, share_static_head
from exporters.quantization.nbits import BlockwiseRounding, nbits
from exporters.quantization.quiet import quiet
from exporters.quantization.scales import half_scales
from models.errors import UserError
from runtimes.contract import set_metadata


@dataclass(frozen=True)
class QdqConfig:
    calibrate_method: str             # activation ranges: "minmax" | "percentile" | "entropy"
    per_channel: bool                 # one weight scale per output channel
    reduce_range: bool                # 7-bit weights (no int16 saturation on x86 without VNNI)
    embedding: bool                   # every written model also gets the int8 embedding table (pass `embed`)
    fallback: str                     # what the search's taken-out MatMuls become: "w8" (MatMulNBits) or "float"
    block_size: int                   # MatMulNBits and embedding block size
    accuracy_level: int               # MatMulNBits compute type of the fallback
    exclude: tuple[str, ...] = ()     # MatMuls always left float

    @property
    def quantizes_embeddings(self) -> bool:
        return self.embedding


def with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
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


@dataclass(frozen=True)
class QdqJob:
    """Everything one quantize_static call needs; the calibration cache makes every call after the first
    (the budget search writes the chosen mix of int8 and float) reuse the ranges instead of recalibrating."""
    fp32_path: Path      # shape-inferred (and for w8a8 smoothed) float model
    cache_path: Path     # calibration ranges, written by the first call
    reader: KVCacheCalibrationReader
    config: QdqConfig
    rounded: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # MatMul -> GPTQ (q, scale)
    fallback_rounding: "BlockwiseRounding | None" = None  # GPTQ for the MatMuls that fall back to w8
    tie: tuple | None = None  # (embedding Gather, lm_head, map): the table read from the int8 head (embedding.py)


def quantize_qdq(job: QdqJob, nodes: list[str], out_path: Path) -> None:
    """Quantize exactly `nodes` (weight MatMuls) to QDQ int8; with none, the float model is copied."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not nodes:
        model = onnx.load(str(job.fp32_path))
        if job.config.quantizes_embeddings:
            quantize_embeddings(model, job.config.block_size)
        half_scales(model)
        save_model_auto(model, out_path)
        return
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[job.config.calibrate_method]
    extra = {"OpTypesToExcludeOutputQuantization": ["MatMul"],
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             "CalibStridedMinMax": 1,
             "WeightSymmetric": True}
    big = files_size(job.fp32_path) >= EXTERNAL_DATA_THRESHOLD
    cached = job.cache_path.is_file()
    with quiet():
        quantize_static(str(job.fp32_path), str(out_path), None if cached else job.reader,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=job.config.per_channel, reduce_range=job.config.reduce_range,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=big,
                        calibrate_method=method, extra_options=extra, calibration_cache_path=str(job.cache_path))
    if job.config.quantizes_embeddings or job.rounded:  # every model the search measures is the one it would write
        graph = onnx.load(str(out_path))
        restore_float_readers(graph, set(nodes))
        set_rounded_weights(graph, {n: job.rounded[n] for n in nodes if n in job.rounded})
        if job.config.quantizes_embeddings:
            share_static_head(graph, job.tie)  # the tied table stored once, where the head is static int8
            quantize_embeddings(graph, job.config.block_size)
        half_scales(graph)
        save_model_auto(graph, out_path)
        return
    graph = onnx.load(str(out_path), load_external_data=False)  # weights stay where they are
    if restore_float_readers(graph, set(nodes)):
        onnx.save_model(graph, str(out_path))


def set_rounded_weights(model: onnx.ModelProto, rounded: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Replace the int8 weight and scale behind each named QDQ MatMul's weight DequantizeLinear."""
    g = GraphIndex(model)
    made_by, inits = g.producers, g.inits
    for node in model.graph.node:
        if node.name in rounded:
            dq = made_by[node.input[1]]
            q, scale = rounded[node.name]
            for name, value in ((dq.input[0], q), (dq.input[1], scale)):
                if tuple(inits[name].dims) != value.shape:
                    raise RuntimeError(f"{node.name}: {name} has shape {tuple(inits[name].dims)}, not {value.shape}")
                inits[name].CopyFrom(numpy_helper.from_array(value, name))


def weight_hessians(model: onnx.ModelProto, targets: list[str], reader: KVCacheCalibrationReader,
                    workdir: Path, weights_dir: Path | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Input Hessians (X^T X over the calibration feeds) of the `targets` MatMuls, by activation name."""
    nodes = GraphIndex(model).nodes
    return input_hessians(model, sorted({nodes[t].input[0] for t in targets}), reader.through, workdir,
                          weights_dir)


def gptq_weights(model: onnx.ModelProto, targets: list[str], hessians: dict[str, np.ndarray], tokens: int,
                 levels: int, weights_dir: str | Path = "") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """GPTQ-rounded int8 weights and scales of `targets`, from the input Hessians of `model` (the smoothed
    float graph) over `tokens` calibration tokens (a weight too wide for them keeps nearest rounding, see
    `gptq.fits`); and what to report."""
    g = GraphIndex(model)
    nodes, inits = g.nodes, g.inits
    rounded, nearest = {}, []
    for t in progress.each(targets, "GPTQ", unit="MatMul"):
        w = tensor_array(inits[nodes[t].input[1]], weights_dir)
        if not fits(w.shape[0], tokens):
            nearest.append(t)
            continue
        rounded[t] = gptq(w, hessians[nodes[t].input[0]], levels)
    return rounded, {"calibration_tokens": tokens, "nearest_too_few_tokens": nearest}


def write_mix(job: QdqJob, static_nodes: list[str], fallback_nodes: list[str], out_path: Path) -> None:
    """`static_nodes` as static QDQ int8, `fallback_nodes` as the config's fallback (w8 weight-only or float)."""
    quantize_qdq(job, static_nodes, out_path)
    if fallback_nodes and job.config.fallback == "w8":
        model = onnx.load(str(out_path))
        if job.fallback_rounding is not None:
            job.fallback_rounding.apply(model, {name: 8 for name in fallback_nodes})
        mixed = nbits(model, 8, job.config, include=fallback_nodes)
        half_scales(mixed)
        save_model_auto(mixed, out_path)


def restore_float_readers(model: onnx.ModelProto, quantized: set[str]) -> bool:
    """Give every reader of a quantized activation that is not an int8 MatMul the float tensor back.

    quantize_static inserts one shared Q/DQ pair per activation and rewires *all* its readers to the DQ output
    (DedicatedQDQPair only helps when two or more readers are quantized): with q and k left in float and v in
    int8, q and k would silently run as float MatMuls on rounded inputs, slower and less accurate than asked.
    Returns whether anything changed.
    """
    made_by = GraphIndex(model).producers
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
    producers = GraphIndex(model).producers
    return {n.name for n in model.graph.node if n.op_type == "MatMul"
            and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])}
