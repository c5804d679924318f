"""Pass `qdq`: the `static` recipe's int8 QDQ through onnxruntime's quantize_static (weights symmetric per output
channel, uint8 activations calibrated on prefill and decode feeds), the stock tool w8a8 is compared with; and
what both recipes' QDQ graphs share (the config, float readers given their float activation back). Why each
onnxruntime option is set: exporters/quantize.py; w8a8 writes the same graph itself (static.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from exporters.calibration import KVCacheCalibrationReader
from exporters.graph import GraphIndex
from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD, files_size, load_onnx, save_model_auto
from exporters.quantization.config import WEIGHT_BITS_KEY
from exporters.quantization.quiet import quiet
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
    searched: bool = True             # w8a8: a search may write other mixes (keep what writing them needs)

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
    """Everything one quantize_static call needs (the `static` recipe: onnxruntime's stock tool, as it writes)."""
    fp32_path: Path      # shape-inferred float model
    cache_path: Path     # calibration ranges, written by the first call
    reader: KVCacheCalibrationReader
    config: QdqConfig


def quantize_qdq(job: QdqJob, nodes: list[str], out_path: Path) -> None:
    """Quantize exactly `nodes` (weight MatMuls) to QDQ int8 with onnxruntime's quantize_static; a reader of a
    quantized activation that is not one of them gets the float activation back."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not nodes:  # (quantize_static reads an empty list as every node)
        save_model_auto(load_onnx(job.fp32_path), out_path)
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
    graph = onnx.load(str(out_path), load_external_data=False)  # weights stay where they are
    if restore_float_readers(graph, set(nodes)):
        onnx.save_model(graph, str(out_path))


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
