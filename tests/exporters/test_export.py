"""The traced route on torch.export: node names by module scope, a tied table under the embedding's name, and
the transposes the exporter leaves on a shared weight folded into constants."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters.export import export_onnx, fold_transposed_weights
from models.decoder import Decoder, DecoderConfig

CONFIG = DecoderConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       vocab_size=96, max_position_embeddings=64)


def test_a_tied_decoder_exports_with_scope_names_and_its_table_under_the_embeddings_name(tmp_path):
    torch.manual_seed(0)
    model = Decoder(CONFIG)
    path = tmp_path / "fp32.onnx"
    export_onnx(model, path)  # validated against PyTorch on a prefill and a decode step
    graph = onnx.load(str(path)).graph
    names = {n.name for n in graph.node}
    for layer in range(CONFIG.num_layers):
        assert {f"/model/layers.{layer}/attn/{p}/MatMul" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} <= names
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits)
    head = next(n for n in graph.node if "logits" in n.output)
    assert gather.input[0] == "model.embed_tokens.weight" and head.op_type == "MatMul" and head.input[1] in inits
    np.testing.assert_array_equal(inits[head.input[1]], inits["model.embed_tokens.weight"].T)
    assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in graph.node)
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]


def test_transposed_initializers_are_folded_and_a_source_nothing_else_reads_goes():
    shared, private = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 4), np.float32)
    nodes = [helper.make_node("Transpose", ["shared"], ["shared_t"], perm=[1, 0]),
             helper.make_node("Transpose", ["private"], ["private_t"], perm=[1, 0]),
             helper.make_node("Gather", ["shared", "ids"], ["rows"]),
             helper.make_node("MatMul", ["x", "shared_t"], ["y"]),
             helper.make_node("MatMul", ["x4", "private_t"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                           for n in ("x", "x4")] +
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("rows", "y", "z")],
                              [numpy_helper.from_array(shared, "shared"), numpy_helper.from_array(private, "private")])
    model = helper.make_model(graph)
    assert fold_transposed_weights(model) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(inits) == {"shared", "shared_t", "private_t"}  # the Gather still reads "shared"
    np.testing.assert_array_equal(inits["shared_t"], shared.T)
    np.testing.assert_array_equal(inits["private_t"], private.T)
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul", "MatMul"]
