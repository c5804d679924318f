"""The first token's keys and values as constants: what static int8 activations cost a model's attention sink.

Every prompt of a model whose tokenizer opens texts with a BOS (Gemma, Llama 3, Mistral) starts with the same token
at position 0, and a causal decoder's keys and values there depend on nothing else: they are constants of the
model. That token is also where such models keep their attention sink, with activations far outside the range of
any other token (Sun et al., "Massive activations in large language models", 2024). Static int8 must fix its
ranges in advance: spent on the sink, they leave every other token a coarse grid; fitted to the other tokens, the
sink is clipped, and every later token attends to a wrong key and value (PrefixQuant, Chen et al. 2024).

`pin_first_token` takes the sink out of the quantized arithmetic: each attention's key and value inputs (the packed
input where query, key and value come as one), and the residual stream the final norm reads (before the builder's
`logits_to_keep` slice), are replaced, at position 0 and only where the token there is the pinned one, by their
float values computed once from the float graph (a Where per tensor; position 0 is the first unmasked column of
`attention_mask`). Exact in float: the constants are what the graph computes there. Every later token then attends
to the float keys and values, and the token's own logits (a prompt of that token alone) come from its float hidden
state through the quantized head. The calibration windows run the token first and sample only what follows it
(exporters/calibration.py), so the ranges are fitted to the tokens the int8 MatMuls are kept for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.calibration import declared, empty_past, step_feed
from exporters.probe import probe
from runtimes.contract import ATTENTION_MASK, INPUT_IDS, read_contract

SCOPE = "/model/pin_first"
MASK = f"{SCOPE}/mask"  # (batch, seq, 1) bool: position 0 holds the pinned token
ATTENTION_OPS = ("GroupQueryAttention",)
KEEP_SLICES = ("/model/keep/Slice_residual", "/model/keep/Slice_delta")  # exporters/builder.py `keep_last`


def attention_inputs(model: onnx.ModelProto) -> list[str]:
    """Each attention's key and value inputs, or its packed query-key-value input. (The token's own query reaches
    only its own row of the stream, which the final norm's pin replaces.)"""
    names = []
    for n in model.graph.node:
        if n.op_type in ATTENTION_OPS and n.domain == "com.microsoft":
            names += [t for t in n.input[1:3] if t] or [n.input[0]]
    return list(dict.fromkeys(names))


def pinned_tensors(model: onnx.ModelProto) -> list[str]:
    """`attention_inputs`, then the stream the builder's final norm reads, as its `logits_to_keep` slices take it
    (a traced graph has no such slices: its head input is left as it is)."""
    kept = [n.input[0] for n in model.graph.node if n.op_type == "Slice" and n.name in KEEP_SLICES]
    return attention_inputs(model) + [t for t in dict.fromkeys(kept) if t]


def why_not_pinnable(model: onnx.ModelProto) -> str:
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    if inputs.get(INPUT_IDS) != TensorProto.INT64 or inputs.get(ATTENTION_MASK) != TensorProto.INT64:
        return "the graph has no int64 input_ids and attention_mask"
    if not attention_inputs(model):
        return "no GroupQueryAttention (an unfused graph)"
    return ""


def first_token_values(model: onnx.ModelProto, tensors: list[str], token: int, workdir: Path | None = None,
                       weights_dir: Path | None = None) -> dict[str, np.ndarray]:
    """What the float graph computes for `tensors` with `token` alone at position 0: one row each."""
    contract = read_contract(model)

    def feeds(session):
        feed = step_feed(np.array([token]), 0, empty_past(contract))
        return [declared(feed, {i.name for i in session.get_inputs()})]

    values, = probe(model, tensors, feeds, workdir, weights_dir)  # run to its end: the probe session closes
    return {name: v.reshape(-1, v.shape[-1])[0] for name, v in values.items()}


def _mask_nodes(token: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """MASK from the graph inputs: the column of the first 1 in attention_mask, among the last seq columns (those of
    input_ids), holding `token`."""
    c = lambda name, value: numpy_helper.from_array(np.array(value, np.int64), f"{SCOPE}/{name}")  # noqa: E731
    consts = [c("one", 1), c("axis", 1), c("end", [np.iinfo(np.int64).max]), c("axes", [1]), c("seq_axis", [1]),
              c("seq_end", [2]), c("token", token), c("last", [-1])]
    s = lambda name: f"{SCOPE}/{name}"  # noqa: E731
    nodes = [
        helper.make_node("Shape", [INPUT_IDS], [s("shape")], s("Shape")),
        helper.make_node("Slice", [s("shape"), s("seq_axis"), s("seq_end")], [s("seq")], s("Slice_seq")),
        helper.make_node("Neg", [s("seq")], [s("start")], s("Neg")),
        helper.make_node("CumSum", [ATTENTION_MASK, s("axis")], [s("count")], s("CumSum")),
        helper.make_node("Slice", [s("count"), s("start"), s("end"), s("axes")], [s("count_new")], s("Slice_count")),
        helper.make_node("Slice", [ATTENTION_MASK, s("start"), s("end"), s("axes")], [s("mask_new")], s("Slice_mask")),
        helper.make_node("Equal", [s("count_new"), s("one")], [s("first")], s("Equal_first")),
        helper.make_node("Equal", [s("mask_new"), s("one")], [s("attended")], s("Equal_attended")),
        helper.make_node("Equal", [INPUT_IDS, s("token")], [s("is_token")], s("Equal_token")),
        helper.make_node("And", [s("first"), s("attended")], [s("first_attended")], s("And_first")),
        helper.make_node("And", [s("first_attended"), s("is_token")], [s("at_token")], s("And_token")),
        helper.make_node("Unsqueeze", [s("at_token"), s("last")], [MASK], s("Unsqueeze")),
    ]
    return nodes, consts


def pin_first_token(model: onnx.ModelProto, token: int, values: dict[str, np.ndarray]) -> None:
    """Replace each tensor of `values` ((batch, seq, width): `pinned_tensors`) by its value at position 0 where
    that position holds `token`."""
    mask_nodes, consts = _mask_nodes(token)
    g = model.graph
    wheres = {}  # tensor -> the Where that pins it
    for name, row in values.items():
        const = numpy_helper.from_array(np.ascontiguousarray(row), f"{SCOPE}/{name.strip('/')}/value")
        consts.append(const)
        wheres[name] = helper.make_node("Where", [MASK, const.name, name], [f"{name}/pinned_first"],
                                        f"{SCOPE}/{name.strip('/')}/Where")
    g.initializer.extend(consts)
    nodes, pending = list(mask_nodes), dict(wheres)
    for n in g.node:  # every reader takes the pinned tensor, its Where just before the first (topological order)
        for i, t in enumerate(n.input):
            if t in wheres:
                if t in pending:
                    nodes.append(pending.pop(t))
                n.input[i] = wheres[t].output[0]
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
