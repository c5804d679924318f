"""exporters/cpu_kernels.py and block_kernels.py: which MatMuls become StaticInt8MatMul or BlockInt8MatMul, the
packed weight layout, and BlockInt8MatMul against onnxruntime's MatMulNBits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.block_kernels import (MAX_SEGMENTS, fold_offsets, pack_codes, pack_four_bit, pack_narrow_blocks,
                                     pack_shared_head, rewrite_shared_blocks, segments)
from exporters.cpu_kernels import KERNEL_KEY, pack, rewrite, specialize
from exporters.quantization.nbits import code_bits
from runtimes.kernels import BLOCK_OP, DOMAIN, GATHER_OP, OP
from tests.exporters.test_gated_mlp import library  # noqa: F401  (the fixture: this CPU's build and AVX2's)
from exporters.quantization.embedding import share_tied_table
from models.errors import UserError
from pipeline.stages.check import int8_flop_share


def test_pack_puts_each_weight_where_the_kernel_reads_it():
    w = np.random.default_rng(0).integers(-128, 128, (12, 48), dtype=np.int8)
    packed = pack(w)
    assert packed.shape == (3, 3, 64) and packed.flags.c_contiguous
    for p in range(3):
        for g in range(3):
            for c in range(16):
                for t in range(4):
                    assert packed[p, g, 4 * c + t] == w[4 * g + t, 16 * p + c]


def qdq_matmul_model(k: int, n: int, weight_zero_point: int = 0, per_column: bool = True) -> onnx.ModelProto:
    """y = DQ(Q(x)) @ DQ(W): one static int8 MatMul as a QDQ graph, plus a float MatMul that must stay."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    scale = rng.uniform(0.01, 0.02, n if per_column else 1).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale if per_column else scale[0], "w_scale"),
             numpy_helper.from_array(np.zeros(n if per_column else 1, np.int8) + weight_zero_point
                                     if per_column else np.int8(weight_zero_point), "w_zero"),
             numpy_helper.from_array(np.float32(0.05), "x_scale"), numpy_helper.from_array(np.uint8(120), "x_zero"),
             numpy_helper.from_array(rng.standard_normal((n, 4)).astype(np.float32), "f")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["h"], name="proj"),
             helper.make_node("MatMul", ["h", "f"], ["y"], name="float_proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_rewrite_replaces_the_static_int8_matmul_and_drops_its_qdq():
    model = qdq_matmul_model(64, 32)
    assert rewrite(model) == 1
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == {OP: 1, "MatMul": 1}  # the Q / DQ nodes went with it; the float MatMul stayed
    node = next(n for n in model.graph.node if n.op_type == OP)
    assert node.domain == DOMAIN and node.input[0] == "x" and node.output[0] == "h"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "w" not in inits and inits[node.input[1]].shape == (2, 16, 64)
    original = numpy_helper.to_array(next(i for i in qdq_matmul_model(64, 32).graph.initializer if i.name == "w"))
    np.testing.assert_array_equal(inits[node.input[3]], original.sum(axis=0, dtype=np.int32))
    assert any(o.domain == DOMAIN for o in model.opset_import)
    assert {p.key: p.value for p in model.metadata_props}[KERNEL_KEY] == OP


def test_check_counts_the_kernel_as_static_w8a8(tmp_path):
    model = qdq_matmul_model(64, 32)
    before = tmp_path / "qdq.onnx"
    onnx.save(model, str(before))
    rewrite(model)
    after = tmp_path / "native.onnx"
    onnx.save(model, str(after))
    assert int8_flop_share(before) == int8_flop_share(after)
    assert int8_flop_share(after)["int8_w8a8_flop_share"] == pytest.approx(64 * 32 / (64 * 32 + 32 * 4))


@pytest.mark.parametrize("k, n, zero, per_column", [(6, 32, 0, True), (64, 40, 0, True), (64, 32, 3, True),
                                                     (64, 32, 0, False)])
def test_matmuls_the_kernel_cannot_take_stay(tmp_path, k, n, zero, per_column):
    """K not a multiple of 4 or N of 16, a weight zero point: left alone. A single scale is broadcast."""
    model = qdq_matmul_model(k, n, zero, per_column)
    expected = 1 if (k, n, zero) == (64, 32, 0) else 0
    assert rewrite(model) == expected
    if not expected:
        src = tmp_path / "src.onnx"
        onnx.save(qdq_matmul_model(k, n, zero, per_column), str(src))
        with pytest.raises(UserError, match="no static int8 MatMul"):
            specialize(src, tmp_path / "out" / "model.onnx")
        assert not (tmp_path / "out" / "model.onnx").exists()


def narrow_codes(rng, k: int, widths: list[tuple[int, int]]) -> np.ndarray:
    """uint8 (rows, K/32, 32) 8-bit codes, each run of (rows, b) within b bits' signed range around 128, its
    extremes included."""
    runs = []
    for rows, b in widths:
        c = rng.integers(128 - 2 ** (b - 1), 128 + 2 ** (b - 1), (rows, k // 32, 32), dtype=np.uint8)
        c[:, 0, 0], c[:, -1, -1] = 128 - 2 ** (b - 1), 127 + 2 ** (b - 1)
        runs.append(c)
    return np.concatenate(runs)


def tied_nbits_model(v: int, k: int, *, bits: int = 8, accuracy_level: int = 4, gathered: bool = True,
                     fp16_scales: bool = False, seed: int = 0,
                     widths: list[tuple[int, int]] | None = None) -> onnx.ModelProto:
    """logits = MatMulNBits(x, blocks, scales) as a tied head writes it, with (`gathered`) an embedding that
    gathers the same stored blocks and scales; the scales stored as float16 behind a Cast (the gguf recipe's
    way) with `fp16_scales`; 8-bit codes in runs of rows of fewer bits with `widths` [(rows, bits), ...]."""
    rng = np.random.default_rng(seed)
    blob = 32 * bits // 8
    blocks = narrow_codes(rng, k, widths) if widths else rng.integers(0, 256, (v, k // 32, blob), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (v, k // 32)).astype(np.float32)
    inits = [numpy_helper.from_array(blocks, "blocks")]
    nodes = []
    if fp16_scales:
        inits.append(numpy_helper.from_array(scales.astype(np.float16), "scales16"))
        nodes.append(helper.make_node("Cast", ["scales16"], ["scales"], to=TensorProto.FLOAT))
    else:
        inits.append(numpy_helper.from_array(scales, "scales"))
    nodes.append(helper.make_node("MatMulNBits", ["x", "blocks", "scales"], ["logits"], name="head",
                                  domain="com.microsoft", K=k, N=v, bits=bits, block_size=32,
                                  accuracy_level=accuracy_level))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, v])]
    if gathered:
        nodes.append(helper.make_node("Gather", ["blocks", "ids"], ["rows"], axis=0))
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.UINT8, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("changes, expected", [({}, 1), ({"fp16_scales": True}, 1), ({"gathered": False}, 0),
                                               ({"bits": 4}, 0), ({"accuracy_level": 1}, 0)])
def test_only_an_8bit_int8_head_whose_blocks_another_node_reads_moves_to_the_block_kernel(changes, expected):
    """Blocks nothing else reads are freed by onnxruntime once prepacked (MatMulNBits is the faster there);
    4-bit blocks and float activations (accuracy_level 1) are not what the kernel computes."""
    model = tied_nbits_model(64, 96, **changes)
    assert rewrite_shared_blocks(model) == expected
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops[BLOCK_OP] == expected and ops["MatMulNBits"] == 1 - expected
    if expected:
        node = next(n for n in model.graph.node if n.op_type == BLOCK_OP)
        assert node.domain == DOMAIN and list(node.input) == ["x", "blocks", "scales"] and not node.attribute
        assert any(o.domain == DOMAIN for o in model.opset_import)


def test_check_counts_the_block_kernel_as_matmul_nbits_counts(tmp_path):
    """int8 weights and int8 arithmetic (activations quantized per block as it runs), not static W8A8."""
    model = tied_nbits_model(64, 96)
    onnx.save(model, str(tmp_path / "nbits.onnx"))
    rewrite_shared_blocks(model)
    onnx.save(model, str(tmp_path / "block.onnx"))
    shares = int8_flop_share(tmp_path / "block.onnx")
    assert shares == int8_flop_share(tmp_path / "nbits.onnx")
    assert shares == {"int8_weight_flop_share": 1.0, "int8_w8a8_flop_share": 0.0, "int8_compute_flop_share": 1.0}


def test_specialize_a_weight_only_model_records_the_block_kernel(tmp_path):
    src = tmp_path / "w4.onnx"
    onnx.save(tied_nbits_model(64, 96), str(src))
    result = specialize(src, tmp_path / "out" / "model.onnx")
    assert result["static_matmuls"] == 0 and result["shared_head_matmuls"] == result["matmuls"] == 1
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {p.key: p.value for p in model.metadata_props}[KERNEL_KEY] == BLOCK_OP
    untied = tmp_path / "untied.onnx"
    onnx.save(tied_nbits_model(64, 96, gathered=False), str(untied))
    with pytest.raises(UserError, match="no static int8 MatMul, no 8-bit head shared .* no 4-bit blocks"):
        specialize(untied, tmp_path / "out2" / "model.onnx")
    assert not (tmp_path / "out2").exists()


def session_of(model: onnx.ModelProto, threads: int, library=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("v, k, m", [(37, 96, 1), (64, 640, 3), (1000, 576, 1), (130, 2048, 5), (67, 96, 131)])
def test_block_int8_matmul_computes_what_matmul_nbits_does(native_kernels, v, k, m):
    """The kernel against onnxruntime's own MatMulNBits (8 bits, int8 activations) on the same stored blocks:
    decode and prefill rows, odd block counts (K 96: 3 blocks), more than 16 blocks a row, row counts not a
    multiple of 4 (nor of 2), prompts longer than the kernel's tiles of activation rows (131: 64 + 64 + 3), an
    all-zero activation block; equal up to float rounding of the sum over blocks."""
    model = tied_nbits_model(v, k, seed=v + k)
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert rewrite_shared_blocks(native) == 1
    x = np.random.default_rng(m).standard_normal((1, m, k)).astype(np.float32) * 3
    x[0, 0, :32] = 0
    feed = {"x": x, "ids": np.array([[1, v - 1]], np.int64)}
    want = session_of(model, 2).run(None, feed)
    for threads in (1, 2):
        got = session_of(native, threads, native_kernels).run(None, feed)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=2e-6 * np.abs(want[0]).max())


def test_a_shared_table_reads_the_packed_head_and_the_unpacked_codes_go(native_kernels):
    """A static int8 head whose codes the embedding gathers (embedding.share_static_head): after the rewrite
    the embedding gathers the same codes from StaticInt8MatMul's packed copy (one GatherND over
    (N/16, K/4, 64)), the original int8 weight is gone from the file, and the embedding rows are bit for bit
    those of the QDQ graph; token ids at panel edges and the last token included. The codes use all 8 bits
    (7 would be too coarse to share), which saturate onnxruntime's int8 GEMM on x86 without VNNI: there the
    logits are held to the exact integer arithmetic the QDQ graph stands for instead."""
    from exporters.quantization.embedding import share_static_head, tied_through_map
    from runtimes.providers import int8_gemm_saturates

    rng = np.random.default_rng(5)
    k, n = 32, 96  # more tokens than channels: the map is determined
    table = rng.standard_normal((n, k)).astype(np.float32)
    w = (table * rng.uniform(0.5, 2.0, k)).T.astype(np.float32)
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    float_pair = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed", axis=0),
         helper.make_node("MatMul", ["h", "w"], ["logits"], name="head")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    tie = tied_through_map(helper.make_model(float_pair, opset_imports=[helper.make_opsetid("", 21)]))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed", axis=0),
             helper.make_node("QuantizeLinear", ["h", "x_scale", "x_zero"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "x_scale", "x_zero"], ["hd"]),
             helper.make_node("DequantizeLinear", ["codes", "w_scale", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["hd", "wd"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(np.round(w / scale).astype(np.int8), "codes"),
                               numpy_helper.from_array(scale, "w_scale"),
                               numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
                               numpy_helper.from_array(np.float32(0.05), "x_scale"),
                               numpy_helper.from_array(np.uint8(128), "x_zero")])
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert share_static_head(qdq, tie)
    native = onnx.ModelProto()
    native.CopyFrom(qdq)
    assert rewrite(native) == 1
    ops = Counter(node.op_type for node in native.graph.node)
    assert ops["GatherND"] == 1 and ops[OP] == 1 and "codes" not in {t.name for t in native.graph.initializer}
    ids = np.array([[0, 15, 16, 17, 31, 32, 95]], np.int64)
    want = session_of(qdq, 1).run(None, {"ids": ids})
    got = session_of(native, 2, native_kernels).run(None, {"ids": ids})
    np.testing.assert_array_equal(got[1], want[1])
    if int8_gemm_saturates():
        h_codes = np.clip(np.round(want[1] / np.float32(0.05)) + 128, 0, 255).astype(np.int64) - 128
        w_codes = np.round(w / scale).astype(np.int64)
        want[0] = ((h_codes @ w_codes) * (np.float32(0.05) * scale)).astype(np.float32)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6 * np.abs(want[0]).max())


def table_and_static_head_model(v: int, k: int, *, diagonal: bool = True, related: bool = True) -> onnx.ModelProto:
    """ids -> GatherBlockQuantized (int8 blocks of 32, its own table E) -> x -> DQ(Q(x)) @ DQ(W) -> logits, where W
    is E seen through a map (a diagonal smoothing, or a dense one) rounded to int8 per column: a table stored
    twice, as the w8a8 writer leaves it when the head's codes are too coarse to share. `related` False: W is
    unrelated to E."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((v, k)).astype(np.float32)
    blocks = table.reshape(v, k // 32, 32)
    scales = (np.abs(blocks).max(-1) / 127).astype(np.float32)
    codes = (np.round(blocks / scales[..., None]) + 128).astype(np.uint8).reshape(v, k)
    e = ((codes.astype(np.float32) - 128).reshape(v, k // 32, 32) * scales[..., None]).reshape(v, k)
    x_map = np.diag(rng.uniform(0.5, 4.0, k)) if diagonal else np.eye(k) + 0.2 * rng.standard_normal((k, k))
    w = (x_map @ e.T if related else rng.standard_normal((k, v))).astype(np.float32)
    # 7-bit weights, as w8a8 writes them (reduce_range): full-range int8 weights saturate onnxruntime's int16 pair
    # sums on x86 without VNNI (AVX2's vpmaddubsw), which made the original's logits, not the rewrite's, wrong
    w_scale = (np.abs(w).max(0) / 64).astype(np.float32)
    w_q = np.round(w / w_scale).astype(np.int8)
    inits = [numpy_helper.from_array(codes, "embed_Q8"), numpy_helper.from_array(scales, "embed_scales"),
             numpy_helper.from_array(np.full(scales.shape, 128, np.uint8), "embed_zp"),
             numpy_helper.from_array(w_q, "head_w"), numpy_helper.from_array(w_scale, "head_scale"),
             numpy_helper.from_array(np.zeros(v, np.int8), "head_zero"),
             numpy_helper.from_array(np.float32(0.05), "x_scale"), numpy_helper.from_array(np.uint8(128), "x_zero")]
    nodes = [helper.make_node("GatherBlockQuantized", ["embed_Q8", "ids", "embed_scales", "embed_zp"], ["emb"],
                              name="embed_Q8", domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=32,
                              bits=8),
             helper.make_node("QuantizeLinear", ["emb", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["head_w", "head_scale", "head_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["logits"], name="/model/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("diagonal", [True, False])
def test_a_static_head_beside_its_own_table_moves_onto_the_tables_blocks(diagonal):
    """The head reads the table's int8 blocks through the fitted map (a Mul where it is diagonal), the embedding
    gathers those same blocks: one uint8 table is left, the rows come out exactly as before, and the logits stay
    within the head's int8 rounding of the original's."""
    from exporters.cpu_kernels import head_on_table_blocks

    v, k = 320, 64
    model = table_and_static_head_model(v, k, diagonal=diagonal)
    ids = np.array([[3, 77, 299, 0, 150]], np.int64)
    before = session_of(model, 1).run(None, {"ids": ids})
    moved = head_on_table_blocks(model)
    assert moved["map"] == ("diagonal" if diagonal else f"{k}x{k}") and moved["fit_relative_residual"] < 0.02
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 1 and ops["Mul" if diagonal else "MatMul"] >= 1 and not ops["QuantizeLinear"]
    assert not ops["GatherBlockQuantized"]
    tables = [t for t in model.graph.initializer if t.data_type == TensorProto.UINT8 and np.prod(t.dims) == v * k]
    assert len(tables) == 1 and list(tables[0].dims) == [v, k // 32, 32]
    assert {t.name for t in model.graph.initializer}.isdisjoint({"head_w", "embed_Q8", "embed_zp"})
    after = session_of(model, 1).run(None, {"ids": ids})
    np.testing.assert_array_equal(after[1], before[1])
    err = np.abs(after[0] - before[0]).max() / np.abs(before[0]).max()
    assert err < 0.03
    assert rewrite_shared_blocks(model) == 1


@pytest.mark.parametrize("fit_rows", [16384, 128])  # the whole table in one block, or a first sample of it
def test_an_unrelated_head_stays_static_and_a_related_one_moves_whatever_the_fit_blocks(monkeypatch, fit_rows):
    from exporters import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "FIT_ROWS", fit_rows)
    model = table_and_static_head_model(320, 64, related=False)
    nodes = [n.op_type for n in model.graph.node]
    assert cpu_kernels.head_on_table_blocks(model) is None and [n.op_type for n in model.graph.node] == nodes
    moved = cpu_kernels.head_on_table_blocks(table_and_static_head_model(320, 64))
    assert moved["map"] == "diagonal" and moved["fit_relative_residual"] < 0.02


def test_code_bits_are_the_fewest_that_hold_each_rows_codes_and_runs_of_them_become_segments():
    rng = np.random.default_rng(2)
    codes = narrow_codes(rng, 64, [(3, 5), (2, 8), (1, 2), (4, 5), (1, 7)])
    bits = code_bits(codes)
    assert bits.tolist() == [5] * 3 + [8] * 2 + [2] + [5] * 4 + [7]
    assert code_bits(np.full((1, 1, 32), 128, np.uint8)).tolist() == [2]  # all zero: the narrowest width
    assert code_bits(np.full((1, 1, 32), 112, np.uint8)).tolist() == [5]  # -16 fits 5 bits; +16 would not
    assert code_bits(np.full((1, 1, 32), 144, np.uint8)).tolist() == [6]
    assert segments(bits) == ([5, 8, 2, 5, 7], [3, 2, 1, 4, 1])
    alternating = np.array([5, 6] * MAX_SEGMENTS)  # more runs than the kernel takes: one at the widest
    assert segments(alternating) == ([6], [2 * MAX_SEGMENTS])


def test_pack_codes_puts_each_code_where_the_kernel_reads_it():
    """Per block of 32, code i of a b-bit run at bits [i*b, i*b + b) of 4b little-endian bytes, minus 128 plus
    2^(b-1); runs one after another, rows in order (read back bit by bit here)."""
    rng = np.random.default_rng(3)
    widths = [(3, 5), (2, 8), (2, 3)]
    codes = narrow_codes(rng, 64, widths)
    packed = pack_codes(codes, [b for _, b in widths], [r for r, _ in widths], chunk=2)
    assert packed.dtype == np.uint8 and packed.size == sum(r * 2 * 4 * b for r, b in widths)
    bitstream = np.unpackbits(packed, bitorder="little")
    at, row = 0, 0
    for rows, b in widths:
        for _ in range(rows):
            for block in range(2):
                for i in range(32):
                    value = int(sum(int(bitstream[at + j]) << j for j in range(b)))
                    assert value - 2 ** (b - 1) + 128 == codes[row, block, i]
                    at += b
            row += 1
    assert at == bitstream.size


def test_only_unshared_8bit_blocks_of_fewer_bits_are_packed():
    """A GGUF's Q5_0 blocks beside Q8_0 rows (a stacked qkv): packed per run; blocks the embedding gathers stay
    8-bit for it (rewrite_shared_blocks takes them); full 8-bit codes save nothing and stay MatMulNBits."""
    widths = [(40, 5), (8, 8), (16, 6)]
    model = tied_nbits_model(64, 96, gathered=False, widths=widths)
    moved = pack_narrow_blocks(model)
    assert moved == {"head": {"rows_at_bits": {"5": 40, "6": 16, "8": 8},
                              "bytes": [64 * 96, (40 * 5 + 8 * 8 + 16 * 6) * 96 // 8]}}
    node = model.graph.node[0]
    assert node.op_type == BLOCK_OP and node.domain == DOMAIN and list(node.input) == ["x", "blocks_packed", "scales"]
    attrs = {a.name: a for a in node.attribute}
    assert attrs["K"].i == 96 and list(attrs["bits"].ints) == [5, 8, 6] and list(attrs["rows"].ints) == [40, 8, 16]
    assert [t.name for t in model.graph.initializer] == ["scales", "blocks_packed"]
    assert pack_narrow_blocks(tied_nbits_model(64, 96, gathered=False)) == {}
    assert pack_narrow_blocks(tied_nbits_model(64, 96, gathered=False, widths=[(64, 8)])) == {}
    assert pack_narrow_blocks(tied_nbits_model(64, 96, gathered=False, widths=[(56, 8), (8, 5)])) == {}  # < 1 bit
    assert pack_narrow_blocks(tied_nbits_model(64, 96, gathered=False, widths=[(64, 7)]))  # a bit a weight saved
    shared = tied_nbits_model(64, 96, widths=[(64, 5)])
    assert pack_narrow_blocks(shared) == {} and shared.graph.node[0].op_type == "MatMulNBits"


@pytest.mark.parametrize("k, m", [(96, 1), (640, 3), (2048, 5)])
def test_packed_blocks_compute_what_matmul_nbits_does_on_the_8bit_ones(native_kernels, k, m):
    """BlockInt8MatMul on packed codes (unpacked when the session starts) against onnxruntime's MatMulNBits on
    the same codes stored 8-bit: decode and prefill rows, 1 and 2 threads, runs of every width from 2 to 8 bits."""
    widths = [(37, 5), (8, 8), (16, 6), (3, 2), (16, 5), (5, 7), (4, 4), (3, 3)]
    model = tied_nbits_model(sum(r for r, _ in widths), k, gathered=False, fp16_scales=True, widths=widths, seed=k)
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert pack_narrow_blocks(native)
    x = np.random.default_rng(m).standard_normal((1, m, k)).astype(np.float32) * 3
    feed = {"x": x, "ids": np.zeros((1, 1), np.int64)}  # ids: an input the ungathered model has no use for
    want = session_of(model, 2).run(None, feed)[0]
    for threads in (1, 2):
        got = session_of(native, threads, native_kernels).run(None, feed)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_packed_codes_that_do_not_match_their_attributes_are_refused_when_the_session_starts(native_kernels):
    model = tied_nbits_model(64, 96, gathered=False, widths=[(64, 5)])
    pack_narrow_blocks(model)
    rows = next(a for a in model.graph.node[0].attribute if a.name == "rows")
    rows.ints[0] = 63
    with pytest.raises(Exception, match="packed codes' size does not match K, bits and rows"):
        session_of(model, 1, native_kernels)


def test_specialize_packs_narrow_blocks_and_check_counts_them_as_before(tmp_path):
    src = tmp_path / "gguf.onnx"
    onnx.save(tied_nbits_model(64, 96, gathered=False, widths=[(64, 5)]), str(src))
    result = specialize(src, tmp_path / "out" / "model.onnx")
    assert result["matmuls"] == 1 and result["static_matmuls"] == result["shared_head_matmuls"] == 0
    assert result["packed_matmuls"]["head"]["bytes"] == [64 * 96, 64 * 96 * 5 // 8]
    out = tmp_path / "out" / "model.onnx"
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}[KERNEL_KEY] == BLOCK_OP
    assert out.stat().st_size < src.stat().st_size - 64 * 96 * 3 // 8 + 200
    assert int8_flop_share(out) == int8_flop_share(src)
    assert int8_flop_share(out)["int8_weight_flop_share"] == 1.0


@pytest.mark.parametrize("changes", [{}, {"fp16_scales": True}])
def test_an_unshared_4bit_matmul_nbits_moves_to_the_block_kernel_on_its_own_bytes(changes):
    """MatMulNBits' 4-bit nibbles are the kernel's 4-bit packed codes byte for byte: the same bytes under a flat
    shape, nothing rewritten; blocks the embedding gathers, float activations and 8-bit blocks stay."""
    model = tied_nbits_model(64, 96, bits=4, gathered=False, **changes)
    blocks = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "blocks"))
    assert pack_four_bit(model) == {"head": {"rows_at_bits": {"4": 64}, "bytes": [64 * 3 * 16, 64 * 3 * 16]}}
    node = next(n for n in model.graph.node if n.op_type == BLOCK_OP)
    assert node.domain == DOMAIN and list(node.input) == ["x", "blocks_packed", "scales"]
    attrs = {a.name: a for a in node.attribute}
    assert attrs["K"].i == 96 and list(attrs["bits"].ints) == [4] and list(attrs["rows"].ints) == [64]
    packed = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "blocks_packed"))
    assert packed.shape == (64 * 3 * 16,) and np.array_equal(packed, blocks.reshape(-1))
    assert "blocks" not in {t.name for t in model.graph.initializer}
    for kept in (tied_nbits_model(64, 96, bits=4), tied_nbits_model(64, 96, bits=4, gathered=False, accuracy_level=1),
                 tied_nbits_model(64, 96, gathered=False)):
        assert pack_four_bit(kept) == {} and kept.graph.node[0].op_type == "MatMulNBits"


@pytest.mark.parametrize("v, k, m", [(37, 96, 1), (64, 640, 3), (1000, 576, 1), (130, 2048, 5), (67, 96, 131)])
def test_4bit_blocks_on_the_kernel_compute_what_matmul_nbits_does(native_kernels, v, k, m):
    """The kernel's 4-bit rows (kept at 4 bits, decoded as read) against onnxruntime's 4-bit MatMulNBits on the
    same bytes, int8 activations: decode and prefill rows (its prompt tiles included), odd block counts, 1 and 2
    threads; equal up to float rounding of the sum over blocks."""
    model = tied_nbits_model(v, k, bits=4, gathered=False, fp16_scales=True, seed=v + k)
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert pack_four_bit(native)
    x = np.random.default_rng(m).standard_normal((1, m, k)).astype(np.float32) * 3
    x[0, 0, :32] = 0
    feed = {"x": x, "ids": np.zeros((1, 1), np.int64)}
    want = session_of(model, 2).run(None, feed)[0]
    for threads in (1, 2):
        got = session_of(native, threads, native_kernels).run(None, feed)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def offset_grid_model(n: int, k: int, bits: int, sub_scales: bool, seed: int) -> onnx.ModelProto:
    """y = x W as the gguf recipe writes a GGUF's offset type (exporters/quantization/grid.py `Writer`):
    MatMulNBits plus the per-block offset term, from float16 scales and minimums (Q4_1, Q5_1) or with the
    K-quants' integer sub-block multipliers (Q4_K, Q5_K), MatMulNBits' centre shifted into the offset."""
    from exporters.quantization.grid import Writer
    from models.gguf_grid import Factor, Grid

    rng = np.random.default_rng(seed)
    kb = k // 32
    # 8-bit: a Q5_1's 5-bit codes re-centred on MatMulNBits' 128, as the recipe writes them (grid.py)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8) if bits == 4 else \
        rng.integers(112, 144, (n, k), dtype=np.uint8)

    def factor(low: float, high: float) -> Factor:
        if not sub_scales:
            return Factor(rng.uniform(low, high, (n, kb)).astype(np.float16))
        groups = -(-kb // 8)
        return Factor(rng.uniform(low, high, (n, groups)).astype(np.float16),
                      rng.integers(1, 64, (n, groups * 8), dtype=np.uint8)[:, :kb])

    grid = Grid("Q4_K" if sub_scales else "Q4_1", codes, bits, 32, factor(1e-3, 1e-2), factor(-0.1, 0.02),
                shift=8 if bits == 4 else 16)
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    writer = Writer(model, 4)
    writer.matmul(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), "w", grid)
    model.graph.node.extend(writer.nodes)
    return model


@pytest.mark.parametrize("n, k, bits, sub_scales", [(64, 96, 4, False), (1000, 576, 4, True), (96, 640, 8, False),
                                                    (130, 2048, 4, False)])
def test_a_ggufs_offset_term_goes_into_the_kernel_that_holds_its_blocks(library, n, k, bits, sub_scales):
    """Q4_1 / Q4_K (4-bit, on the kernel at 4 bits) and Q5_1-like 8-bit blocks of 5-bit codes (packed at 5):
    `fold_offsets` gives the op the term's (N, K/32) offsets and drops the block sums, the float MatMul and the
    Add; the kernel's output is the graph's up to float rounding, for decode and prompt rows, on 1 and 2
    threads, on this CPU's build and the AVX2 one. A MatMul whose output also goes elsewhere keeps its term."""
    model = offset_grid_model(n, k, bits, sub_scales, seed=n + k)
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert (pack_four_bit(native) if bits == 4 else pack_narrow_blocks(native))
    assert fold_offsets(native) == 1
    ops = Counter(node.op_type for node in native.graph.node)
    assert ops[BLOCK_OP] == 1 and not {"ReduceSum", "MatMul"} & set(ops)
    assert [node.op_type for node in native.graph.node if "x" in node.input] == [BLOCK_OP]  # no block sums
    node = next(node for node in native.graph.node if node.op_type == BLOCK_OP)
    assert len(node.input) == 4 and list(node.output) == ["y"]
    for m in (1, 3, 131):
        x = np.random.default_rng(m).standard_normal((1, m, k)).astype(np.float32) * 3
        x[0, 0, :32] = 0
        want = session_of(model, 2).run(None, {"x": x})[0]
        assert np.abs(want).max() > 1.0  # the term is a large part of each output: a dropped one shows
        for threads in (1, 2):
            got = session_of(native, threads, library).run(None, {"x": x})[0]
            np.testing.assert_allclose(got, want, rtol=0, atol=3e-6 * np.abs(want).max())
    shared = offset_grid_model(n, k, bits, sub_scales, seed=1)
    shared.graph.output.append(helper.make_tensor_value_info("y/blocks", TensorProto.FLOAT, None))
    assert (pack_four_bit(shared) if bits == 4 else pack_narrow_blocks(shared)) and fold_offsets(shared) == 0


def shared_table_model(widths: list[tuple[int, int]], k: int = 96, seed: int = 5) -> onnx.ModelProto:
    """A tied head (8-bit MatMulNBits "head_Q8" of codes in runs `widths` [(rows, bits), ...], float16 scales
    behind a Cast) whose table the token embedding reads through embedding.share_tied_table's lookup nodes:
    outputs logits and the gathered rows ("hidden")."""
    rng = np.random.default_rng(seed)
    v = sum(r for r, _ in widths)
    scales = rng.uniform(1e-3, 1e-2, (v, k // 32)).astype(np.float16)
    inits = [numpy_helper.from_array(narrow_codes(rng, k, widths), "blocks"),
             numpy_helper.from_array(scales, "scales16"),
             numpy_helper.from_array(rng.standard_normal((v, k)).astype(np.float32), "table")]
    nodes = [helper.make_node("Cast", ["scales16"], ["scales"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["table", "ids"], ["hidden"], name="embed", axis=0),
             helper.make_node("MatMulNBits", ["x", "blocks", "scales"], ["logits"], name="head_Q8",
                              domain="com.microsoft", K=k, N=v, bits=8, block_size=32, accuracy_level=4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, v]),
                               helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, None, k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    assert share_tied_table(model, "embed", "head")
    return model


@pytest.mark.parametrize("k", [96, 576])
def test_a_shared_head_of_narrow_codes_is_stored_once_packed_and_the_embedding_gathers_from_it(native_kernels, k):
    """w4's --head-bits 6 on a tied table: the head on BlockInt8MatMul over packed codes, the embedding's lookup
    one BlockGather on the same packed initializer; the rows are the portable lookup's to the bit (negative ids
    count from the end, as Gather's), the logits MatMulNBits' to float rounding, on 1 and 2 threads."""
    widths = [(40, 6), (3, 5), (21, 6)]
    model = shared_table_model(widths, k)
    native = onnx.ModelProto()
    native.CopyFrom(model)
    moved = pack_shared_head(native)
    assert moved == {"head_Q8": {"rows_at_bits": {"5": 3, "6": 61}, "bytes": [64 * k, (61 * 6 + 3 * 5) * k // 8]}}
    ops = Counter(n.op_type for n in native.graph.node)
    assert ops == {"Cast": 1, BLOCK_OP: 1, GATHER_OP: 1}  # the lookup's seven nodes went, and its constants
    assert sorted(t.name for t in native.graph.initializer) == ["blocks_packed", "scales16"]
    gather = next(n for n in native.graph.node if n.op_type == GATHER_OP)
    assert list(gather.input) == ["blocks_packed", "ids", "scales"] and gather.domain == DOMAIN
    assert {a.name: list(a.ints) or a.i for a in gather.attribute} == {"K": k, "bits": [6, 5, 6], "rows": [40, 3, 21]}
    rng = np.random.default_rng(k)
    for m in (1, 7):
        ids = rng.integers(-64, 64, (1, m)).astype(np.int64)
        ids[0, 0] = 41  # a row of the 5-bit run
        feed = {"x": rng.standard_normal((1, m, k)).astype(np.float32), "ids": ids}
        want_logits, want_rows = session_of(model, 2).run(None, feed)
        for threads in (1, 2):
            logits, rows = session_of(native, threads, native_kernels).run(None, feed)
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_allclose(logits, want_logits, rtol=0, atol=2e-6 * np.abs(want_logits).max())
    with pytest.raises(Exception, match="BlockGather: a token id outside the table"):
        session_of(native, 1, native_kernels).run(None, {"x": feed["x"][:, :1], "ids": np.array([[64]])})


def test_a_shared_head_of_full_8bit_codes_or_another_reader_stays_for_the_block_kernel_as_stored():
    """Nothing to save at 8 bits; and blocks read by anything but the lookup share_tied_table writes keep their
    8-bit form (rewrite_shared_blocks then reads them in place)."""
    full = shared_table_model([(64, 8)])
    assert pack_shared_head(full) == {} and rewrite_shared_blocks(full) == 1
    other = tied_nbits_model(64, 96, widths=[(64, 5)])  # a plain Gather of the blocks as they are
    assert pack_shared_head(other) == {} and Counter(n.op_type for n in other.graph.node)["MatMulNBits"] == 1


def test_specialize_records_the_gather_kernel_and_stores_the_table_at_its_width(tmp_path):
    src = tmp_path / "w4.onnx"
    onnx.save(shared_table_model([(64, 6)]), str(src))
    out = tmp_path / "out" / "model.onnx"
    result = specialize(src, out)
    assert result["matmuls"] == result["shared_head_matmuls"] == 1 and list(result["packed_matmuls"]) == ["head_Q8"]
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}[KERNEL_KEY] == f"{BLOCK_OP},{GATHER_OP}"
    assert out.stat().st_size < src.stat().st_size - 64 * 96 * 2 // 8 + 200  # 6 bits a code, not 8
