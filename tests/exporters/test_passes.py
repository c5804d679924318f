"""Quantization as passes: recipes are data, pass configs are typed, the ONNX -> ONNX modules import no torch,
and the graph index answers what the hand-built maps did."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.quantization import config as qconfig
from exporters.quantization.recipes import RECIPES, steps
from exporters.quantize import QuantConfig

ROOT = Path(__file__).resolve().parents[2]


def test_onnx_to_onnx_modules_import_no_torch():
    code = ("import sys, exporters.quantize, exporters.optimize, exporters.rotation, exporters.smoothing, "
            "exporters.gptq, exporters.cpu_kernels, exporters.block_kernels, exporters.acceptance; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_recipe_is_a_list_of_passes():
    assert set(RECIPES) == set(qconfig.RECIPES)
    names = {r: [s.name for s, _ in steps(QuantConfig(recipe=r))] for r in RECIPES}
    assert names["w8a8"] == ["calibrate", "rotate", "smooth", "online_hadamard", "targets", "ranges", "gptq",
                             "write_static", "search"]
    assert names["static"] == ["calibrate", "targets", "write_qdq", "measure"]
    assert names["w8"] == ["gptq_blockwise", "write_nbits", "measure"]
    assert names["w4"] == ["rotate", "gptq_blockwise", "write_nbits", "search"]


def test_options_leave_passes_out_rather_than_branching_inside_them():
    names = [s.name for s, _ in steps(QuantConfig(recipe="w8a8", rotate=False, weight_rounding="nearest"))]
    assert "rotate" not in names and "online_hadamard" not in names and "gptq" not in names
    names = [s.name for s, _ in steps(QuantConfig(recipe="w8a8", online_hadamard=0))]
    assert "rotate" in names and "online_hadamard" not in names
    names = [s.name for s, _ in steps(QuantConfig(recipe="w4", rotate=False, search=False))]
    assert names == ["gptq_blockwise", "write_nbits", "search"]


@pytest.mark.parametrize("recipe", sorted(qconfig.RECIPES))
def test_pass_configs_are_frozen_dataclasses(recipe):
    for step, cfg in steps(QuantConfig(recipe=recipe)):
        assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen, step.name


def test_search_accepts_by_checks_thresholds_unless_told_not_to():
    from exporters.acceptance import THRESHOLDS

    accept = QuantConfig(recipe="w8a8").acceptance(0.02)
    assert (accept.max_ppl_increase, accept.min_top1, accept.max_kl) == (0.02, THRESHOLDS["w8a8"].min_top1,
                                                                         THRESHOLDS["w8a8"].max_kl)
    loose = QuantConfig(recipe="w8a8", judge_like_check=False).acceptance(0.02)
    assert (loose.min_top1, loose.max_kl) == (0.0, None)


def test_graph_index_maps_producers_readers_and_shared_weights():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="a"),
         helper.make_node("MatMul", ["x", "w"], ["z"], name="b"),
         helper.make_node("Shape", ["y"], ["s"], name="shape")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("z", "s")], [w])
    model = helper.make_model(graph)
    g = GraphIndex.of(model)
    assert g.output_name_to_node["y"].name == "a" and [n.name for n in g.input_name_to_nodes["x"]] == ["a", "b"]
    assert "y" not in g.consumers and g.uses["y"] == 1  # shape-only readers are left out of consumers only
    assert g.uses["w"] == 2 and g.weight_names == {"a", "b"} and g.weight_shapes() == {"a": (4, 3), "b": (4, 3)}
    g.replace_initializer("w", np.zeros((4, 3), np.float32))
    assert not numpy_helper.to_array(model.graph.initializer[0]).any()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "unused"))
    g.remove_unused_initializers()
    assert [t.name for t in model.graph.initializer] == ["w"]


def test_the_head_is_found_through_soft_capping():
    """`head_matmul` follows the logits back through one-input ops (Gemma 2's cap: Div, Tanh, Mul) to the
    MatMul, which the online rotation then leaves alone; two computed inputs end the search."""
    from exporters.quantization.smooth import head_matmul

    def model(capped: bool, two: bool = False):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="head")]
        if capped:
            nodes += [helper.make_node("Div", ["h", "c"], ["d"], name="div"),
                      helper.make_node("Tanh", ["d"], ["t"], name="tanh"),
                      helper.make_node("Mul", ["t", "x2" if two else "c"], ["logits"], name="cap")]
        else:
            nodes[0].output[0] = "logits"
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2])
                                               for n in ("x", "x2")],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 2])],
                                  [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"),
                                   numpy_helper.from_array(np.array(30.0, np.float32), "c")])
        return helper.make_model(graph)

    assert head_matmul(model(False)) == head_matmul(model(True)) == "head"
    assert head_matmul(model(True, two=True)) is None
