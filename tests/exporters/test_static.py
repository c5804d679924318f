"""w8a8's own static int8 writer against onnxruntime's quantize_static: the same graph, initializer for
initializer, from ranges gathered through one probe session; and weights read from external data one at a time."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from exporters.calibration import CalibrationPlan, KVCacheCalibrationReader
from exporters.export import export_onnx
from exporters.graph import GraphIndex
from exporters.onnx_io import copy_of, files_size, load_lazily, save_model
from exporters.optimize import optimize
from exporters.quantization import passes
from exporters.quantization.nbits import pack
from exporters.quantization.packs import PackedWeights, rounded_pack
from exporters.quantization.qdq import QdqConfig, QdqJob, quantize_qdq, restore_float_readers, with_value_info
from exporters.quantization.scales import stored_scales
from exporters.quantization.static import StaticWriter, activation_ranges, nearest_weight, weight_levels, \
    write_static
from exporters.quantize import QuantConfig, matmul_only_weights, quantize
from tests.exporters.test_quantize import outlier_decoder

PLAN = CalibrationPlan(num_prefill=4, seq_len=16, num_decode_steps=2)


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("static")
    torch.manual_seed(1)
    export_onnx(outlier_decoder(), root / "plain.onnx")
    optimize(root / "plain.onnx", root / "fused.onnx")
    return root / "fused.onnx"


def calib_ids() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, 256, 80)) for _ in range(3)]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_set(model: onnx.ModelProto) -> set:
    return {(n.op_type, n.name, tuple(n.input), tuple(n.output),
             tuple(sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute))) for n in model.graph.node}


@pytest.mark.parametrize("method, per_channel, reduce_range", [
    ("percentile", True, True), ("minmax", True, False), ("entropy", False, True)])
def test_the_written_graph_is_quantize_statics(fused, tmp_path, method, per_channel, reduce_range):
    """All weight MatMuls but the head: quantize_static's output (its float readers given back their float
    activation) and ours hold the same nodes and the same initializers: the weights' to the bit, the
    activations' scales and zero points to float rounding (the probe session does not prepack its weights, so
    its sums run in another order than the calibrator's session's; its feeds' past comes from its own presents,
    where quantize_static's reader ran the model itself)."""
    model = onnx.load(str(fused))
    targets = [n.name for n in GraphIndex(model).weight_matmuls()][:-1]
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(with_value_info(model), str(fp32))
    config = QdqConfig(method, per_channel, reduce_range, False, "w8", 32, 4)
    reader = KVCacheCalibrationReader(fused, calib_ids(), PLAN)
    quantize_qdq(QdqJob(fp32, tmp_path / "cache.json", reader, config), targets, tmp_path / "ort.onnx")
    theirs = onnx.load(str(tmp_path / "ort.onnx"))
    restore_float_readers(theirs, set(targets))

    activations = sorted({GraphIndex(model).nodes[t].input[0] for t in targets})
    ranges = activation_ranges(model, activations, KVCacheCalibrationReader(fused, calib_ids(), PLAN).through,
                               method, tmp_path)
    ours = write_static(model, targets, ranges, per_channel, reduce_range)

    mine, ort_ = initializers(ours), initializers(theirs)
    assert set(mine) == set(ort_)
    activation_params = {f"{a}_{p}" for a in activations for p in ("scale", "zero_point")}
    assert activation_params <= set(mine)
    for name, value in mine.items():
        assert value.dtype == ort_[name].dtype and value.shape == ort_[name].shape, name
        if name.endswith("_scale") and name in activation_params:
            np.testing.assert_allclose(value, ort_[name], rtol=1e-5, err_msg=name)
        elif name in activation_params:
            assert abs(int(value) - int(ort_[name])) <= 1, name
        else:
            np.testing.assert_array_equal(value, ort_[name], err_msg=name)
    assert node_set(ours) == node_set(theirs)
    assert len(initializers(model)) == len(initializers(onnx.load(str(fused))))  # the float graph is untouched


def test_w8a8_per_tensor_needs_nearest_rounding_and_writes_one_scale_per_weight(fused, tmp_path):
    """GPTQ's codes sit on per-channel scales: asked for per-tensor ones, the config refuses with one line;
    with nearest rounding every weight's DequantizeLinear has one scale and no axis."""
    from models.errors import UserError

    with pytest.raises(UserError, match="--per-tensor needs --weight-rounding nearest"):
        QuantConfig(recipe="w8a8", per_channel=False)
    config = QuantConfig(recipe="w8a8", per_channel=False, weight_rounding="nearest", num_prefill=4, seq_len=16,
                         num_decode_steps=2)
    quantize(fused, tmp_path / "t.onnx", calib_ids(), config)
    model = onnx.load(str(tmp_path / "t.onnx"))
    inits = initializers(model)
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert len(dqs) >= 8
    for dq in dqs:
        assert inits[dq.input[1]].size == 1 and not any(a.name == "axis" for a in dq.attribute)


def test_nearest_weight_is_onnxruntimes_quantize_data_per_column():
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 48)) * np.logspace(-3, 2, 48)).astype(np.float32)
    w[:, 5] = 0.0  # an all-zero column: scale 1, codes 0
    w[:, 6] = np.abs(w[:, 6])  # one sign only: the range still holds 0
    for reduce_range in (False, True):
        q, scale = nearest_weight(w, weight_levels(reduce_range), per_channel=True)
        for c in range(w.shape[1]):
            zero, s, codes = quantize_data(w[:, c], TensorProto.INT8, True, reduce_range)
            assert zero == 0 and np.float32(s) == scale[c], c
            np.testing.assert_array_equal(q[:, c], codes, err_msg=str(c))


def test_weights_left_in_external_data_are_read_one_at_a_time(fused, tmp_path):
    """A lazily loaded graph (the float weights only MatMuls read still in model.onnx.data) writes the same model
    as the graph in memory, and its float weights never enter the proto it was given."""
    model = onnx.load(str(fused))
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    save_model(copy_of(model), external, external=True)  # (onnx moves a saved model's weights out of it)
    lazy = load_lazily(external, matmul_only_weights)
    left = [t.name for t in lazy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(left) >= 8
    targets = [n.name for n in GraphIndex(model).weight_matmuls()]
    activations = sorted({GraphIndex(model).nodes[t].input[0] for t in targets})
    ranges = activation_ranges(lazy, activations, KVCacheCalibrationReader(fused, calib_ids(), PLAN).through,
                               "minmax", tmp_path, external.parent)
    in_memory = write_static(model, targets, ranges, True, True)
    streamed = write_static(lazy, targets, ranges, True, True, weights_dir=external.parent)
    a, b = initializers(in_memory), initializers(streamed)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer if t.name in left)
    assert not list(external.parent.glob(".probe-*"))  # the probe's model beside the weights is gone


def test_w8a8_of_a_graph_in_external_data_streams_its_float_passes_and_writes_the_same_model(fused, tmp_path):
    """The float passes (rotation, smoothing with its channel split, online Hadamard) and GPTQ on a graph loaded
    lazily rewrite its weights through files in the work directory instead of in memory: the quantized model is
    the one the in-memory graph gives, to float rounding of the rewritten weights."""
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    save_model(onnx.load(str(fused)), external, external=True)
    config = QuantConfig(recipe="w8a8", num_prefill=4, seq_len=16, num_decode_steps=2, outlier_channels=4)
    a = quantize(fused, tmp_path / "a.onnx", calib_ids(), config)
    b = quantize(external, tmp_path / "b.onnx", calib_ids(), config)
    assert a["smoothing"] == b["smoothing"] and a["rotation"] == b["rotation"]
    assert a["added_float_matmuls"] == b["added_float_matmuls"]
    ma, mb = initializers(onnx.load(str(tmp_path / "a.onnx"))), initializers(onnx.load(str(tmp_path / "b.onnx")))
    assert set(ma) == set(mb)
    codes = [n for n in ma if n.endswith("_quantized")]
    assert len(codes) >= 8
    for name in ma:
        if ma[name].dtype == np.int8:  # codes: a rewritten weight may round across a level in a few places
            assert np.mean(ma[name] != mb[name]) < 1e-3 and np.abs(ma[name].astype(int) - mb[name]).max() <= 1, name
        else:
            np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert abs(files_size(tmp_path / "a.onnx") - files_size(tmp_path / "b.onnx")) < 64  # (protobuf's varints)


def test_w8a8_gptq_gathers_its_hessians_in_bounded_groups_and_rounds_the_same(fused, tmp_path, monkeypatch):
    """GPTQ's input Hessians gathered one activation per calibration pass (a budget of one byte) give the model
    that one pass gives, to the bit, and the report says how many passes it took; the search's w8 fallback is
    written from GPTQ's blocks."""
    config = QuantConfig(recipe="w8a8", num_prefill=16, seq_len=16, num_decode_steps=2)  # 288 tokens: K <= 256
    ids = [np.random.default_rng(1).integers(0, 256, 400).tolist()]
    one = quantize(fused, tmp_path / "one.onnx", ids, config)
    monkeypatch.setattr(passes, "GptqConfig", functools.partial(passes.GptqConfig, hessian_budget=1))
    many = quantize(fused, tmp_path / "many.onnx", ids, config)
    assert one["gptq"]["hessian_passes"] == 1 and not one["gptq"]["nearest_too_few_tokens"]
    distinct = len({n.input[0] for n in GraphIndex(onnx.load(str(fused))).weight_matmuls()})
    assert many["gptq"]["hessian_passes"] == distinct >= 5
    a, b = initializers(onnx.load(str(tmp_path / "one.onnx"))), initializers(onnx.load(str(tmp_path / "many.onnx")))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_w8_fallback_is_written_from_gptqs_blocks(fused, tmp_path):
    """A MatMul the search takes out is written as an 8-bit MatMulNBits holding GPTQ's blockwise rounding, which
    differs from the float weight's nearest blocks."""
    model = onnx.load(str(fused))
    g = GraphIndex(model)
    targets = [n.name for n in g.weight_matmuls()]
    out_name = targets[3]  # a down_proj, rounded with a Hessian of its own making
    w = numpy_helper.to_array(g.inits[g.nodes[out_name].input[1]])
    reader = KVCacheCalibrationReader(fused, calib_ids(), PLAN)
    activations = sorted({g.nodes[t].input[0] for t in targets})
    ranges = activation_ranges(model, activations, reader.through, "minmax", tmp_path)
    store = PackedWeights(model, Path(), 32, keep=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4 * w.shape[0], w.shape[0])) * np.linspace(0.1, 3, w.shape[0])
    store.put(out_name, 8, rounded_pack(w, x.T @ x, 8, store))
    config = QdqConfig("minmax", True, True, False, "w8", 32, 4)
    writer = StaticWriter(model, ranges, config, packs=store)
    writer.write([t for t in targets if t != out_name], [out_name], tmp_path / "mix.onnx")
    mix = onnx.load(str(tmp_path / "mix.onnx"))
    node = next(n for n in mix.graph.node if n.name == f"{out_name}_Q8")
    codes = numpy_helper.to_array(next(t for t in mix.graph.initializer if t.name == node.input[1]))
    np.testing.assert_array_equal(codes, store(out_name, 8).packed)
    assert not np.array_equal(codes, pack(w, 8, 32).packed)
    assert stored_scales(GraphIndex(mix), node.input[2]).shape == store(out_name, 8).scales.shape


def test_the_w8_fallbacks_float_weights_are_never_read_into_memory(fused, tmp_path, monkeypatch):
    """Every MatMul taken out to the w8 fallback (the search's last mixes on a 1B model): the float weights of a
    lazily loaded graph stay in external data (write_static leaves them referenced, write_nbits drops them),
    and the model written is the one the graph in memory gives, initializer for initializer."""
    from exporters.quantization import static

    model = onnx.load(str(fused))
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    save_model(copy_of(model), external, external=True)
    lazy = load_lazily(external, matmul_only_weights)
    targets = [n.name for n in GraphIndex(model).weight_matmuls()]
    weights = {GraphIndex(lazy).nodes[t].input[1] for t in targets}
    assert {t.name for t in lazy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} & weights
    config = QdqConfig("minmax", True, True, False, "w8", 32, 4)
    read = []
    real = static.materialized
    monkeypatch.setattr(static, "materialized", lambda t, d="": read.append(t.name) or real(t, d))
    StaticWriter(lazy, {}, config, packs=PackedWeights(lazy, external.parent, 32, keep=False),
                 weights_dir=external.parent).write([], targets, tmp_path / "lazy.onnx")
    assert read and not set(read) & weights
    StaticWriter(model, {}, config, packs=PackedWeights(model, Path(), 32, keep=False)).write(
        [], targets, tmp_path / "memory.onnx")
    a, b = initializers(onnx.load(str(tmp_path / "lazy.onnx"))), initializers(onnx.load(str(tmp_path / "memory.onnx")))
    assert set(a) == set(b) and not set(a) & weights
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_search_runs_on_a_graph_left_in_external_data_as_on_one_in_memory(fused, tmp_path):
    """With a budget no mix meets, the search takes MatMuls out to the w8 fallback one at a time: its switch
    session reads the lazily loaded graph's weights beside their data file, and it takes out what the search on
    the graph in memory takes out, with the same perplexities."""
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    save_model(onnx.load(str(fused)), external, external=True)
    g = torch.Generator().manual_seed(0)
    valid = outlier_decoder().generate(torch.randint(0, 256, (4, 1), generator=g), 63, temperature=1.0,
                                       generator=g).tolist()
    config = QuantConfig(recipe="w8a8", num_prefill=4, seq_len=16, num_decode_steps=2, max_ppl_increase=1e-4,
                         judge_like_check=False)
    a = quantize(fused, tmp_path / "a.onnx", calib_ids(), config, valid)
    b = quantize(external, tmp_path / "b.onnx", calib_ids(), config, valid)
    assert a["fallback_matmuls"] and a["fallback_matmuls"] == b["fallback_matmuls"]
    assert a["ppl"]["quantized"] == pytest.approx(b["ppl"]["quantized"], rel=1e-6)
    assert not list(external.parent.glob(".switch-*"))  # the switch's model beside the weights is gone


def test_the_switch_computes_the_float_graph_and_the_written_mixes(fused, tmp_path):
    """The search's switch: every gate off is the float graph; any set of gates on is the model the writer
    writes with those MatMuls int8 and the rest float, to float rounding (onnxruntime fuses each `If` branch's
    Q/DQ into the written model's int8 kernel; the `Where` gates it replaced computed the int8 MatMuls in float,
    0.12 apart in log-probability with every gate on)."""
    from exporters.quantization.evaluate import kl_sum, session_log_probs
    from exporters.quantization.switch import QuantSwitch

    model = onnx.load(str(fused))
    targets = [n.name for n in GraphIndex(model).weight_matmuls()]
    activations = sorted({GraphIndex(model).nodes[t].input[0] for t in targets})
    ranges = activation_ranges(model, activations, KVCacheCalibrationReader(fused, calib_ids(), PLAN).through,
                               "minmax", tmp_path)
    switch = QuantSwitch(copy_of(model), write_static(model, targets, ranges, True, False), targets, tmp_path)
    assert "If" in {n.op_type for n in onnx.load(str(tmp_path / "switch.onnx")).graph.node}
    ids = np.asarray(calib_ids()[0], np.int64)
    ref = session_log_probs(fused)[0](ids)
    np.testing.assert_allclose(switch.log_probs(ids, ()), ref, atol=1e-5)
    for i, mix in enumerate([targets, targets[::2], targets[1:3]]):
        save_model(write_static(model, mix, ranges, True, False), tmp_path / f"mix{i}.onnx", external=False)
        written = session_log_probs(tmp_path / f"mix{i}.onnx")[0](ids)
        assert kl_sum(ref, written) > 1e-4 * len(ids)  # the int8 MatMuls move the logits
        np.testing.assert_allclose(switch.log_probs(ids, set(mix)), written, atol=1e-5)
