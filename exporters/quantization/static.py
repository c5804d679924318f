"""w8a8's static int8 QDQ graph, written from the float graph in one pass over its weights.

onnxruntime's quantize_static (the `static` recipe, kept as the stock baseline) loads the whole float model,
saves an augmented copy for its calibration session, holds every calibration output of a stride, then quantizes
a further in-memory copy: at 1B parameters that was several 5 GB float models at once. Here the same graph is
written without it:

- `activation_ranges`: the ranges onnxruntime's calibrators compute with `CalibStridedMinMax` = 1 (one sample
  per stride; its own MinMax merge and its `HistogramCollector` for percentile and entropy, with quantize_static's
  defaults), from one probe session of the float graph that also supplies the decode steps' past KV;
- `write_static`: the QDQ nodes and initializers quantize_static writes (uint8 activations asymmetric, int8
  weights symmetric per output channel, 7-bit with `reduce_range`; onnxruntime's names), each weight read,
  rounded and dropped one at a time (GPTQ's codes where given), a quantized activation read through its Q/DQ by
  the int8 MatMuls only (what `restore_float_readers` does to quantize_static's output).

tests/exporters/test_static.py checks the written graph against quantize_static's, initializer for initializer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import materialized, save_model_auto, skeleton, tensor_array
from exporters.probe import Feeds, probe_session
from exporters.quantization.embedding import quantize_embeddings, share_static_head
from exporters.quantization.nbits import write_nbits
from exporters.quantization.packs import PackedWeights
from exporters.quantization.qdq import QdqConfig
from exporters.quantization.quiet import quiet
from exporters.quantization.scales import half_scales

ACTIVATION_TYPE = TensorProto.UINT8
WEIGHT_TYPE = TensorProto.INT8
# quantize_static's calibrator settings (onnxruntime/quantization/calibrate.py `create_calibrator`)
HISTOGRAM = {"percentile": dict(num_bins=2048, symmetric=True, percentile=99.999),
             "entropy": dict(num_bins=128, symmetric=False, percentile=99.999)}

def activation_ranges(model: onnx.ModelProto, activations: list[str], feeds: Feeds, method: str,
                      workdir: Path | None = None, weights_dir: Path | None = None) -> dict[str, tuple]:
    """(low, high) of each activation over the calibration feeds, as onnxruntime's `method` calibrator computes
    them one sample at a time. `feeds`: a function of the probe session (whose presents give the feeds' past)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    collector = None
    if method != "minmax":
        settings = HISTOGRAM[method]
        collector = HistogramCollector(method=method, symmetric=settings["symmetric"], num_bins=settings["num_bins"],
                                       num_quantized_bins=128, percentile=settings["percentile"], scenario="same")
    with probe_session(model, activations, workdir, weights_dir) as session, quiet():
        for feed in feeds(session):
            values = session.run(activations, feed)
            if collector is not None:
                collector.collect({a: [v] for a, v in zip(activations, values)})
                continue
            for a, v in zip(activations, values):
                lo, hi = np.nanmin(v), np.nanmax(v)
                low[a] = lo if a not in low else min(low[a], lo)
                high[a] = hi if a not in high else max(high[a], hi)
    if collector is not None:
        with quiet():
            result = collector.compute_collection_result()
        return {a: (np.asarray(result[a][0], np.float32), np.asarray(result[a][1], np.float32)) for a in activations}
    return {a: (np.asarray(low[a], np.float32), np.asarray(high[a], np.float32)) for a in activations}


def activation_params(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (zero point, scale) of an activation range, as quantize_static computes them."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(ACTIVATION_TYPE, reduce_range=False, symmetric=False)
    zero_point, scale = compute_scale_zp(np.asarray(low, np.float32), np.asarray(high, np.float32), qmin, qmax)
    return np.asarray(zero_point, np.uint8), np.asarray(scale, np.float32)


def weight_levels(reduce_range: bool) -> int:
    """The symmetric int8 weight's largest level: 127, or 64 with `reduce_range` (onnxruntime's 7-bit range)."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    return int(get_qmin_qmax_for_qType(WEIGHT_TYPE, reduce_range=reduce_range, symmetric=True)[1])


def nearest_weight(w: np.ndarray, levels: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and scales of `w` (K, N), one scale per output column or one for all, computed as
    onnxruntime's `quantize_data` does (range widened to hold 0, scale in float64 then stored float32, codes
    rounded half to even from w / scale in float32)."""
    w = np.asarray(w, np.float32)
    lo = np.minimum(w.min(axis=0) if per_channel else w.min(), np.float32(0))
    hi = np.maximum(w.max(axis=0) if per_channel else w.max(), np.float32(0))
    absmax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    scale = (2 * absmax / (2 * levels)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)
    q = np.clip(np.round(w / scale), -levels, levels).astype(np.int8)
    return q, np.asarray(scale, np.float32)


def write_static(model: onnx.ModelProto, nodes: list[str], ranges: dict[str, tuple], per_channel: bool,
                 reduce_range: bool, rounded: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 weights_dir: str | Path = "", unread: Collection[str] = ()) -> onnx.ModelProto:
    """A new model: `model` with exactly the weight MatMuls `nodes` as QDQ int8 (codes and scales from `rounded`
    where given, else nearest), every other initializer copied into memory (those `model` left in external data
    under `weights_dir` read one at a time), but those named in `unread`, which keep their external data
    reference (the caller replaces their readers before the model is saved: the fallback's weights, whose
    blocks it has, are 5 GB of float on Llama-3.2-1B). `model` is not changed."""
    rounded = rounded or {}
    unread = set(unread)
    g = GraphIndex(model)
    chosen = [g.nodes[n] for n in nodes]
    weights = {n.input[1] for n in chosen}
    readers = g.consumers
    levels = weight_levels(reduce_range)
    out = skeleton(model)
    added_inits: list[TensorProto] = []
    weight_dq: dict[str, onnx.NodeProto] = {}  # weight -> its DequantizeLinear
    act_dq: dict[str, str] = {}
    for node in chosen:
        a, w = node.input[0], node.input[1]
        if w not in weight_dq:
            if node.name in rounded:
                q, scale = rounded[node.name]
            else:
                q, scale = nearest_weight(tensor_array(g.inits[w], weights_dir), levels, per_channel)
            zero = np.zeros(scale.shape, np.int8)
            added_inits += [numpy_helper.from_array(np.asarray(q, np.int8), w + "_quantized"),
                            numpy_helper.from_array(np.asarray(scale, np.float32), w + "_scale"),
                            numpy_helper.from_array(zero, w + "_zero_point")]
            axis = {"axis": 1} if np.ndim(scale) else {}
            weight_dq[w] = helper.make_node("DequantizeLinear", [w + "_quantized", w + "_scale", w + "_zero_point"],
                                            [w + "_DequantizeLinear_Output"], w + "_DequantizeLinear", **axis)
        if a not in act_dq:
            zero_point, scale = activation_params(*ranges[a])
            added_inits += [numpy_helper.from_array(scale, a + "_scale"),
                            numpy_helper.from_array(zero_point, a + "_zero_point")]
            act_dq[a] = a + "_DequantizeLinear_Output"
    kept = {t: any(r.name not in nodes or r.input[1] != t for r in readers.get(t, [])) for t in weights}
    for t in model.graph.initializer:
        if t.name not in weights or kept[t.name]:
            out.graph.initializer.append(t if t.name in unread else materialized(t, weights_dir))
    out.graph.initializer.extend(added_inits)
    quantized = set(nodes)
    new_nodes = list(weight_dq.values())
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if node.name in quantized:
            copy.input[0], copy.input[1] = act_dq[node.input[0]], node.input[1] + "_DequantizeLinear_Output"
        new_nodes.append(copy)
    out.graph.node.extend(_with_activation_qdq(new_nodes, act_dq))
    return out


def _with_activation_qdq(nodes: list[onnx.NodeProto], act_dq: dict[str, str]) -> list[onnx.NodeProto]:
    """`nodes` with each quantized activation's QuantizeLinear/DequantizeLinear pair before its first reader."""
    of_output = {dq: a for a, dq in act_dq.items()}
    out, placed = [], set()
    for node in nodes:
        for a in node.input:
            match = of_output.get(a)
            if match is not None and match not in placed:
                placed.add(match)
                params = [match + "_scale", match + "_zero_point"]
                out += [helper.make_node("QuantizeLinear", [match, *params], [match + "_QuantizeLinear_Output"],
                                         match + "_QuantizeLinear"),
                        helper.make_node("DequantizeLinear", [match + "_QuantizeLinear_Output", *params],
                                         [match + "_DequantizeLinear_Output"], match + "_DequantizeLinear")]
        out.append(node)
    return out


@dataclass
class StaticWriter:
    """Writes w8a8's model for any split of its targets into static int8 and the fallback (the search's mixes):
    the float graph, the calibrated ranges and GPTQ's codes are computed once and kept here."""
    model: onnx.ModelProto            # the float graph the float passes left (weights in memory or weights_dir)
    ranges: dict[str, tuple]          # activation -> (low, high), `activation_ranges`
    config: QdqConfig
    rounded: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # MatMul -> GPTQ (q, scale)
    packs: PackedWeights | None = None  # the w8 fallback's blocks: GPTQ's (packs.py), or nearest on demand
    tie: tuple | None = None          # (embedding Gather, lm_head, map): the table read from the int8 head
    weights_dir: Path = Path()

    def write(self, static_nodes: list[str], fallback_nodes: list[str], out_path: Path) -> dict:
        """`static_nodes` as static QDQ int8, `fallback_nodes` as the fallback (w8 weight-only, or float), the
        embedding as the recipe has it; every block scale stored float16. Returns half_scales' report."""
        w8 = bool(fallback_nodes) and self.config.fallback == "w8"
        # the w8 fallback's float weights are never read when its blocks are at hand (GPTQ's, or the store's):
        # they stay in external data until write_nbits drops them (the search's last mixes took every MatMul
        # out on Llama-3.2-1B, and copying their float weights in first was the stage's peak, 12.2 GiB)
        nodes = GraphIndex(self.model).nodes
        unread = [nodes[n].input[1] for n in fallback_nodes] if w8 and self.packs is not None else []
        m = write_static(self.model, static_nodes, self.ranges, self.config.per_channel, self.config.reduce_range,
                         {n: self.rounded[n] for n in static_nodes if n in self.rounded}, self.weights_dir, unread)
        if self.config.quantizes_embeddings:
            share_static_head(m, self.tie)  # the tied table stored once, where the head is static int8
            quantize_embeddings(m, self.config.block_size)
        if w8:
            m = write_nbits(m, dict.fromkeys(fallback_nodes, 8), self.config, packed_of=self.packs,
                            weights_dir=self.weights_dir)
        report = half_scales(m)
        # weights in model.onnx.data from 1 MB, as the weight-only writers save theirs: onnxruntime keeps an
        # inline model's whole file in a buffer beside the tensors it makes of it, and the search judges each
        # mix it writes (judging one was the stage's peak on Llama-3.2-1B, 12.2 GiB, with the file inline)
        save_model_auto(m, out_path, shipped=True)
        return report
