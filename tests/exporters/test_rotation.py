"""Rotations folded into the weights: exact in float (through the KV cache too), outliers spread, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from exporters.calibration import CalibrationPlan, KVCacheCalibrationReader, cpu_session, declared, empty_past, \
    session_contract, step_feed
from exporters.export import export_onnx
from exporters.optimize import optimize
from exporters.rotation import NORMS, hadamard, hadamard_order, online_hadamard, random_rotation, rotate
from exporters.graph import weight_matmuls
from exporters.smoothing import collect_activation_stats, find_smooth_groups
from runtimes.contract import present_value
from tests.exporters.test_quantize import VOCAB, outlier_decoder


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rotation")
    torch.manual_seed(1)
    export_onnx(outlier_decoder(), root / "plain.onnx")
    optimize(root / "plain.onnx", root / "fused.onnx")
    return {"plain": root / "plain.onnx", "fused": root / "fused.onnx"}


def generate_logits(path: Path, ids: np.ndarray, steps: int) -> np.ndarray:
    """Prefill `ids`, then `steps` greedy decode steps feeding back the model's own KV cache: logits of each."""
    session = cpu_session(path)
    contract = session_contract(session)
    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past, pos, feed_ids, out = empty_past(contract), 0, ids, []
    for _ in range(steps + 1):
        result = dict(zip(outputs, session.run(outputs, declared(step_feed(feed_ids, pos, past), names))))
        logits = result["logits"][0, -1]
        out.append(logits)
        pos += feed_ids.size
        past = {k.replace("present", "past_key_values"): v for k, v in result.items() if k.startswith("present")}
        feed_ids = np.array([int(logits.argmax())])
    return np.stack(out)


@pytest.mark.parametrize("n", [12, 64, 576, 768, 1536])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n))


def test_hadamard_order_is_decided_without_building_the_matrix():
    assert [n for n in range(200) if hadamard_order(n)] == [n for n in range(200) if hadamard(n) is not None]
    assert hadamard_order(2**70) and hadamard_order(12**20) and not hadamard_order(2**70 + 12)  # instant


def test_orders_without_hadamard_get_a_random_orthogonal_matrix():
    assert hadamard(20) is None and hadamard(0) is None
    q = random_rotation(20, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(20), atol=1e-10)
    assert not np.allclose(q, random_rotation(20, seed=4))


def test_rotation_is_exact_through_the_kv_cache(graphs, tmp_path):
    model = onnx.load(str(graphs["fused"]))
    report = rotate(model)
    assert report.residual and report.value_heads == 2 and report.not_rotated is None
    norm_weights = [numpy_helper.to_array(t) for n in model.graph.node if n.op_type in NORMS
                    for t in model.graph.initializer if t.name == n.input[NORMS[n.op_type]]]
    assert len(norm_weights) == 5 and all(np.array_equal(w, np.ones_like(w)) for w in norm_weights)
    onnx.save(model, tmp_path / "rotated.onnx")
    ids = np.random.default_rng(2).integers(0, VOCAB, 12)
    expected = generate_logits(graphs["fused"], ids, steps=4)
    np.testing.assert_allclose(generate_logits(tmp_path / "rotated.onnx", ids, steps=4), expected, atol=2e-4)
    # the value cache is held rotated: the model's own cache differs from the unrotated one, its logits do not
    session, original = cpu_session(tmp_path / "rotated.onnx"), cpu_session(graphs["fused"])
    feed = step_feed(ids, 0, empty_past(session_contract(session)))
    values = [s.run([present_value(0)], declared(feed, {i.name for i in s.get_inputs()}))[0]
              for s in (session, original)]
    assert np.abs(values[0] - values[1]).max() > 1e-2


def test_rotation_spreads_outlier_channels_of_the_norm_outputs(graphs, tmp_path):
    """The outlier decoder's norms weight four channels by 20: per channel, the norm outputs' max over tokens
    has those channels far above the median. Rotated, every channel carries about the same."""
    ids = [np.random.default_rng(0).integers(0, VOCAB, 200).tolist()]
    model = onnx.load(str(graphs["fused"]))
    norm_outputs = [n.output[0] for n in model.graph.node if n.op_type in NORMS]

    def peak_over_median(m: onnx.ModelProto, path: Path) -> float:
        reader = KVCacheCalibrationReader(path, ids, CalibrationPlan(1, 64, 1))
        stats = collect_activation_stats(m, norm_outputs, reader.feeds())
        return max(float(st.abs_max.max() / np.median(st.abs_max)) for st in stats.values())

    before = peak_over_median(model, graphs["fused"])
    rotate(model)
    onnx.save(model, tmp_path / "rotated.onnx")
    after = peak_over_median(model, tmp_path / "rotated.onnx")
    assert before > 8 and after < 0.25 * before


def test_graphs_that_do_not_commute_are_left_alone_with_the_reason(graphs):
    model = onnx.load(str(graphs["plain"]))
    before = model.SerializeToString()
    report = rotate(model)
    assert not report.residual and "fused graph" in report.not_rotated
    assert report.value_heads == 0 and model.SerializeToString() == before


@pytest.mark.parametrize("graph", ["plain", "fused"])
def test_online_hadamard_is_exact_and_adds_three_ops_per_matmul(graphs, graph, tmp_path):
    """Before each down_proj: reshape into 128-wide blocks, one shared (1, 128, 128) float matrix, flatten; the
    down_proj weight absorbs the inverse, so prefill and KV-cache decode logits do not move."""
    model = onnx.load(str(graphs[graph]))
    gated = [m for g in find_smooth_groups(model) if g.first_column is not None for m in g.matmuls]
    ops = len(model.graph.node)
    report = online_hadamard(model, gated, block=128)
    assert report == {"block": 128, "matmuls": gated, "skipped": {}} and len(gated) == 2
    assert len(model.graph.node) == ops + 3 * len(gated)
    matrices = [t for t in model.graph.initializer if t.name.startswith("online_hadamard.128")
                and t.data_type == onnx.TensorProto.FLOAT]
    assert len(matrices) == 1 and tuple(matrices[0].dims) == (1, 128, 128)
    h = numpy_helper.to_array(matrices[0])[0]
    np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-5)
    assert not any(n.input[1] == matrices[0].name for n in weight_matmuls(model))  # not a projection to quantize
    onnx.save(model, tmp_path / "online.onnx")
    ids = np.random.default_rng(2).integers(0, VOCAB, 12)
    np.testing.assert_allclose(generate_logits(tmp_path / "online.onnx", ids, steps=3),
                               generate_logits(graphs[graph], ids, steps=3), atol=2e-4)


def test_online_hadamard_skips_widths_it_cannot_block(graphs):
    model = onnx.load(str(graphs["fused"]))
    gated = [m for g in find_smooth_groups(model) if g.first_column is not None for m in g.matmuls]
    report = online_hadamard(model, gated, block=512)  # the tiny model's MLP is 256 wide
    assert report["matmuls"] == [] and set(report["skipped"]) == set(gated)
    assert all("not a multiple of 512" in why for why in report["skipped"].values())
    with pytest.raises(ValueError, match="no Hadamard matrix of order 100"):
        online_hadamard(model, gated, block=100)


def test_qwen3_rotates_around_its_head_norms_and_gemma_is_refused(tmp_path):
    """Qwen3's q/k norms act on each head of a projection's output, after the MatMuls that read the stream: R1
    rotates the stream around them exactly. Gemma's norms on the attention and MLP outputs sit on the stream's
    writers, where an elementwise weight does not commute with a rotation: left alone, with the reason."""
    from exporters.builder import build_graph
    from models.weights import open_weights
    from tests.exporters.test_builder import NEW_FAMILIES, save
    from tests.models.test_hf import tiny_hf

    for family in ("qwen3", "gemma3_text"):
        built = tmp_path / f"{family}.onnx"
        build_graph(open_weights(save(tiny_hf(NEW_FAMILIES[family]()), tmp_path / family)), built)
        model = onnx.load(str(built))
        report = rotate(model)
        if family == "gemma3_text":
            assert not report.residual and "attn_out_norm" in report.not_rotated
            continue
        assert report.residual and report.not_rotated is None
        onnx.save(model, tmp_path / "rotated.onnx")
        ids = np.random.default_rng(2).integers(0, 160, 12)
        np.testing.assert_allclose(generate_logits(tmp_path / "rotated.onnx", ids, steps=4),
                                   generate_logits(built, ids, steps=4), atol=2e-4)
