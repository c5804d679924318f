"""Recipe `gguf`: a graph built from a GGUF file gets that file's own quantized blocks back, exactly, as
MatMulNBits (models/gguf_grid.py says how each llama.cpp type maps), so the ONNX model carries no requantization
error on top of the GGUF's own.

Per weight MatMul of the built graph (exporters/builder.py `weight_parts` says which tensors it stacks):

    y = MatMulNBits(x; codes, scale)                         (Q4_0, Q5_0, Q6_K, Q8_0)
    y = MatMulNBits(x; codes, scale) + blocksum(x) @ offset  (Q4_1, Q5_1, Q4_K, Q5_K)

where blocksum(x) sums x over each block of K (a (.., K / block) tensor) and offset is (K / block, N). MatMulNBits
with a float zero point would be exact too, but leaves onnxruntime's fast kernels (about 100x slower per
MatMul); the sum costs a few percent of the MatMul. Scales and minimums are stored as the GGUF stores them
(float16, times the K-quants' integer sub-block multipliers) and multiplied out by Cast/Mul nodes on
initializers, which onnxruntime folds once at session creation.

A tied table stays stored once: when the head is 8-bit (Q8_0, Q5_0, Q6_K) the embedding gathers its blocks
(embedding.share_tied_table), else the table becomes int8 blocks of its own. Before anything is written each
weight is checked against the graph's float weight (the GGUF dequantized), so a run exported from another
file, or whose graph a pass rewrote, is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import save_model_auto
from exporters.quantization.embedding import quantize_embeddings, share_tied_table, tied_head
from exporters.quantization.scales import half_scales
from exporters.onnx_io import skeleton
from models.errors import UserError
from models.gguf_grid import Factor, Grid, stack

MATCH_TOLERANCE = 1e-5  # largest |GGUF block value - graph weight|, relative to the weight's largest magnitude


@dataclass(frozen=True)
class GridConfig:
    gguf: str              # the GGUF file the source graph was built from
    accuracy_level: int    # MatMulNBits compute type (4: int8 activations per block, as llama.cpp's Q8 dots)
    embedding_block: int   # an untied or unshareable table: int8 blocks of this size


def pack(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """uint8 (N, K) codes -> MatMulNBits' B (N, K / block, block * bits / 8): 4-bit pairs low nibble first."""
    n, k = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes.reshape(n, k // block, block))
    pairs = codes.reshape(n, k // block, block // 2, 2)
    return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4))


class Writer:
    """Adds the initializers and nodes that turn one float MatMul into its grid form."""

    def __init__(self, model: onnx.ModelProto, accuracy_level: int):
        self.model, self.accuracy_level = model, accuracy_level
        self.nodes: list[onnx.NodeProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def factor(self, f: Factor, name: str) -> str:
        """float32 (N, blocks) from the stored factor: Cast, and a Mul by the sub-block integers."""
        coarse = self.node("Cast", [self.init(f"{name}_coarse", f.coarse)], f"{name}/coarse", to=TensorProto.FLOAT)
        if f.fine is None:
            return coarse
        rows, groups = f.coarse.shape
        r = f.fine.shape[1] // groups
        fine = self.node("Cast", [self.init(f"{name}_fine", f.fine.reshape(rows, groups, r))], f"{name}/fine",
                         to=TensorProto.FLOAT)
        wide = self.node("Unsqueeze", [coarse, self.init(f"{name}_axis", np.array([2], np.int64))], f"{name}/wide")
        product = self.node("Mul", [wide, fine], f"{name}/product")
        return self.node("Reshape", [product, self.init(f"{name}_shape", np.array([rows, -1], np.int64))], name)

    def matmul(self, node: onnx.NodeProto, weight: str, grid: Grid) -> None:
        x, y = node.input[0], node.output[0]
        n, k = grid.codes.shape
        base = f"{weight}_Q{grid.bits}"
        scale = self.factor(grid.scale, f"{weight}_scales")
        self.nodes.append(helper.make_node(
            "MatMulNBits", [x, self.init(base, pack(grid.codes, grid.bits, grid.block)), scale],
            [y if grid.minimum is None else f"{y}/blocks"], name=f"{node.name}_Q{grid.bits}", domain="com.microsoft",
            K=k, N=n, bits=grid.bits, block_size=grid.block, accuracy_level=self.accuracy_level))
        if grid.minimum is None:
            return
        offset = self.factor(grid.minimum, f"{weight}_minimum")
        if grid.shift:
            shift = self.init(f"{weight}_shift", np.array(grid.shift, np.float32))
            offset = self.node("Add", [offset, self.node("Mul", [scale, shift], f"{weight}_shifted")],
                               f"{weight}_offset")
        columns = self.node("Transpose", [offset], f"{weight}_offset_t", perm=[1, 0])
        shape = self.init(f"{node.name}/block_shape", np.array([0, 0, k // grid.block, grid.block], np.int64))
        blocks = self.node("Reshape", [x, shape], f"{node.name}/x_blocks")
        sums = self.node("ReduceSum", [blocks, self.init(f"{node.name}/last", np.array([-1], np.int64))],
                         f"{node.name}/block_sums", keepdims=0)
        term = self.node("MatMul", [sums, columns], f"{node.name}/offset_term")
        self.nodes.append(helper.make_node("Add", [f"{y}/blocks", term], [y], name=f"{node.name}/offset_add"))


def grid_error(grid: Grid, reference: np.ndarray, rows: int = 4096) -> float:
    """Largest |grid value - reference| relative to the reference's largest magnitude (inf when the shapes
    differ), dequantized a few thousand rows at a time: a 128k-row head dequantized whole is gigabytes."""
    n, k = grid.codes.shape
    if reference.shape != (k, n):
        return float("inf")
    worst = 0.0
    for start in range(0, n, rows):
        index = np.arange(start, min(n, start + rows))
        worst = max(worst, float(np.abs(grid.rows(index).dequantize().T - reference[:, index]).max()))
    return worst / max(float(np.abs(reference).max()), 1e-30)


def write_grid(model: onnx.ModelProto, weights, config: GridConfig) -> tuple[onnx.ModelProto, dict]:
    """A new model: `model` (the built float graph, tied table already split by untie_embeddings) with every weight
    MatMul in the GGUF's own blocks, written one MatMul at a time (the float weights are read, never copied:
    the float graph and the written one are all it holds); returns it and what to report (GGUF type per
    MatMul, tied table shared)."""
    from exporters.builder import weight_parts  # the builder reads models' config (torch): only this pass needs it

    parts = weight_parts(weights.config)
    g = GraphIndex(model)
    found = [n for n in g.weight_matmuls() if n.name in parts]
    missing = sorted(set(parts) - {n.name for n in found})
    if missing:
        raise UserError(f"the source graph has no {missing[0]}: the gguf recipe needs the graph `pipeline export "
                        "--graph built` writes from the GGUF")
    tie = tied_head(model)
    out = skeleton(model)
    w = Writer(out, config.accuracy_level)
    kinds, written, counts = {}, {}, Counter()  # counts: tensors of each GGUF type
    for node in found:
        grids = [weights.grid(p) for p in parts[node.name]]
        grid = stack(grids)
        weight = node.input[1]
        err = grid_error(grid, g.array(weight))
        if err > MATCH_TOLERANCE:
            raise UserError(f"{node.name}'s weight is not {config.gguf}'s (largest difference {err:.2g} of its "
                            "largest value): quantize a run exported from this file with --graph built, "
                            "before any other pass")
        counts.update(p.type for p in grids)
        kinds[node.name] = {"types": sorted({p.type for p in grids}), "bits": grid.bits,
                            "block_size": grid.block, "offset": grid.minimum is not None}
        w.nodes = []
        w.matmul(node, weight, grid)  # its initializers go into `out` now, the grid's arrays with this loop
        written[node.name] = w.nodes
    nodes = []
    for node in model.graph.node:
        nodes += written.pop(node.name) if node.name in written else [node]
    out.graph.node.extend(nodes)
    used = {i for n in out.graph.node for i in n.input}
    have = {t.name for t in out.graph.initializer}
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in used and t.name not in have)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    # the shared embedding dequantizes as MatMulNBits alone does: a head with an offset term keeps its own table
    shared = tie is not None and not kinds[tie[1]]["offset"] and share_tied_table(out, *tie)
    quantize_embeddings(out, config.embedding_block)
    return out, {"gguf": config.gguf, "gguf_types": dict(sorted(counts.items())), "matmuls": kinds,
                 "tied_table_shared": shared}


def run_write_grid(q, config: GridConfig):
    """The pass (exporters/quantization/passes.py's shape): write the grid model to `q.staged`."""
    from models.weights import open_weights

    if config.gguf is None:
        raise UserError("the gguf recipe needs the GGUF file the graph was built from")
    weights = open_weights(config.gguf)
    if weights.source["format"] != "gguf":
        raise UserError(f"{config.gguf} is not a GGUF file: the gguf recipe keeps a GGUF's own blocks")
    q.model, details = write_grid(q.model, weights, config)  # the float graph goes with its last reference
    q.details["grid"] = details
    q.details.update(bits=4, block_size=32, accuracy_level=config.accuracy_level)
    q.reasons.update({name: f"GGUF {'/'.join(k['types'])}: its exact {k['bits']}-bit form"
                      for name, k in details["matmuls"].items() if k["bits"] == 8})
    half_scales(q.model)  # an untied table's int8 blocks (its factors are the file's own float16 already)
    save_model_auto(q.model, q.staged, shipped=True)
    return q
