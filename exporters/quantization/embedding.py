"""The token-embedding table as int8 blocks (com.microsoft.GatherBlockQuantized). The writer passes apply it to
every model they write (`QdqConfig.embedding`, `WriteNBitsConfig.embedding_block`), so that each model the budget
search measures is the one it would keep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import TABLE_MAP_SUFFIX, GraphIndex
from exporters.onnx_io import tensor_array
from exporters.quantization.nbits import code_bits
from exporters.quantization.scales import on_half_grid
from runtimes.contract import LOGITS, set_metadata


def untie_embeddings(model: onnx.ModelProto) -> list[str]:
    """A table stored once for a tied head (exporters/builder.py: lm_head's (hidden, vocab) weight, the tokens
    gathered from its columns and transposed) becomes two again: a (vocab, hidden) table for a plain Gather,
    and the MatMul weight. The quantizers give them different forms (int8 blocks for the Gather, the recipe's
    for lm_head), so each needs its own tensor. Returns the tables split."""
    g = GraphIndex(model)
    split = []
    for node in list(model.graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = g.inits.get(node.input[0]) if node.op_type == "Gather" and axis == 1 else None
        readers = g.consumers.get(node.output[0], [])
        if table is None or len(table.dims) != 2 or len(readers) != 1 or readers[0].op_type != "Transpose":
            continue
        transpose = readers[0]
        if [a.ints for a in transpose.attribute if a.name == "perm"] != [[1, 2, 0]]:
            continue
        name = "model.embed_tokens.weight" if "model.embed_tokens.weight" not in g.inits else table.name + ".rows"
        rows = g.add_initializer(numpy_helper.from_array(np.ascontiguousarray(g.array(table.name).T), name))
        gather = helper.make_node("Gather", [rows.name, node.input[1]], list(transpose.output), name=node.name)
        node.CopyFrom(gather)
        model.graph.node.remove(transpose)
        split.append(table.name)
    return split


def quantize_embeddings(model: onnx.ModelProto, block_size: int) -> list[str]:
    """Each Gather from a 2-D float table that nothing else reads becomes GatherBlockQuantized (com.microsoft):
    uint8 with zero point 128 (symmetric int8), one scale per `block_size` values of a row. Returns the tables.

    Only a row per token is read, so this costs no time; it is about size: a large vocabulary's table is a good
    share of a small model, and MatMul quantization alone never touches it.
    """
    g = GraphIndex(model)
    inits, readers = g.inits, g.uses
    done = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or axis != 0
                or readers[table.name] != 1 or table.dims[1] % block_size):
            continue
        q, scale = int8_blocks(numpy_helper.to_array(table), block_size)
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


def int8_blocks(w: np.ndarray, block_size: int, rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """A (vocab, hidden) table as GatherBlockQuantized's uint8 codes (zero point 128) and one scale per
    `block_size` values of a row, on the float16 grid the file stores them on (scales.py), so the codes are the
    nearest for the scales as stored. Taken `rows` rows at a time: a 262k-row table's float temporaries would
    otherwise be several copies of it."""
    q = np.empty(w.shape, np.uint8)
    scale = np.empty((w.shape[0], w.shape[1] // block_size), np.float32)
    for i in range(0, w.shape[0], rows):
        blocks = w[i:i + rows].reshape(-1, scale.shape[1], block_size)
        step = (np.abs(blocks).max(-1) / 127).astype(np.float32)
        step[step == 0] = 1.0
        scale[i:i + rows] = step
    scale = on_half_grid(scale)
    for i in range(0, w.shape[0], rows):
        blocks = w[i:i + rows].reshape(-1, scale.shape[1], block_size)
        q[i:i + rows] = (np.clip(np.round(blocks / scale[i:i + rows, :, None]), -127, 127) + 128).reshape(
            -1, w.shape[1])
    return q, scale


def tied_candidates(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto, onnx.TensorProto,
                                                                 onnx.TensorProto]]:
    """(embedding Gather, lm_head MatMul, table, weight) for each Gather along axis 0 from a (vocab, hidden) table
    shaped as the transpose of the head's (hidden, vocab) weight."""
    g = GraphIndex(model)
    head = next((n for n in model.graph.node if LOGITS in n.output and n.name in g.weight_names), None)
    if head is None:
        return
    weight = g.inits[head.input[1]]
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = g.inits.get(node.input[0]) if node.op_type == "Gather" and axis == 0 else None
        if table is not None and list(table.dims) == list(weight.dims)[::-1]:
            yield node, head, table, weight


def tied_head(model: onnx.ModelProto, weights_dir: str | Path = "") -> tuple[str, str] | None:
    """(embedding Gather, lm_head MatMul) when the Gather's (vocab, hidden) table is exactly the transpose of the
    head's weight: a tied pair that no float pass (rotation, smoothing, a folded norm) has made two. Weights
    left in external data are read from `weights_dir`."""
    for node, head, table, weight in tied_candidates(model):
        if np.array_equal(tensor_array(table, weights_dir), tensor_array(weight, weights_dir).T):
            return node.name, head.name
    return None


def share_tied_table(model: onnx.ModelProto, gather: str, head: str, x: np.ndarray | None = None) -> bool:
    """Make the embedding read the head's 8-bit MatMulNBits blocks instead of a table of its own, so a tied
    table is stored once (as onnxruntime-genai's shared embeddings): the token's row of blocks is gathered,
    dequantized exactly as MatMulNBits does (w = (q - 128) * scale, per block) and flattened to the hidden width.
    With `x` (`tied_through_map`'s: the table is E = W^T X, as after a rotation), the rows are then multiplied
    by X, only where they come within SHARE_ERROR_RATIO of the table's own blocks at the codes' width (8 bits,
    or the 5 to 7 of a narrow head's codes: the width asked of the table stored once; the errors go in the
    model's metadata, as `share_static_head` records them). Returns False, changing nothing but that record, when
    the head is not an 8-bit MatMulNBits, its blocks pad the rows, or the mapped rows are too coarse."""
    nodes = {n.name: n for n in model.graph.node}
    matmul = nodes.get(f"{head}_Q8")
    embed = nodes.get(gather)
    attrs = {a.name: a.i for a in matmul.attribute} if matmul is not None else {}
    if (matmul is None or matmul.op_type != "MatMulNBits" or attrs.get("bits") != 8 or len(matmul.input) > 3
            or embed is None or attrs["K"] % attrs["block_size"]):
        return False
    blocks, scales = matmul.input[1], matmul.input[2]
    table, ids, out = embed.input[0], embed.input[1], embed.output[0]
    p = f"{gather}/shared"
    if x is not None:
        inits = {t.name: t for t in model.graph.initializer}
        if not _fine_enough(model, *block_row_errors(numpy_helper.to_array(inits[blocks]),
                                                     numpy_helper.to_array(inits[scales]), x,
                                                     numpy_helper.to_array(inits[table]))):
            return False
        model.graph.initializer.append(numpy_helper.from_array(x, f"{p}/map"))
    model.graph.initializer.extend([numpy_helper.from_array(np.array(128, np.float32), f"{p}/zero_point"),
                                    numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last_axis"),
                                    numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{p}/shape")])
    new = [helper.make_node("Gather", [blocks, ids], [f"{p}/blocks"], f"{p}/GatherBlocks", axis=0),
           helper.make_node("Cast", [f"{p}/blocks"], [f"{p}/codes"], f"{p}/Cast", to=onnx.TensorProto.FLOAT),
           helper.make_node("Sub", [f"{p}/codes", f"{p}/zero_point"], [f"{p}/centered"], f"{p}/Sub"),
           helper.make_node("Gather", [scales, ids], [f"{p}/scales"], f"{p}/GatherScales", axis=0),
           helper.make_node("Unsqueeze", [f"{p}/scales", f"{p}/last_axis"], [f"{p}/scales4"], f"{p}/Unsqueeze"),
           helper.make_node("Mul", [f"{p}/centered", f"{p}/scales4"], [f"{p}/rows"], f"{p}/Mul"),
           helper.make_node("Reshape", [f"{p}/rows", f"{p}/shape"], [out if x is None else f"{p}/unmapped"],
                            f"{p}/Reshape")]
    if x is not None:
        new.append(helper.make_node("MatMul", [f"{p}/unmapped", f"{p}/map"], [out], gather + TABLE_MAP_SUFFIX))
    _replace_lookup(model, embed, new)
    return True


def _fine_enough(model: onnx.ModelProto, shared: float, own: float) -> bool:
    """Whether rows read from the head (relative error `shared`) come within SHARE_ERROR_RATIO of the table's own
    blocks (`own`); both and the choice go in the model's metadata (SHARED_TABLE_KEY)."""
    chosen = bool(shared <= SHARE_ERROR_RATIO * own)
    set_metadata(model, SHARED_TABLE_KEY, json.dumps({"relative_error": round(float(shared), 6), "shared": chosen,
                                                      "own_blocks_relative_error": round(float(own), 6)}))
    return chosen


def _replace_lookup(model: onnx.ModelProto, embed: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    """`nodes` in the embedding Gather's place; its table goes when nothing else reads it."""
    table = embed.input[0]
    at = list(model.graph.node).index(embed)
    model.graph.node.remove(embed)
    for i, node in enumerate(nodes):
        model.graph.node.insert(at + i, node)
    if not any(table in n.input for n in model.graph.node):
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == table))


TIE_TOLERANCE = 1e-4  # relative residual of E = W^T X below which a table and a head are one tensor mapped
# A static int8 head shares its codes with the table only when the rows they give are within this factor of the
# error the table's own int8 blocks of 32 would have (relative Frobenius norms). The head's codes have one scale
# per column, set by the column's largest weight: where the float passes put a few large channels into the head
# (a folded norm with outlier weights, smoothing), the other channels get few levels and the rows come back
# coarse. Measured: SmolLM2-135M 2.0x, and sharing kept its held-out accuracy (top-1 0.951, KL 0.0079 against 0.959
# and 0.0082 with a table of its own) at 19% less file; the test decoders with outlier norm weights 2.4-2.6x,
# where sharing cost +2.5% perplexity. The recorded ratio (SHARED_TABLE_KEY) says which side a model fell on.
SHARE_ERROR_RATIO = 2.2
SHARED_TABLE_KEY = "pipeline.shared_table"  # metadata: the errors share_static_head measured and what it chose


def tied_through_map(model: onnx.ModelProto, weights_dir: str | Path = "") -> tuple[str, str, np.ndarray] | None:
    """(embedding Gather, lm_head MatMul, X) when the Gather's (vocab, hidden) table E is the head's (hidden,
    vocab) weight W seen through one hidden x hidden map: E = W^T X to float rounding. A tied pair stays so
    through the float passes of static int8: folding the final norm (diagonal), smoothing (diagonal) and rotating
    the residual stream (orthogonal, the table rotated by the same Q) each multiply W by a hidden x hidden
    matrix and leave E's rows where they were, or rotate both. X comes from the normal equations, summed in
    float64 over blocks of 4096 tokens (a float64 copy of a 128k-token table would be 2 GB)."""
    for node, head, table, weight in tied_candidates(model):
        if table.dims[0] <= table.dims[1]:
            continue  # (fewer tokens than channels would leave the map undetermined)
        w, e = tensor_array(weight, weights_dir), tensor_array(table, weights_dir)
        gram, cross = np.zeros((w.shape[0],) * 2), np.zeros((w.shape[0], e.shape[1]))
        for i in range(0, e.shape[0], 4096):
            wb, eb = w[:, i:i + 4096].astype(np.float64), e[i:i + 4096].astype(np.float64)
            gram += wb @ wb.T
            cross += wb @ eb
        try:
            x = np.linalg.solve(gram, cross)
        except np.linalg.LinAlgError:  # a singular head: no map
            return None
        residual = sum(float(np.square(w[:, i:i + 4096].T.astype(np.float64) @ x - e[i:i + 4096]).sum())
                       for i in range(0, e.shape[0], 4096))
        if residual <= TIE_TOLERANCE ** 2 * float(np.square(e).sum()):
            return node.name, head.name, x.astype(np.float32)
    return None


def shared_row_errors(codes: np.ndarray, scale: np.ndarray, x: np.ndarray, table: np.ndarray,
                      block_size: int = 32, rows: int = 8192) -> tuple[float, float]:
    """Relative errors (Frobenius) of the table's rows read from the int8 head, (codes * scale)^T X, and of the
    table's own int8 blocks (`quantize_embeddings`), taken `rows` rows at a time."""
    scale = np.broadcast_to(scale.reshape(-1), (codes.shape[1],))
    shared = own = total = 0.0
    for i in range(0, table.shape[0], rows):
        e = table[i:i + rows].astype(np.float32)
        got = (codes[:, i:i + rows].T.astype(np.float32) * scale[i:i + rows, None]) @ x
        own_part, part = _own_block_error(e, block_size)
        shared += float(np.square(got - e).sum())
        own += own_part
        total += part
    return np.sqrt(shared / max(total, 1e-30)), np.sqrt(own / max(total, 1e-30))


def block_row_errors(blocks: np.ndarray, scales: np.ndarray, x: np.ndarray, table: np.ndarray,
                     rows: int = 8192) -> tuple[float, float]:
    """`shared_row_errors` for an 8-bit MatMulNBits head: its (vocab, blocks, block) codes, (vocab, blocks)
    scales, dequantized per block, flattened to the hidden width, times X; the table's own blocks at the width
    the codes span (`code_width`)."""
    block, bits = blocks.shape[-1], code_width(blocks)
    codes = blocks.reshape(blocks.shape[0], -1)[:, :table.shape[1]]
    step = np.repeat(scales, block, axis=1)[:, :table.shape[1]]
    shared = own = total = 0.0
    for i in range(0, table.shape[0], rows):
        e = table[i:i + rows].astype(np.float32)
        got = ((codes[i:i + rows].astype(np.float32) - 128) * step[i:i + rows]) @ x
        own_part, part = _own_block_error(e, bits=bits)
        shared += float(np.square(got - e).sum())
        own += own_part
        total += part
    return np.sqrt(shared / max(total, 1e-30)), np.sqrt(own / max(total, 1e-30))


def code_width(codes: np.ndarray) -> int:
    """`code_bits` of all the 8-bit codes as one row: 8 for a full 8-bit head, 6 for `--head-bits 6`'s."""
    return int(code_bits(codes.reshape(1, -1))[0])


def _own_block_error(e: np.ndarray, block_size: int = 32, bits: int = 8) -> tuple[float, float]:
    """Rows `e` as the table's own symmetric `bits`-bit blocks (`quantize_embeddings` at 8): (squared error,
    squared norm)."""
    blocks = e.reshape(e.shape[0], -1, block_size) if e.shape[1] % block_size == 0 else e[:, None, :]
    step = np.abs(blocks).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)
    step[step == 0] = 1.0
    return float(np.square(np.round(blocks / step) * step - blocks).sum()), float(np.square(e).sum())


def share_static_head(model: onnx.ModelProto, tie: tuple[str, str, np.ndarray] | None) -> bool:
    """Make the embedding read a static int8 head's weight (`tied_through_map`'s pair) instead of a table of its
    own: the token's column of int8 codes, times its per-column scale, through X. The table is stored once (and
    the native kernel's packed weight serves both, exporters/cpu_kernels.py). Returns False, changing nothing,
    when the head is not static int8 with symmetric weights (the search took it out, or no tie), or when the rows
    it gives are coarser than SHARE_ERROR_RATIO times the table's own int8 blocks."""
    if tie is None:
        return False
    gather, head, x = tie
    g = GraphIndex(model)
    embed, matmul = g.nodes.get(gather), g.nodes.get(head)
    dq = g.producers.get(matmul.input[1]) if matmul is not None else None
    if embed is None or dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits \
            or dq.input[1] not in g.inits:
        return False
    codes, scale = g.inits[dq.input[0]], numpy_helper.to_array(g.inits[dq.input[1]])
    if codes.data_type != onnx.TensorProto.INT8 or scale.size not in (1, codes.dims[1]):
        return False
    if len(dq.input) > 2 and dq.input[2] and (dq.input[2] not in g.inits
                                              or np.any(numpy_helper.to_array(g.inits[dq.input[2]]) != 0)):
        return False
    table, ids, out = embed.input[0], embed.input[1], embed.output[0]
    if not _fine_enough(model, *shared_row_errors(numpy_helper.to_array(codes), scale, x,
                                                  numpy_helper.to_array(g.inits[table]))):
        return False
    p = f"{gather}/shared"
    model.graph.initializer.extend([numpy_helper.from_array(x, f"{p}/map"),
                                    numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last_axis")])
    new = [helper.make_node("Gather", [codes.name, ids], [f"{p}/columns"], f"{p}/GatherColumns", axis=1),
           helper.make_node("Transpose", [f"{p}/columns"], [f"{p}/codes8"], f"{p}/Transpose", perm=[1, 2, 0]),
           helper.make_node("Cast", [f"{p}/codes8"], [f"{p}/codes"], f"{p}/Cast", to=onnx.TensorProto.FLOAT)]
    if scale.size == 1:
        new.append(helper.make_node("Mul", [f"{p}/codes", dq.input[1]], [f"{p}/rows"], f"{p}/Mul"))
    else:
        new += [helper.make_node("Gather", [dq.input[1], ids], [f"{p}/scales"], f"{p}/GatherScales", axis=0),
                helper.make_node("Unsqueeze", [f"{p}/scales", f"{p}/last_axis"], [f"{p}/scales3"],
                                 f"{p}/Unsqueeze"),
                helper.make_node("Mul", [f"{p}/codes", f"{p}/scales3"], [f"{p}/rows"], f"{p}/Mul")]
    new.append(helper.make_node("MatMul", [f"{p}/rows", f"{p}/map"], [out], gather + TABLE_MAP_SUFFIX))
    _replace_lookup(model, embed, new)
    return True
