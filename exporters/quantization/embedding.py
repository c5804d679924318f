"""The token-embedding table as int8 blocks (com.microsoft.GatherBlockQuantized). The writer passes apply it to
every model they write (`QdqConfig.embedding`, `WriteNBitsConfig.embedding_block`), so that each model the budget
search measures is the one it would keep."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex


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
        w = numpy_helper.to_array(table)
        blocks = w.reshape(w.shape[0], -1, block_size)
        scale = (np.abs(blocks).max(-1) / 127).astype(np.float32)
        scale[scale == 0] = 1.0
        q = (np.clip(np.round(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8).reshape(w.shape)
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
