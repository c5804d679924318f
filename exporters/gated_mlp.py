"""A gated MLP's down_proj input as one native op (com.pipeline.GluRotate), for the native variants.

Between a gated MLP's gate_up and down_proj MatMuls the graph holds Split, then Sigmoid and Mul (silu) or
FastGelu (GELU's tanh form, Gemma's), a Mul by the up half and, with the recipes' online Hadamard
(exporters/rotation.py `online_hadamard`), Reshape, MatMul, Reshape: up to seven nodes a layer that do little
arithmetic, where a one-token decode step pays each node's dispatch. `fuse_gated_mlps` puts GluRotate(gate_up, R)
in their place (R the b x b rotation, [[1]] where there is none; attribute activation "gelu_tanh" for GELU),
which computes the same floats up to rounding (the exponential and the sums' order: ~1e-7 relative). Only the
exact pattern is taken: gate the Split's first half, every intermediate read by the next node alone, the
rotation's matrix a constant; anything else (a split channel reading the product, a FastGelu with a bias) is left
as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex
from runtimes.kernels import DOMAIN, GATED_OP

IDENTITY = "swiglu_rotate.identity"  # R = [[1]]: no rotation


def _only(g: GraphIndex, tensor: str, op_type: str) -> onnx.NodeProto | None:
    """The one reader of `tensor` if it is an `op_type`, else None."""
    readers = g.consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input node that is not `name` (None unless `name` is one of exactly two inputs)."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _halves(g: GraphIndex, split: onnx.NodeProto) -> bool:
    """Two equal outputs along the last axis."""
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if axis != -1 or len(split.output) != 2:
        return False
    sizes = next((list(a.ints) for a in split.attribute if a.name == "split"), None)
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in g.inits:
            return False
        sizes = g.array(split.input[1]).tolist()
    return sizes is None or (len(sizes) == 2 and sizes[0] == sizes[1])


def _rotation(g: GraphIndex, h: str, outputs: set[str]) -> tuple[list[onnx.NodeProto], str, np.ndarray] | None:
    """Reshape -> MatMul(constant (1, b, b) or (b, b)) -> Reshape after h, each the only reader of the last:
    (those nodes, the flat output, R as (b, b)); else None."""
    blocks = _only(g, h, "Reshape")
    matmul = blocks and blocks.output[0] not in outputs and _only(g, blocks.output[0], "MatMul")
    if not matmul or matmul.input[0] != blocks.output[0] or matmul.input[1] not in g.inits:
        return None
    flat = matmul.output[0] not in outputs and _only(g, matmul.output[0], "Reshape")
    shape = blocks.input[1] in g.inits and g.array(blocks.input[1]).tolist()
    r = g.array(matmul.input[1])
    r = r.reshape(r.shape[-2:]) if r.ndim == 3 and r.shape[0] == 1 else r
    if not flat or flat.input[1] not in g.inits or g.array(flat.input[1]).tolist() != [0, 0, -1]:
        return None
    if not shape or r.ndim != 2 or r.shape[0] != r.shape[1] or shape[-1] != r.shape[0]:
        return None
    return [blocks, matmul, flat], flat.output[0], r.astype(np.float32)


def _activation(g: GraphIndex, gate: str, outputs: set[str]) -> tuple[list[onnx.NodeProto], str, str] | None:
    """The nodes that compute act(gate) from the gate half alone, their output and the activation's name: Sigmoid
    and Mul (silu), or onnxruntime's FastGelu without a bias (GELU's tanh form); else None."""
    readers = g.consumers.get(gate, [])
    if len(readers) == 1 and readers[0].op_type == "FastGelu" and readers[0].domain == "com.microsoft" \
            and len(readers[0].input) == 1 and readers[0].output[0] not in outputs:
        return readers, readers[0].output[0], "gelu_tanh"
    sigmoid = next((n for n in readers if n.op_type == "Sigmoid"), None)
    mul = next((n for n in readers if n.op_type == "Mul"), None)
    if len(readers) != 2 or not sigmoid or not mul or _other(mul, gate) != sigmoid.output[0] \
            or not g.only_reader(sigmoid.output[0], mul) or mul.output[0] in outputs:
        return None
    return [sigmoid, mul], mul.output[0], "silu"


def fuse_gated_mlps(model: onnx.ModelProto) -> int:
    """Each act(gate) * up after a Split of gate_up, act silu or GELU's tanh form (and the online rotation after
    it, if any) -> one GluRotate node, in place; returns how many."""
    g = GraphIndex(model)
    outputs = {o.name for o in model.graph.output}
    replaced, added, matrices = set(), {}, {}
    for split in [n for n in model.graph.node if n.op_type == "Split"]:
        if not _halves(g, split) or outputs & set(split.output):
            continue
        gate, up = split.output
        activation = _activation(g, gate, outputs)
        if activation is None:
            continue
        act_nodes, act, kind = activation
        second = _only(g, act, "Mul")
        if not second or _other(second, act) != up or not g.only_reader(up, second):
            continue
        chain, out = [split, *act_nodes, second], second.output[0]
        rotation = out not in outputs and _rotation(g, out, outputs)
        if rotation:
            nodes, out, r = rotation
            chain += nodes
            name = f"{nodes[1].input[1]}.2d"
        else:
            r, name = np.ones((1, 1), np.float32), IDENTITY
        matrices.setdefault(name, r)
        fused = helper.make_node(GATED_OP, [split.input[0], name], [out], name=f"{split.name}/{GATED_OP}",
                                 domain=DOMAIN, **({"activation": kind} if kind != "silu" else {}))
        replaced |= {id(n) for n in chain}  # by identity: a node's name may be empty
        added[id(split)] = fused
    if not added:
        return 0
    g.set_nodes([added.get(id(n), n) for n in model.graph.node if id(n) not in replaced or id(n) in added])
    for name, r in matrices.items():
        if name not in g.inits:  # a graph fused before holds it already
            g.add_initializer(numpy_helper.from_array(r, name))
    g.remove_unused_initializers()
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(added)
