"""ONNX -> ONNX: a static-int8 QDQ graph's MatMuls as pipeline's native CPU kernel (`com.pipeline.StaticInt8MatMul`).

Matches, for each MatMul of a QDQ graph::

    x -> QuantizeLinear(s_x, z_x: uint8) -> DequantizeLinear -> MatMul -> y
                        W: int8 (K, N) -> DequantizeLinear(s_w: per column or one, zero point 0) --^

and replaces it with one StaticInt8MatMul(x, W packed, s_w, colsum(W), s_x, z_x), which computes the same
integer products and the same float epilogue as onnxruntime's QuantizeLinear + MatMulIntegerToFloat
(runtimes/kernels/int8_matmul.c). The weight is stored packed in 16-column panels (N/16, K/4, 64) so that the
kernel reads it front to back; the QuantizeLinear / DequantizeLinear nodes left without readers go. MatMuls
that do not fit the kernel (K not a multiple of 4, N not of 16, a weight zero point, a per-channel activation
scale) stay as they are. The result needs the kernel library at run time (`python -m runtimes.kernels build`);
the QDQ graph it came from stays the portable one (NPU execution providers, other CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import move_model, save_model_auto
from exporters.optimize import remove_dead_nodes
from models.errors import UserError
from models.files import staging_dir
from runtimes.contract import set_metadata

DOMAIN = "com.pipeline"
OP = "StaticInt8MatMul"
KERNEL_KEY = "pipeline.cpu_kernels"  # metadata: which native kernels the graph needs


@dataclass(frozen=True)
class Match:
    matmul: onnx.NodeProto
    x: str                 # float input of the activation's QuantizeLinear
    x_scale: str
    x_zero_point: str
    weight: np.ndarray     # int8 (K, N)
    w_scale: np.ndarray    # float32 (N,)


def pack(weight: np.ndarray) -> np.ndarray:
    """int8 (K, N) -> (N/16, K/4, 64): packed[p, g, 4c + t] = weight[4g + t, 16p + c]."""
    k, n = weight.shape
    return np.ascontiguousarray(weight.reshape(k // 4, 4, n // 16, 16).transpose(2, 0, 3, 1)).reshape(
        n // 16, k // 4, 64)


def _scalar(inits: dict, name: str) -> np.ndarray | None:
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return value if value.size == 1 else None


def matches(model: onnx.ModelProto) -> list[Match]:
    graph = model.graph
    index = GraphIndex(model)
    inits, producer = index.inits, index.producers
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        a_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(a_dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or w_dq.input[0] not in inits:
            continue
        if list(q.input[1:3]) != list(a_dq.input[1:3]):
            continue
        s_x, z_x = _scalar(inits, q.input[1]), _scalar(inits, q.input[2])
        if s_x is None or z_x is None or z_x.dtype != np.uint8:
            continue
        weight = numpy_helper.to_array(inits[w_dq.input[0]])
        if weight.dtype != np.int8 or weight.ndim != 2 or weight.shape[0] % 4 or weight.shape[1] % 16:
            continue
        if len(w_dq.input) > 2 and w_dq.input[2]:
            zero = numpy_helper.to_array(inits[w_dq.input[2]]) if w_dq.input[2] in inits else None
            if zero is None or np.any(zero != 0):
                continue
        if w_dq.input[1] not in inits:
            continue
        w_scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32).reshape(-1)
        axis = next((helper.get_attribute_value(a) for a in w_dq.attribute if a.name == "axis"), 1)
        if w_scale.size == 1:
            w_scale = np.full(weight.shape[1], w_scale[0], np.float32)
        elif w_scale.size != weight.shape[1] or axis not in (1, -1):
            continue
        found.append(Match(node, q.input[0], q.input[1], q.input[2], weight, w_scale))
    return found


def rewrite(model: onnx.ModelProto) -> int:
    """Replace every matching MatMul in place; returns how many."""
    graph = model.graph
    found = {m.matmul.output[0]: m for m in matches(model)}
    if not found:
        return 0
    nodes, new_inits = [], []
    for node in graph.node:
        m = found.get(node.output[0]) if node.op_type == "MatMul" else None
        if m is None:
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        names = [f"{base}/packed_weight", f"{base}/weight_scale", f"{base}/weight_colsum"]
        new_inits += [numpy_helper.from_array(pack(m.weight), names[0]),
                      numpy_helper.from_array(m.w_scale, names[1]),
                      numpy_helper.from_array(m.weight.sum(axis=0, dtype=np.int32), names[2])]
        nodes.append(helper.make_node(OP, [m.x, *names, m.x_scale, m.x_zero_point], [node.output[0]],
                                      name=f"{base}/{OP}", domain=DOMAIN))
    del graph.node[:]
    graph.node.extend(nodes)  # each new node where its MatMul was: still in topological order
    graph.initializer.extend(new_inits)
    remove_dead_nodes(model)  # the Q/DQ pairs and weight DequantizeLinear nodes nothing reads any more
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    set_metadata(model, KERNEL_KEY, OP)
    return len(found)


def specialize(source: Path, target: Path) -> dict:
    """source QDQ model.onnx -> target model.onnx using the native kernel; written to a temp name, then renamed."""
    model = onnx.load(str(source))
    before = len(model.graph.node)
    count = rewrite(model)
    if not count:
        raise UserError(f"{source} has no static int8 MatMul the native kernel can take: quantize it with "
                        "`pipeline quantize --recipe w8a8` (or static) first")
    with staging_dir(target) as staging:  # saved under its final name (the external data's name is inside it)
        save_model_auto(model, staging / target.name, shipped=True)
        move_model(staging / target.name, target)
    return {"kernel": OP, "matmuls": count, "nodes_before": before, "nodes_after": len(model.graph.node)}
