"""exporters/onnx_io.py: a model that onnx refuses to read is one clear error, from every stage that reads one."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporters.cpu_kernels import specialize
from exporters.onnx_io import load_onnx, save_model
from models.errors import UserError


def _model_with_external_data(folder):
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    path = folder / "model.onnx"
    save_model(helper.make_model(graph), path, external=True)
    assert (folder / "model.onnx.data").stat().st_size == 4096 * 4
    return path


def test_a_data_file_with_two_hard_links_is_one_clear_error(tmp_path):
    path = _model_with_external_data(tmp_path)
    np.testing.assert_array_equal(numpy_helper.to_array(load_onnx(path).graph.initializer[0]).ravel(),
                                  np.arange(4096, dtype=np.float32))
    try:
        os.link(tmp_path / "model.onnx.data", tmp_path / "elsewhere.data")
    except OSError:
        pytest.skip("this filesystem has no hard links")
    with pytest.raises(UserError, match="more than one hard link"):
        load_onnx(path)
    with pytest.raises(UserError, match="more than one hard link"):  # optimize --native-int8 reads through it
        specialize(path, tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out").exists()


def test_a_truncated_data_file_is_one_clear_error(tmp_path):
    path = _model_with_external_data(tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_onnx(path)
