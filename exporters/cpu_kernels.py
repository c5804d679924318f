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

BlockInt8MatMul: an 8-bit MatMulNBits whose stored blocks another node also reads (the tied head whose blocks
the token embedding gathers, exporters/quantization/embedding.py). onnxruntime prepacks a MatMulNBits weight into
a copy of its own and keeps the stored blocks while anything else reads them, so such a table is in memory
twice (Gemma 3's 262,144 x 640 head: 388 MB where 168 MB are the table). The op reads the stored blocks in
place, with the same int8 arithmetic as MatMulNBits at accuracy_level 4; nothing in the file changes but the
node. A static int8 head that could not share the table (its per-column codes too coarse for the embedding, as
on Gemma 3, whose table is a GGUF's exact Q8_0 blocks) is first moved onto the table's own blocks
(`head_on_table_blocks`, where the caller asks): the table is then stored once and the head reads it as
llama.cpp's Q8_0 does, with per-block int8 activations.

An 8-bit MatMulNBits that nothing else reads, whose codes span fewer bits (a GGUF's Q5_0 blocks, which the gguf
recipe writes as 8-bit blocks, MatMulNBits having no 5-bit form), becomes BlockInt8MatMul over those codes
packed at their own width (`pack_narrow_blocks`): the file holds 5 bits a weight, not 8; the kernel unpacks them
once when the session starts and computes as on the stored blocks.

BlockGather: a tied head of such narrow codes (w4's --head-bits 5 to 7), whose blocks the token embedding
gathers, is packed the same way, and the embedding's lookup reads the rows it needs from the packed codes
(`pack_shared_head`): the table is stored once, at its codes' width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import move_model, save_model_auto
from exporters.optimize import remove_dead_nodes
from exporters.quantization.embedding import share_tied_table
from exporters.quantization.scales import stored_scales
from models.errors import UserError
from models.files import staging_dir
from runtimes.contract import LOGITS, set_metadata
from runtimes.kernels import BLOCK_OP, GATHER_OP, OP

DOMAIN = "com.pipeline"
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


def _float_scales(index: GraphIndex, name: str) -> bool:
    """Whether a MatMulNBits' scales are float32 (the kernel's type) from initializers: a float32 initializer, or
    one stored as float16 behind a Cast to float (the writers' block scales, the gguf recipe's factors)."""
    if name in index.inits:
        return index.inits[name].data_type == onnx.TensorProto.FLOAT
    return stored_scales(index, name) is not None


def block_matmuls(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[tuple[onnx.NodeProto, bool]]:
    """The 8-bit MatMulNBits BlockInt8MatMul computes as they are (blocks of 32, zero point 128, int8 activations:
    accuracy_level 4, float32), each with whether another node also reads its stored blocks."""
    index = index or GraphIndex(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        blocks = index.inits.get(node.input[1])
        if (attrs.get("bits") != 8 or attrs.get("block_size") != 32 or attrs.get("accuracy_level") != 4
                or any(node.input[3:]) or blocks is None or blocks.data_type != onnx.TensorProto.UINT8
                or list(blocks.dims) != [attrs.get("N"), attrs.get("K", 0) // 32, 32] or attrs["K"] % 32
                or not _float_scales(index, node.input[2])):
            continue
        found.append((node, index.uses[node.input[1]] > 1))
    return found


def shared_block_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """`block_matmuls` whose stored blocks another node also reads."""
    return [node for node, shared in block_matmuls(model) if shared]


def _to_block_op(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    node.op_type, node.domain = BLOCK_OP, DOMAIN
    node.name = f"{node.name}/{BLOCK_OP}"
    del node.attribute[:], node.input[3:]
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def rewrite_shared_blocks(model: onnx.ModelProto) -> int:
    """Each MatMulNBits of `shared_block_matmuls` becomes BlockInt8MatMul on the same inputs; returns how many."""
    found = shared_block_matmuls(model)
    for node in found:
        _to_block_op(model, node)
    return len(found)


MAX_SEGMENTS = 64       # the kernel's limit on runs of rows of one width (int8_matmul.c)
PACK_MIN_SAVING = 1     # bits a weight, on average, that packing must save for an unshared MatMul to move


def code_bits(codes: np.ndarray) -> np.ndarray:
    """uint8 (N, ...) 8-bit codes (zero point 128) -> per row the fewest bits b, 2 to 8, whose signed range
    [-2^(b-1), 2^(b-1)) holds every code - 128 of the row."""
    v = codes.reshape(len(codes), -1)
    need = np.maximum(128 - v.min(axis=1).astype(np.int64), v.max(axis=1).astype(np.int64) - 127)  # 2^(b-1) >= need
    return np.maximum(2, 1 + np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))


def segments(bits: np.ndarray) -> tuple[list[int], list[int]]:
    """Per-row widths -> (bits, rows) of their runs; one run at the widest where there would be more than the
    kernel takes."""
    starts = [0, *(np.flatnonzero(np.diff(bits)) + 1).tolist()]
    if len(starts) > MAX_SEGMENTS:
        return [int(bits.max())], [len(bits)]
    ends = starts[1:] + [len(bits)]
    return [int(bits[s]) for s in starts], [e - s for s, e in zip(starts, ends)]


def pack_codes(codes: np.ndarray, bits: list[int], rows: list[int], chunk: int = 4096) -> np.ndarray:
    """uint8 (N, K/32, 32) codes -> BlockInt8MatMul's packed codes: per run of rows at b bits, each block's 32
    values code - 128 + 2^(b-1) as a little-endian bit stream of 4b bytes (int8_matmul.c), flat."""
    out, start = [], 0
    for b, count in zip(bits, rows):
        shift, planes = np.uint8(128 - 2 ** (b - 1)), np.arange(b, dtype=np.uint8)
        for first in range(start, start + count, chunk):
            c = codes[first:min(first + chunk, start + count)] - shift
            stream = ((c[..., None] >> planes) & 1).reshape(*c.shape[:-1], c.shape[-1] * b)
            out.append(np.packbits(stream, axis=-1, bitorder="little").reshape(-1))
        start += count
    return np.concatenate(out)


def narrow_widths(codes: np.ndarray) -> tuple[list[int], list[int]] | None:
    """`segments` of 8-bit codes (N, K/32, 32) that fit fewer bits, where packing them saves at least
    PACK_MIN_SAVING bits a weight on average; else None."""
    bits, rows = segments(code_bits(codes))
    saved = sum((8 - b) * r for b, r in zip(bits, rows)) / len(codes)
    return (bits, rows) if saved >= PACK_MIN_SAVING else None


def _packed_attributes(node: onnx.NodeProto, k: int, bits: list[int], rows: list[int]) -> None:
    node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("bits", bits),
                           helper.make_attribute("rows", rows)])


def _to_packed_op(model: onnx.ModelProto, node: onnx.NodeProto, codes: np.ndarray, bits: list[int],
                  rows: list[int]) -> dict:
    """The `block_matmuls` node as BlockInt8MatMul over its codes packed at (bits, rows), a new initializer named
    after its blocks + "_packed" (the blocks stay for the caller to drop); returns its widths and the bytes
    before and after."""
    packed = pack_codes(codes, bits, rows)
    name = f"{node.input[1]}_packed"
    model.graph.initializer.append(numpy_helper.from_array(packed, name))
    k = next(a.i for a in node.attribute if a.name == "K")
    _to_block_op(model, node)
    node.input[1] = name
    _packed_attributes(node, k, bits, rows)
    widths = Counter()
    for b, r in zip(bits, rows):
        widths[b] += r
    return {"rows_at_bits": {str(b): widths[b] for b in sorted(widths)},
            "bytes": [int(codes.size), int(packed.size)]}


def _drop_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def pack_narrow_blocks(model: onnx.ModelProto) -> dict[str, dict]:
    """Each unshared `block_matmuls` node whose codes fit fewer bits (`narrow_widths`) becomes BlockInt8MatMul
    over the codes packed at their widths (attributes K, bits, rows); returns, per node moved, its widths and
    the bytes before and after."""
    index = GraphIndex(model)
    moved, dropped = {}, set()
    for node, shared in block_matmuls(model, index):
        if shared:  # the other reader needs the 8-bit blocks (`pack_shared_head` takes a tied table's)
            continue
        codes = numpy_helper.to_array(index.inits[node.input[1]])
        widths = narrow_widths(codes)
        if widths is None:
            continue
        dropped.add(node.input[1])
        original = node.name
        moved[original] = _to_packed_op(model, node, codes, *widths)
    _drop_initializers(model, dropped)
    return moved


def shared_table_lookup(index: GraphIndex, matmul: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str] | None:
    """The nodes through which a tied table reads the 8-bit MatMulNBits `matmul`'s blocks (embedding.py
    `share_tied_table`: Gather of the blocks, Cast, Sub 128, times the Gather of the scales, Unsqueezed, Reshape
    to (batch, sequence, K)), and the token ids they gather; None when anything else reads the blocks."""
    blocks, scales = matmul.input[1], matmul.input[2]
    readers = [n for n in index.consumers.get(blocks, []) if n is not matmul]
    if len(readers) != 1 or readers[0].op_type != "Gather" or readers[0].input[0] != blocks \
            or any(a.name == "axis" and a.i != 0 for a in readers[0].attribute):
        return None
    gather, ids = readers[0], readers[0].input[1]

    def only(node: onnx.NodeProto, op: str) -> onnx.NodeProto | None:
        found = index.consumers.get(node.output[0], [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    cast = only(gather, "Cast")
    sub = cast and only(cast, "Sub")
    mul = sub and only(sub, "Mul")
    reshape = mul and only(mul, "Reshape")
    if reshape is None or sub.input[0] != cast.output[0] or mul.input[0] != sub.output[0]:
        return None
    zero, shape = index.constant_source(sub.input[1]), index.constant_source(reshape.input[1])
    unsqueeze = index.producers.get(mul.input[1])
    scale_gather = unsqueeze and index.producers.get(unsqueeze.input[0])
    if (zero is None or numpy_helper.to_array(zero).tolist() != 128.0 or shape is None
            or numpy_helper.to_array(shape).tolist() != [0, 0, -1] or unsqueeze.op_type != "Unsqueeze"
            or scale_gather is None or scale_gather.op_type != "Gather" or list(scale_gather.input) != [scales, ids]
            or any(a.name == "axis" and a.i != 0 for a in scale_gather.attribute)
            or len(index.consumers.get(unsqueeze.output[0], [])) != 1
            or len(index.consumers.get(scale_gather.output[0], [])) != 1):
        return None
    return [gather, cast, sub, scale_gather, unsqueeze, mul, reshape], ids


def pack_shared_head(model: onnx.ModelProto) -> dict[str, dict]:
    """A tied head whose 8-bit blocks the token embedding gathers (`shared_table_lookup`) and whose codes fit
    fewer bits (`narrow_widths`: w4's --head-bits 5 to 7) becomes BlockInt8MatMul over the codes packed at their
    widths, and the embedding's lookup one BlockGather on the same packed codes, which dequantizes the rows it
    is asked for exactly as the nodes it replaces did: the table is stored once, at its codes' width. Returns
    what `pack_narrow_blocks` does."""
    index = GraphIndex(model)
    moved, dropped = {}, set()
    for node, shared in block_matmuls(model, index):
        lookup = shared_table_lookup(index, node) if shared else None
        codes = numpy_helper.to_array(index.inits[node.input[1]]) if lookup is not None else None
        widths = narrow_widths(codes) if codes is not None else None
        if widths is None:
            continue
        chain, ids = lookup
        dropped.add(node.input[1])
        original, scales = node.name, node.input[2]
        moved[original] = _to_packed_op(model, node, codes, *widths)
        rows = chain[-1]
        gather = helper.make_node(GATHER_OP, [node.input[1], ids, scales], list(rows.output),
                                  f"{chain[0].name}/{GATHER_OP}", domain=DOMAIN)
        _packed_attributes(gather, codes.shape[1] * codes.shape[2], *widths)
        at = list(model.graph.node).index(rows)
        model.graph.node.insert(at, gather)
        for n in chain:
            model.graph.node.remove(n)
    _drop_initializers(model, dropped)
    if moved:
        remove_dead_nodes(model)  # the lookup's constants
    return moved


def specialize(source: Path, target: Path, portable: Path | None = None, move_head: bool = False) -> dict:
    """source model.onnx -> target model.onnx with its static int8 MatMuls and its shared 8-bit heads on the
    native kernels; written to a temp name, then renamed. Where the head moved onto the table's blocks
    (`head_on_table_blocks`, which changes the logits), the graph as it is then, before the native kernels, is
    also saved at `portable`: what the native graph must equal."""
    model = onnx.load(str(source))
    before = len(model.graph.node)
    moved = head_on_table_blocks(model) if move_head else None
    if moved is not None and portable is not None:
        save_model_auto(model, portable)
    static, head = rewrite(model), pack_shared_head(model)
    shared, packed = rewrite_shared_blocks(model), {**head, **pack_narrow_blocks(model)}
    if not static + shared + len(packed):
        raise UserError(f"{source} has no static int8 MatMul, no 8-bit head shared with its embedding and no 8-bit "
                        "blocks of fewer bits for the native kernels: quantize it with `pipeline quantize --recipe "
                        "w8a8` (or w4, w8, gguf with a tied embedding) first")
    kernels = [name for name, count in ((OP, static), (BLOCK_OP, shared + len(packed)), (GATHER_OP, len(head)))
               if count]
    set_metadata(model, KERNEL_KEY, ",".join(kernels))
    with staging_dir(target) as staging:  # saved under its final name (the external data's name is inside it)
        save_model_auto(model, staging / target.name, shipped=True)
        move_model(staging / target.name, target)
    results = {"kernel": " + ".join(kernels), "matmuls": static + shared + len(packed), "static_matmuls": static,
               "shared_head_matmuls": shared + len(head), "packed_matmuls": packed, "nodes_before": before,
               "nodes_after": len(model.graph.node)}
    if moved is not None:
        results["head_on_table_blocks"] = moved
    return results
