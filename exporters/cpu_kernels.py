"""ONNX -> ONNX: MatMuls onto pipeline's native CPU kernels (runtimes/kernels/int8_matmul.c).

StaticInt8MatMul: a static-int8 QDQ graph's MatMuls.

Matches, for each MatMul of a QDQ graph::

    x -> QuantizeLinear(s_x, z_x: uint8) -> DequantizeLinear -> MatMul -> y
                        W: int8 (K, N) -> DequantizeLinear(s_w: per column or one, zero point 0) --^

and replaces it with one StaticInt8MatMul(x, W packed, s_w, colsum(W), s_x, z_x), which computes the same
integer products and the same float epilogue as onnxruntime's QuantizeLinear + MatMulIntegerToFloat
(runtimes/kernels/int8_matmul.c). The weight is stored packed in 16-column panels (N/16, K/4, 64) so that the
kernel reads it front to back; the QuantizeLinear / DequantizeLinear nodes left without readers go. MatMuls
that do not fit the kernel (K not a multiple of 4, N not of 16, a weight zero point, a per-channel activation
scale) stay as they are. The result needs the kernel library at run time (`python -m runtimes.kernels build`);
the QDQ graph it came from stays the portable one (NPU execution providers, other CPUs). Where the embedding
gathers its rows from the head's int8 weight (a tied table stored once, embedding.share_static_head), it is
made to gather them from the packed copy (`gather_packed_columns`), so that weight is still stored once.

BlockInt8MatMul and BlockGather, for weight-only heads and narrow codes: exporters/block_kernels.py. A static int8
head that could not share the table (its per-column codes too coarse for the embedding, as on Gemma 3, whose
table is a GGUF's exact Q8_0 blocks) is first moved onto the table's own blocks (`head_on_table_blocks`, where
the caller asks): the table is then stored once and the head reads it as llama.cpp's Q8_0 does, with per-block
int8 activations, on BlockInt8MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.block_kernels import (fold_offsets, pack_four_bit, pack_narrow_blocks, pack_shared_head,
                                     rewrite_shared_blocks)
from exporters.gated_mlp import fuse_gated_mlps
from exporters.graph import GraphIndex
from exporters.native_attention import native_attention
from exporters.onnx_io import load_onnx, move_model, save_model_auto
from exporters.optimize import remove_dead_nodes
from exporters.quantization.embedding import share_tied_table
from exporters.quantization.scales import stored_scales
from models.errors import UserError
from models.files import staging_dir
from runtimes.contract import LOGITS, set_metadata
from runtimes.kernels import ATTENTION_OP, BLOCK_OP, DOMAIN, GATED_OP, GATHER_OP, OP

KERNEL_KEY = "pipeline.cpu_kernels"  # metadata: which native kernels the graph needs
# metadata: "native" where every static int8 MatMul runs on StaticInt8MatMul, whose every build is exact for full
# 8-bit weights: onnxruntime's int8 GEMM, which saturates on them on x86 without VNNI, then runs none
INT8_GEMM_KEY = "pipeline.int8_gemm"


@dataclass(frozen=True)
class Match:
    matmul: onnx.NodeProto
    x: str                 # float input of the activation's QuantizeLinear
    x_scale: str
    x_zero_point: str
    weight: np.ndarray     # int8 (K, N)
    w_scale: np.ndarray    # float32 (N,)
    weight_name: str       # the int8 initializer, which a shared embedding may also gather columns of


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
        found.append(Match(node, q.input[0], q.input[1], q.input[2], weight, w_scale, w_dq.input[0]))
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
        # the bound on |W| lets the AVX2 build add pairs of products in int16 where they cannot saturate (<= 64)
        nodes.append(helper.make_node(OP, [m.x, *names, m.x_scale, m.x_zero_point], [node.output[0]],
                                      name=f"{base}/{OP}", domain=DOMAIN,
                                      weight_max_abs=int(np.abs(m.weight.astype(np.int16)).max(initial=0))))
    del graph.node[:]
    graph.node.extend(nodes)  # each new node where its MatMul was: still in topological order
    graph.initializer.extend(new_inits)
    for m in found.values():
        gather_packed_columns(model, m.weight_name, f"{m.matmul.name or m.matmul.output[0]}/packed_weight",
                              m.weight.shape[0])
    remove_dead_nodes(model)  # the Q/DQ pairs and weight DequantizeLinear nodes nothing reads any more
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    set_metadata(model, KERNEL_KEY, OP)
    if not static_int8_matmuls(model):
        set_metadata(model, INT8_GEMM_KEY, "native")
    return len(found)


def static_int8_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls onnxruntime would run as an int8 GEMM: one input dequantized from int8 initializer codes."""
    g = GraphIndex(model)

    def int8_codes(name: str) -> bool:
        dq = g.producers.get(name)
        return dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in g.inits \
            and g.inits[dq.input[0]].data_type == onnx.TensorProto.INT8

    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(int8_codes(i) for i in n.input)]


def gather_packed_columns(model: onnx.ModelProto, weight: str, packed: str, k: int) -> int:
    """A shared embedding's column gather of the int8 head `weight` (K, N), with its transpose to (batch, seq, K)
    (exporters/quantization/embedding.py `share_static_head`), made to read the packed copy instead, so the
    original can go: token n's K codes sit at packed[n // 16, k // 4, 4 (n % 16) + k % 4] (`pack`), one GatherND.
    Returns how many gathers moved."""
    index = GraphIndex(model)
    moved = 0
    for gather in [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == weight]:
        readers = index.consumers.get(gather.output[0], [])
        axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
        if axis != 1 or len(readers) != 1 or readers[0].op_type != "Transpose" \
                or [list(a.ints) for a in readers[0].attribute if a.name == "perm"] != [[1, 2, 0]]:
            continue
        transpose, ids, p = readers[0], gather.input[1], f"{gather.name}/packed"
        ks = np.arange(k, dtype=np.int64)
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(16, np.int64), f"{p}/sixteen"),
            numpy_helper.from_array(np.array(4, np.int64), f"{p}/four"),
            numpy_helper.from_array(np.zeros(k, np.int64), f"{p}/zeros"),
            numpy_helper.from_array(ks // 4, f"{p}/groups"),
            numpy_helper.from_array(ks % 4, f"{p}/within"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last_axis")])
        new = [helper.make_node("Div", [ids, f"{p}/sixteen"], [f"{p}/panel"], f"{p}/Panel"),
               helper.make_node("Mod", [ids, f"{p}/sixteen"], [f"{p}/column"], f"{p}/Column"),
               helper.make_node("Mul", [f"{p}/column", f"{p}/four"], [f"{p}/lane"], f"{p}/Lane"),
               helper.make_node("Unsqueeze", [f"{p}/panel", f"{p}/last_axis"], [f"{p}/panel3"], f"{p}/Panel3"),
               helper.make_node("Unsqueeze", [f"{p}/lane", f"{p}/last_axis"], [f"{p}/lane3"], f"{p}/Lane3"),
               helper.make_node("Add", [f"{p}/panel3", f"{p}/zeros"], [f"{p}/i0"], f"{p}/I0"),
               helper.make_node("Shape", [f"{p}/i0"], [f"{p}/shape"], f"{p}/Shape"),
               helper.make_node("Expand", [f"{p}/groups", f"{p}/shape"], [f"{p}/i1"], f"{p}/I1"),
               helper.make_node("Add", [f"{p}/lane3", f"{p}/within"], [f"{p}/i2"], f"{p}/I2")]
        new += [helper.make_node("Unsqueeze", [f"{p}/{i}", f"{p}/last_axis"], [f"{p}/{i}_4"], f"{p}/{i}_4")
                for i in ("i0", "i1", "i2")]
        new += [helper.make_node("Concat", [f"{p}/i0_4", f"{p}/i1_4", f"{p}/i2_4"], [f"{p}/indices"],
                                 f"{p}/Indices", axis=-1),
                helper.make_node("GatherND", [packed, f"{p}/indices"], list(transpose.output), f"{p}/GatherND")]
        at = list(model.graph.node).index(gather)
        model.graph.node.remove(gather)
        model.graph.node.remove(transpose)
        for i, node in enumerate(new):
            model.graph.node.insert(at + i, node)
        moved += 1
    return moved


# relative residual |W - X E^T| / |W| below which a static int8 head W is the embedding's table E seen through one
# hidden x hidden map X (smoothing, a folded norm): the int8 head's own rounding is a few percent (Gemma 3 270M:
# 3.3%), an unrelated table gives about 1
HEAD_FIT_TOLERANCE = 0.1
# off-diagonal share of the fitted map below which it is applied as a Mul: a smoothing's diagonal map comes back
# with the int8 head's rounding in it (Gemma 3 270M: 0.3%)
DIAGONAL_TOLERANCE = 1e-2
FIT_ROWS = 16384           # table rows per float64 block of the fit


def _block_table(index: GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes uint8 (V, K), scales float32 (V, K/32)) of a GatherBlockQuantized embedding in the layout
    MatMulNBits reads (8 bits, blocks of 32 along the row, zero point 128), else None."""
    attrs = {a.name: a.i for a in node.attribute}
    if (node.op_type != "GatherBlockQuantized" or attrs.get("bits") != 8 or attrs.get("block_size") != 32
            or attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis") != 1 or node.input[0] not in index.inits):
        return None
    codes, scales = numpy_helper.to_array(index.inits[node.input[0]]), stored_scales(index, node.input[2])
    if scales is None or codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] % 32 \
            or scales.shape != (codes.shape[0], codes.shape[1] // 32):
        return None
    if len(node.input) > 3 and node.input[3]:
        zero = index.inits.get(node.input[3])
        if zero is None or np.any(numpy_helper.to_array(zero) != 128):
            return None
    return codes, scales


def table_map(weight: np.ndarray, w_scale: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray,
                                                                                                       float]:
    """The map X (K, K) with which the head W = weight * w_scale (K, V) is closest to X E^T, E the table's
    dequantized rows (V, K), by least squares in float64 over blocks of rows; and the relative residual."""
    k = weight.shape[0]
    gram, cross, rows = np.zeros((k, k)), np.zeros((k, k)), codes.shape[0]

    def blocks():
        for r in range(0, rows, FIT_ROWS):
            e = ((codes[r:r + FIT_ROWS].astype(np.float64) - 128).reshape(-1, k // 32, 32)
                 * scales[r:r + FIT_ROWS, :, None]).reshape(-1, k)
            yield e, weight[:, r:r + FIT_ROWS].astype(np.float64) * w_scale[r:r + FIT_ROWS]

    for e, w in blocks():
        gram += e.T @ e
        cross += w @ e
    x = np.linalg.solve(gram, cross.T).T
    residual = norm = 0.0
    for e, w in blocks():
        residual += float(np.sum((w - x @ e.T) ** 2))
        norm += float(np.sum(w ** 2))
    return x, (residual / norm) ** 0.5 if norm else float("inf")


def head_on_table_blocks(model: onnx.ModelProto) -> dict | None:
    """A static int8 head beside an embedding of its own int8 blocks is the table stored twice. Where the head is
    the table seen through a map (`table_map` within HEAD_FIT_TOLERANCE), it becomes x -> x X (a Mul where X is
    diagonal) -> 8-bit MatMulNBits on the table's blocks (accuracy level 4: per-block int8 activations), and the
    embedding gathers those blocks (embedding.share_tied_table): one copy, which `rewrite_shared_blocks` then
    puts on BlockInt8MatMul. Changes the logits (the head's arithmetic is another), so the caller judges them.
    Returns what it did, or None where nothing fits."""
    index = GraphIndex(model)
    head = next((m for m in matches(model) if LOGITS in m.matmul.output), None)
    embeds = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    if head is None or len(embeds) != 1 or (table := _block_table(index, embeds[0])) is None:
        return None
    codes, scales = table
    if codes.shape != head.weight.shape[::-1]:
        return None
    sample = slice(0, min(codes.shape[0], FIT_ROWS))  # an untied head fails on a few rows already
    if codes.shape[0] > FIT_ROWS and not table_map(head.weight[:, sample], head.w_scale[sample], codes[sample],
                                                   scales[sample])[1] <= HEAD_FIT_TOLERANCE:
        return None
    x, residual = table_map(head.weight, head.w_scale, codes, scales)
    if not residual <= HEAD_FIT_TOLERANCE:
        return None
    embed, name = embeds[0], head.matmul.name or head.matmul.output[0]
    p = f"{name}/table_blocks"
    off = x - np.diag(np.diag(x))
    diagonal = bool(np.linalg.norm(off) <= DIAGONAL_TOLERANCE * np.linalg.norm(x))
    v, k = codes.shape
    model.graph.initializer.extend([
        numpy_helper.from_array(np.diag(x).astype(np.float32) if diagonal else x.astype(np.float32), f"{p}/map"),
        numpy_helper.from_array(codes.reshape(v, k // 32, 32), f"{p}/blocks")])
    mapped = helper.make_node("Mul" if diagonal else "MatMul", [head.x, f"{p}/map"], [f"{p}/mapped"],
                              f"{p}/Map")
    matmul = helper.make_node("MatMulNBits", [f"{p}/mapped", f"{p}/blocks", embed.input[2]],
                              list(head.matmul.output), f"{name}_Q8", domain="com.microsoft", K=k, N=v, bits=8,
                              block_size=32, accuracy_level=4)
    at = list(model.graph.node).index(head.matmul)
    model.graph.node.remove(head.matmul)
    model.graph.node.insert(at, matmul)
    model.graph.node.insert(at, mapped)
    if not share_tied_table(model, embed.name, name):
        raise RuntimeError(f"{name}: the head on the table's blocks could not be shared with {embed.name}")
    remove_dead_nodes(model)  # the head's Q/DQ, its int8 weight, the table's own codes
    return {"matmul": name, "fit_relative_residual": round(residual, 6),
            "map": "diagonal" if diagonal else f"{k}x{k}"}


def specialize(source: Path, target: Path, portable: Path | None = None, move_head: bool = False,
               fuse_mlp: bool = False, attention: bool = False, four_bit: bool = False) -> dict:
    """source model.onnx -> target model.onnx with its static int8 MatMuls and its shared 8-bit heads on the
    native kernels (with `fuse_mlp`, also each SwiGLU product and its online rotation as one native op, with
    `attention` each GroupQueryAttention on the native CacheAttention, with `four_bit` each unshared 4-bit
    MatMulNBits on BlockInt8MatMul: all three round otherwise than onnxruntime; the gguf recipe's offset terms of
    the MatMuls now on BlockInt8MatMul go into those ops);
    written to a temp name, then renamed. Where the head moved onto the table's blocks (`head_on_table_blocks`,
    which changes the logits), the graph as it is then, before the native kernels, is also saved at `portable`:
    what the native graph must equal."""
    model = load_onnx(source)
    before = len(model.graph.node)
    moved = head_on_table_blocks(model) if move_head else None
    if moved is not None and portable is not None:
        save_model_auto(model, portable)
    static, head = rewrite(model), pack_shared_head(model)
    shared = rewrite_shared_blocks(model)
    packed = {**head, **pack_narrow_blocks(model), **(pack_four_bit(model) if four_bit else {})}
    if not static + shared + len(packed):
        raise UserError(f"{source} has no static int8 MatMul, no 8-bit head shared with its embedding, no 8-bit "
                        "blocks of fewer bits and no 4-bit blocks for the native kernels: quantize it with `pipeline "
                        "quantize --recipe w8a8` (or w4, w8, gguf with a tied embedding) first")
    offsets = fold_offsets(model)  # a GGUF's per-block minimums, into the ops that now hold their blocks
    gated = fuse_gated_mlps(model) if fuse_mlp else 0
    attended = native_attention(model) if attention else 0
    kernels = [name for name, count in ((OP, static), (BLOCK_OP, shared + len(packed)), (GATHER_OP, len(head)),
                                        (GATED_OP, gated), (ATTENTION_OP, attended)) if count]
    set_metadata(model, KERNEL_KEY, ",".join(kernels))
    with staging_dir(target) as staging:  # saved under its final name (the external data's name is inside it)
        save_model_auto(model, staging / target.name, shipped=True)
        move_model(staging / target.name, target)
    results = {"kernel": " + ".join(kernels), "matmuls": static + shared + len(packed), "static_matmuls": static,
               "shared_head_matmuls": shared + len(head), "packed_matmuls": packed, "gated_mlps": gated,
               "native_attention": attended, "offset_terms": offsets,
               "nodes_before": before, "nodes_after": len(model.graph.node)}
    if moved is not None:
        results["head_on_table_blocks"] = moved
    return results
