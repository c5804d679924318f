"""Recipe `gguf` (exporters/quantization/grid.py): the built graph of a quantized GGUF gets the file's own blocks
back as MatMulNBits, so its logits equal the float graph's (the GGUF dequantized) to float rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from transformers import LlamaConfig

from exporters.builder import build_graph, graph_steps
from exporters.quantize import QuantConfig, quantize
from models.errors import UserError
from models.weights import open_weights
from runtimes.contract import LOGITS
from tests.exporters.test_builder import TINY, write_q8_gguf
from tests.models.test_hf import TOKENS, tiny_hf

# one layer's tensors in five llama.cpp types: a 4-bit symmetric (Q4_0), a 4-bit with minimums (Q4_1, the
# offset term), 5-bit ones taken to 8 bits exactly (Q5_0, Q5_1), and q/k/v of two types stacked in one MatMul
TYPES = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_0", "ffn_gate": "Q4_1",
         "ffn_up": "Q4_1", "ffn_down": "Q5_1", "token_embd": "Q8_0", "output": "Q8_0"}


def mixed_gguf(path, tied: bool, seed: int = 0, with_tokenizer: bool = False):
    ref = tiny_hf(LlamaConfig(**{**TINY, "vocab_size": len(TOKENS)}, rms_norm_eps=1e-5, tie_word_embeddings=tied),
                  seed)
    write_q8_gguf(ref, path, lambda name: TYPES[name.split(".")[-2]], with_tokenizer)
    return path


def logits(model_path, contract, tokens) -> list[np.ndarray]:
    return [s[LOGITS] for s in graph_steps(model_path, contract, tokens)]


@pytest.mark.parametrize("tied", [True, False])
def test_the_gguf_blocks_come_back_exactly(tmp_path, tied):
    gguf_path = mixed_gguf(tmp_path / "tiny.gguf", tied)
    weights = open_weights(gguf_path)
    fused = tmp_path / "fused" / "model.onnx"
    fused.parent.mkdir()
    contract = build_graph(weights, fused)
    out = tmp_path / "gguf" / "model.onnx"
    config = QuantConfig(recipe="gguf", gguf=str(gguf_path), accuracy_level=1)  # float products: exact
    report = quantize(fused, out, [list(range(20))], config)

    n = TINY["num_hidden_layers"]
    grid = report["grid"]
    assert grid["gguf_types"] == {"Q4_0": n, "Q4_1": 2 * n, "Q5_0": 2 * n, "Q5_1": n, "Q8_0": n + 1}
    assert grid["tied_table_shared"] is tied
    layer0 = {k.split("/")[-2]: v for k, v in grid["matmuls"].items() if "layers.0/" in k}
    assert layer0["qkv_proj"] == {"types": ["Q5_0", "Q8_0"], "bits": 8, "block_size": 32, "offset": False}
    assert layer0["o_proj"]["bits"] == 4 and not layer0["o_proj"]["offset"]
    assert layer0["gate_up_proj"] == {"types": ["Q4_1"], "bits": 4, "block_size": 32, "offset": True}
    assert layer0["down_proj"]["bits"] == 8 and layer0["down_proj"]["offset"]

    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    sums = [node for node in model.graph.node if node.op_type == "ReduceSum" and "block_sums" in node.name]
    assert ops.count("MatMulNBits") == 4 * n + 1 and len(sums) == 2 * n  # gate_up and down: offsets
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
              and "weight" in t.name]
    # no float weight left, and the MatMuls' scales are stored float16 as in the file; an untied table is int8
    # blocks of its own, which for Q8_0 are its grid again (the same largest-magnitude / 127 scales), float16 too
    assert floats == []
    halves = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert ("model.embed_tokens.weight_scales_f16" in halves) is not tied
    assert ("GatherBlockQuantized" in ops) is not tied  # a tied table is gathered from the head's blocks
    assert report["quantized_matmuls"] and report["size_after"] < report["size_before"] / 3

    tokens = np.array([5, 9, 2, 77, 31, 4, 8, 100, 3], np.int64)
    for want, got in zip(logits(fused, contract, tokens), logits(out, contract, tokens)):
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_a_graph_from_another_file_is_refused(tmp_path):
    fused = tmp_path / "model.onnx"
    build_graph(open_weights(mixed_gguf(tmp_path / "a.gguf", True)), fused)
    other = mixed_gguf(tmp_path / "b.gguf", True, seed=1)
    with pytest.raises(UserError, match="weight is not .*b.gguf's .*--graph built"):
        quantize(fused, tmp_path / "q.onnx", [list(range(20))], QuantConfig(recipe="gguf", gguf=str(other)))
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(UserError, match="is for the gguf recipe, not w4"):
        QuantConfig(recipe="w4", gguf=str(other))


@pytest.mark.parametrize("kinds", [("Q4_K",), ("Q5_K",), ("Q6_K",), ("Q4_K", "Q6_K")])
def test_k_quant_matmuls_compute_what_gguf_dequantizes(kinds):
    """The K-quants' sub-block multipliers (6-bit scales and minimums, Q6_K's int8 per 16) multiplied out in the
    graph; two types stacked into one MatMul take the shared exact form."""
    import gguf
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporters.quantization.grid import Writer
    from models.gguf_grid import read_grid, stack
    from tests.models.test_gguf_grid import random_tensor

    k = 512
    parts = [read_grid(kind, random_tensor(kind, 48, k, seed), (48, k)) for seed, kind in enumerate(kinds)]
    want_w = np.concatenate([gguf.dequantize(random_tensor(kind, 48, k, seed), gguf.GGMLQuantizationType[kind])
                             .reshape(48, k) for seed, kind in enumerate(kinds)])
    grid = stack(parts)
    model = helper.make_model(helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                         [1, "s", k])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    w = Writer(model, accuracy_level=1)
    w.matmul(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), "w", grid)
    model.graph.node.extend(w.nodes)
    x = np.random.default_rng(0).standard_normal((1, 3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ want_w.T
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_the_weight_check_dequantizes_a_few_rows_at_a_time_and_misses_no_row():
    """grid_error reads the grid in chunks of rows (a 128k-row head whole is gigabytes); a difference in the
    last, partial chunk counts as one in the first, and a weight of another shape never matches."""
    from exporters.quantization.grid import grid_error
    from models.gguf_grid import Factor, Grid

    rng = np.random.default_rng(0)
    grid = Grid("Q4_0", rng.integers(0, 16, (10, 64)).astype(np.uint8), 4, 32,
                Factor(rng.random((10, 2)).astype(np.float16)))
    weight = grid.dequantize().T.copy()
    assert grid_error(grid, weight, rows=3) == 0.0
    for row in (0, 9):
        moved = weight.copy()
        moved[7, row] += 0.25
        assert grid_error(grid, moved, rows=3) == pytest.approx(0.25 / np.abs(moved).max())
    assert grid_error(grid, weight[:, :9], rows=3) == float("inf")


def test_5bit_blocks_are_stored_at_5_bits_on_the_native_kernel(tmp_path, native_kernels):
    """Q5_0 q and k (8-bit MatMulNBits codes in [-16, 16)) beside Q8_0 v, and Q5_1 down_proj (its minimums in the
    offset term): `specialize` stores the Q5 rows at 5 bits and the Q8_0 rows at 8 on BlockInt8MatMul; the tied
    Q8_0 head stays the embedding's, down_proj's offset term goes into its op. The file shrinks by 3 bits a 5-bit
    weight and the logits stay the grid's."""
    from exporters.cpu_kernels import specialize

    gguf_path = mixed_gguf(tmp_path / "tiny.gguf", tied=True)
    weights = open_weights(gguf_path)
    fused = tmp_path / "fused" / "model.onnx"
    fused.parent.mkdir()
    build_graph(weights, fused)
    grid = tmp_path / "gguf" / "model.onnx"
    quantize(fused, grid, [list(range(20))], QuantConfig(recipe="gguf", gguf=str(gguf_path)))
    native = tmp_path / "native" / "model.onnx"
    result = specialize(grid, native)

    n, hidden, inner = TINY["num_hidden_layers"], TINY["hidden_size"], TINY["intermediate_size"]
    q_rows = hidden
    kv_rows = hidden // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    packed = result["packed_matmuls"]
    assert result["shared_head_matmuls"] == 1 and len(packed) == 2 * n
    assert result["offset_terms"] == n  # Q5_1 down_proj's minimums, now computed by the op that holds its blocks
    for name, moved in packed.items():
        if "qkv_proj" in name:
            assert moved == {"rows_at_bits": {"5": q_rows + kv_rows, "8": kv_rows},
                             "bytes": [hidden * (q_rows + 2 * kv_rows), hidden * (5 * q_rows + 13 * kv_rows) // 8]}
        else:
            assert "down_proj" in name and moved == {"rows_at_bits": {"5": hidden},
                                                     "bytes": [inner * hidden, inner * hidden * 5 // 8]}
    size = lambda p: sum(f.stat().st_size for f in p.parent.iterdir())  # noqa: E731
    saved = n * 3 * (hidden * (q_rows + kv_rows) + inner * hidden) // 8
    assert size(grid) - size(native) == pytest.approx(saved, abs=4096)  # and the offset terms' nodes

    from pipeline.stages.optimize import parity_logits

    for ref, want, got in zip(*parity_logits([fused, grid, native])):
        # the same integer products (5e-7 apart here), where int8 activations put the grid 1-3% from float
        assert np.abs(got - want).max() < 1e-3 * np.abs(ref).max() < np.abs(want - ref).max()
