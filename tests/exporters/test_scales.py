"""Block scales stored as float16 (exporters/quantization/scales.py): the file shrinks, onnxruntime computes with
exactly the float32 values the file's float16 ones stand for, and scales under float16's normal range are
shifted by a power of two instead of losing digits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.quantization.nbits import NBitsConfig, pack
from exporters.quantization.scales import HALF_SUFFIX, folded_bytes, half_form, half_scales, on_half_grid, \
    stored_scales
from exporters.quantization.embedding import quantize_embeddings


def block_model(w: np.ndarray, table: np.ndarray, bits: int = 4) -> onnx.ModelProto:
    """x -> MatMulNBits(w) and ids -> GatherBlockQuantized(table), both with float32 scales."""
    from exporters.quantization.nbits import nbits_node

    k, n = w.shape
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    node, inits = nbits_node(matmul, pack(w, bits, 32), NBitsConfig(32, 4))
    gather = helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed", axis=0)
    graph = helper.make_graph(
        [node, gather], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        inits + [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    quantize_embeddings(model, 32)
    return model


def run(model: onnx.ModelProto, x: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "ids": ids})


@pytest.mark.parametrize("magnitude", [1.0, 1e-4])  # 1e-4: 4-bit scales ~1e-5, under float16's normal range
def test_half_scales_shrink_the_file_and_compute_the_values_they_store(magnitude):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 48)) * magnitude).astype(np.float32)
    table = (rng.standard_normal((40, 64)) * magnitude).astype(np.float32)
    x, ids = rng.standard_normal((3, 128)).astype(np.float32), np.array([0, 7, 39], np.int64)
    model = block_model(w, table)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    float_size = model.ByteSize()

    halved = onnx.ModelProto()
    halved.CopyFrom(model)
    report = half_scales(halved)
    assert report["float16_scales"] == 2 and report["float32_scales"] == []
    assert report["bytes_saved"] == sum(a.nbytes // 2 for n, a in before.items() if n.endswith("_scales"))
    assert float_size - halved.ByteSize() == pytest.approx(report["bytes_saved"], abs=600)  # the Cast nodes
    assert folded_bytes(halved) == report["bytes_saved"]  # what a session holds again once it folds the Casts
    index = GraphIndex(halved)
    shifted = any(n.op_type == "Mul" for n in halved.graph.node)
    assert shifted == (magnitude < 1)  # a Mul by 2^-s only where the scales needed the shift
    for name, a in before.items():
        if name.endswith("_scales"):
            assert index.inits[name + HALF_SUFFIX].data_type == TensorProto.FLOAT16
            np.testing.assert_allclose(stored_scales(index, name), a, rtol=2.0 ** -11, atol=0)

    # onnxruntime computes with the stored values: the float32 model given those values gives the same outputs
    stand_in = onnx.ModelProto()
    stand_in.CopyFrom(model)
    for t in stand_in.graph.initializer:
        if t.name.endswith("_scales"):
            t.CopyFrom(numpy_helper.from_array(stored_scales(index, t.name), t.name))
    for got, want in zip(run(halved, x, ids), run(stand_in, x, ids)):
        np.testing.assert_array_equal(got, want)
    # and the embedding's codes were chosen for the float16 scales: they come back as stored, half a step away
    rows = run(halved, x, ids)[1]
    step = stored_scales(index, "table_scales")[ids].repeat(32, 1)
    assert np.all(np.abs(rows - table[ids]) <= step / 2 + 1e-12)


def test_what_float16_cannot_hold_stays_float32():
    assert half_form(np.array([1e-3, 7e4], np.float32)) is None  # over float16's largest value
    assert half_form(np.array([1e-9, 1e4], np.float32)) is None  # a range float16 cannot span at any shift
    assert half_form(np.array([0.0, np.inf], np.float32)) is None
    half, shift = half_form(np.array([0.0, 3e-6, 2e-3], np.float32))
    assert shift == 5 and half.dtype == np.float16 and half[0] == 0  # zero (an empty block) stays zero
    wide = np.array([1e-9, 1e4], np.float32)
    assert on_half_grid(wide) is wide

    model = block_model(np.ones((32, 4), np.float32), np.ones((4, 32), np.float32))
    scales = next(t for t in model.graph.initializer if t.name == "w_scales")
    scales.CopyFrom(numpy_helper.from_array(np.array([[1e-9], [1e4], [1.0], [2.0]], np.float32), "w_scales"))
    report = half_scales(model)
    assert report["float32_scales"] == ["w_scales"] and report["float16_scales"] == 1
