"""exporters/cpu_kernels.py: which MatMuls become StaticInt8MatMul, and the packed weight layout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.cpu_kernels import DOMAIN, KERNEL_KEY, OP, pack, rewrite, specialize
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
