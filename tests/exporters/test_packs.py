"""Weight-only quantizing at bounded memory: float weights read lazily from external data, GPTQ streamed over
groups of Hessians, one packed store for the writer and the search's switch (exporters/quantization/packs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import LlamaConfig

from exporters.builder import build_graph
from exporters.calibration import CalibrationPlan, cpu_session
from exporters.graph import TABLE_MAP_SUFFIX, rescale, rescaling_external
from exporters.onnx_io import ExternalRewriter, load_lazily, save_model, tensor_array
from exporters.quantization.embedding import SHARE_ERROR_RATIO, SHARED_TABLE_KEY, untie_embeddings
from exporters.quantization.evaluate import log_probs, session_log_probs
from exporters.quantization.nbits import NBitsConfig
from exporters.quantization.packs import PackedWeights, streamed_gptq
from exporters.quantization.passes import BlockwiseGptqConfig, Quantizing, RotateWeightsConfig, WriteNBitsConfig, \
    run_blockwise_gptq, run_rotate_weights, run_write_nbits, targets
from exporters.quantize import QuantConfig, matmul_only_weights, quantize
from models.errors import UserError
from models.weights import open_weights
from runtimes.contract import read_contract
from tests.exporters.test_builder import TINY, save
from tests.models.test_hf import tiny_hf

PLAN = CalibrationPlan(4, 24, 2)
CONFIG = dict(num_prefill=4, seq_len=24, num_decode_steps=2, max_ppl_increase=1e9, judge_like_check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny Llama as `pipeline export` builds it: weights in model.onnx.data, lm_head untied."""
    root = tmp_path_factory.mktemp("packs")
    path = root / "built" / "model.onnx"
    path.parent.mkdir()
    build_graph(open_weights(save(tiny_hf(LlamaConfig(**TINY)), root / "ckpt")), path)
    return path


@pytest.fixture(scope="module")
def ids() -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(0)
    return ([rng.integers(0, TINY["vocab_size"], 120).tolist()],
            [rng.integers(0, TINY["vocab_size"], 40).tolist() for _ in range(2)])


def test_load_lazily_leaves_only_the_matmul_weights_on_disk(built):
    model = load_lazily(built, matmul_only_weights)
    on_disk = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in on_disk}
    assert on_disk and on_disk == weights == matmul_only_weights(model)
    assert "model.lm_head.weight" in on_disk  # untied: read by its MatMul alone
    in_memory = sum(t.ByteSize() for t in model.graph.initializer if t.name not in on_disk)
    table = 4 * TINY["vocab_size"] * TINY["hidden_size"]  # the embedding's, read by a Gather: in memory
    assert table < in_memory < table + (64 << 10) < built.with_name("model.onnx.data").stat().st_size / 4


def test_streamed_gptq_in_many_passes_packs_what_one_pass_packs(built, ids, tmp_path):
    model = load_lazily(built, matmul_only_weights)
    names = targets(model, ())
    widths = {n: (4, 8) for n in names}
    stores = []
    for budget in (1 << 30, 1):  # everything at once, then one input's Hessian per calibration pass
        store = PackedWeights(model, built.parent, 32, keep=True)
        done = streamed_gptq(model, built.parent, widths, ids[0], PLAN, store, tmp_path, budget)
        stores.append((store, done))
    (one, one_done), (many, many_done) = stores
    # per layer: qkv, o_proj, gate_up and down_proj read 4 distinct inputs (q/k/v share theirs), lm_head its own
    assert (one_done.passes, many_done.passes) == (1, 4 * TINY["num_hidden_layers"] + 1)
    assert one_done.tokens == 120 // PLAN.window_len * PLAN.window_len and one_done.nearest == []
    for name in names:
        for bits in (4, 8):
            a, b = one(name, bits), many(name, bits)
            assert np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales)
    assert not list(built.parent.glob(".probe-*"))  # the probe beside the weights is gone once its session opened


@pytest.fixture(scope="module")
def built_tied(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packs_tied")
    path = root / "built" / "model.onnx"
    path.parent.mkdir()
    build_graph(open_weights(save(tiny_hf(LlamaConfig(**TINY, tie_word_embeddings=True)), root / "ckpt")), path)
    return path


@pytest.mark.parametrize("tied,zero_points", [(False, False), (True, False), (False, True)],
                         ids=["untied", "tied-shared-table", "untied-zero-points"])
def test_the_switch_evaluates_exactly_the_model_the_writer_writes(built, built_tied, ids, tied, zero_points, tmp_path):
    """Any mix of 4- and 8-bit MatMuls on the If-gated switch gives the log-probabilities of that mix written,
    the embedding included (a tied table gathers the 8-bit head's blocks in both); with zero points, the 4-bit
    MatMuls read theirs and the 8-bit ones have none."""
    source = built_tied if tied else built
    model = load_lazily(source, matmul_only_weights)
    untie_embeddings(model)
    q = Quantizing(model, source, tmp_path / "out.onnx", tmp_path, ids[0], ids[1], (), weights_dir=source.parent)
    q.targets = targets(model, ())
    q = run_blockwise_gptq(q, BlockwiseGptqConfig(PLAN, 32, 4, 8, search=True, zero_points=zero_points))
    q = run_write_nbits(q, WriteNBitsConfig(4, NBitsConfig(32, 4, zero_points=zero_points), 8, 32 if tied else None,
                                            keep_float=True))
    assert q.details["tied_table_shared"] is tied
    switch = q.switch()
    gated = list(switch.gates)
    assert "/model/lm_head/MatMul" not in gated and len(gated) == 4 * TINY["num_hidden_layers"]
    seq = np.asarray(ids[1][0], np.int64)
    for at_4 in (set(gated), set(gated[::2]), set()):
        q.write([n for n in gated if n not in at_4])
        written = cpu_session(q.staged)
        expected = log_probs(written, read_contract(onnx.load(str(q.staged), load_external_data=False)), seq)
        np.testing.assert_array_equal(switch.log_probs(seq, at_4), expected)
        kinds = [n for n in onnx.load(str(q.staged)).graph.node if n.op_type == "MatMulNBits"]
        four = [n for n in kinds for a in n.attribute if a.name == "bits" and a.i == 4]
        assert len(four) == len(at_4)
        assert all(len(n.input) == (4 if zero_points and n in four else 3) for n in kinds)  # 8-bit: symmetric


def test_quantizing_from_external_data_writes_what_an_inline_model_gives(built, ids, tmp_path):
    inline = tmp_path / "inline" / "model.onnx"
    inline.parent.mkdir()
    save_model(onnx.load(str(built)), inline, external=False)
    outs = []
    for source in (built, inline):
        out = tmp_path / f"{source.parent.name}-w4.onnx"
        report = quantize(source, out, ids[0], QuantConfig(recipe="w4", w4_max_ppl_increase=0.001, **CONFIG), ids[1])
        outs.append((onnx.load(str(out)), report))
    (lazy, r1), (whole, r2) = outs
    assert r1["fallback_matmuls"] == r2["fallback_matmuls"] and r1["ppl"] == r2["ppl"]
    assert r1["gptq"]["hessian_passes"] == 1 and r1["weight_rounding"] == "gptq"
    assert {t.name: t.raw_data for t in lazy.graph.initializer} == {t.name: t.raw_data for t in whole.graph.initializer}


def test_a_truncated_data_file_is_one_clear_error_before_any_work(built, tmp_path):
    copy = tmp_path / "model.onnx"
    copy.write_bytes(built.read_bytes())
    data = built.with_name("model.onnx.data").read_bytes()
    for cut in (len(data) // 2, 4):
        copy.with_name("model.onnx.data").write_bytes(data[:-cut])
        with pytest.raises(UserError, match="corrupt or truncated"):
            load_lazily(copy, matmul_only_weights)


@pytest.fixture(scope="module")
def built_tied_final_norm_near_one(tmp_path_factory) -> Path:
    """The tied tiny Llama with its final norm weights near 1, as trained models have them (the test models'
    N(0, 0.3) ones put 1/g in the map: rows a rotation's map makes from the head's blocks come back coarse)."""
    root = tmp_path_factory.mktemp("packs_tied_norm")
    path = root / "built" / "model.onnx"
    path.parent.mkdir()
    hf = tiny_hf(LlamaConfig(**TINY, tie_word_embeddings=True))
    with torch.no_grad():
        noise = torch.randn(TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
        hf.model.norm.weight.copy_(1 + 0.1 * noise)
    build_graph(open_weights(save(hf, root / "ckpt")), path)
    return path


@pytest.mark.parametrize("norm_near_one", [True, False], ids=["shared", "own-table"])
def test_rotating_before_gptq_is_exact_in_float_and_keeps_the_tied_table_once(
        built_tied, built_tied_final_norm_near_one, ids, norm_near_one, tmp_path):
    """w4 --rotate: R1, R2 and the online Hadamard folded into the lazily loaded graph give the source's
    log-probabilities, the graph is lazy again afterwards (read from the rotated copy), and the written model's
    embedding reads the tied table from the head's 8-bit blocks through the map the rotation put between them,
    where those rows come within SHARE_ERROR_RATIO of the table's own blocks (not with the test models' random
    final norms: 1/g in the map)."""
    built_tied = built_tied_final_norm_near_one if norm_near_one else built_tied
    model = load_lazily(built_tied, matmul_only_weights)
    untie_embeddings(model)
    q = Quantizing(model, built_tied, tmp_path / "out.onnx", tmp_path, ids[0], ids[1], (),
                   weights_dir=built_tied.parent)
    q.targets = targets(model, ())
    q = run_rotate_weights(q, RotateWeightsConfig(online_block=32))
    assert q.details["rotation"]["residual"] and q.details["rotation"]["value_heads"] == TINY["num_hidden_layers"]
    assert len(q.details["online_hadamard"]["matmuls"]) == TINY["num_hidden_layers"]
    assert q.tie_map is not None and q.tie_map[2].shape == (TINY["hidden_size"],) * 2
    seq = np.asarray(ids[1][0], np.int64)
    rotated = q.weights_dir / "model.onnx"
    np.testing.assert_allclose(session_log_probs(rotated)[0](seq), session_log_probs(built_tied)[0](seq), atol=1e-4)
    lazy = matmul_only_weights(q.model)
    assert lazy and all(t.data_location == onnx.TensorProto.EXTERNAL for t in q.model.graph.initializer
                        if t.name in lazy)

    q = run_blockwise_gptq(q, BlockwiseGptqConfig(PLAN, 32, 4, 8, search=False))
    q = run_write_nbits(q, WriteNBitsConfig(4, NBitsConfig(32, 4), 8, 32, keep_float=False))
    written = onnx.load(str(q.staged))
    record = json.loads({p.key: p.value for p in written.metadata_props}[SHARED_TABLE_KEY])
    assert q.details["tied_table_shared"] is record["shared"] is norm_near_one
    assert (record["relative_error"] <= SHARE_ERROR_RATIO * record["own_blocks_relative_error"]) is norm_near_one
    vocab_sized = [t.name for t in written.graph.initializer if TINY["vocab_size"] in t.dims]
    # shared: the head's 8-bit blocks and their scales, no table of its own; else the table's blocks, scales and
    # zero points beside them
    assert len(vocab_sized) == (2 if norm_near_one else 5)
    maps = [n for n in written.graph.node if n.name.endswith(TABLE_MAP_SUFFIX)]
    assert [n.op_type for n in maps] == (["MatMul"] if norm_near_one else [])


def test_external_weights_are_rewritten_without_entering_the_graph(built, tmp_path):
    """Rescaling a lazily loaded weight streams it into a new data file (the graph keeps only where it lies);
    untouched weights are copied there too, so the saved model reads everything from its own directory."""
    model = load_lazily(built, matmul_only_weights)
    lazy = sorted(matmul_only_weights(model))
    changed, kept = lazy[0], lazy[1]
    inits = {t.name: t for t in model.graph.initializer}
    before = {n: tensor_array(inits[n], built.parent) for n in (changed, kept)}
    out = tmp_path / "rewritten" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(ValueError, match="external data"):
        rescale(inits[changed], lambda w: -w)  # outside rescaling_external: refused, not read into the graph
    with rescaling_external(ExternalRewriter(built.parent, out)) as rewriter:
        rescale(inits[changed], lambda w: 2 * w + 1)
        rescale(inits[changed], lambda w: w - 1)  # twice: read back from the new file
        rewriter.finish(model)
    assert all(not inits[n].raw_data and inits[n].data_location == onnx.TensorProto.EXTERNAL for n in lazy)
    save_model(model, out, external=True)
    again = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    np.testing.assert_allclose(numpy_helper.to_array(again[changed]), 2 * before[changed], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(numpy_helper.to_array(again[kept]), before[kept])
    stubs = {t.name: {e.key: e.value for e in t.external_data}
             for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    assert {stubs[n]["location"] for n in lazy} == {"model.onnx.data"}
