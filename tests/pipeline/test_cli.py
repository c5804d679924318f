"""Every stage through the CLI on tiny random-init models, and every bad-input path: one line, non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.manifest import RunDir, sha256
from runtimes.bench import model_bytes
from runtimes.contract import past_names, present_names
from runtimes.generate import Generator, greedy_tokens
from runtimes.session import open_session
from tests.pipeline.conftest import make_hf_checkpoint
from tests.pipeline.faults import run_state


def invoke(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir, text_file) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    invoke("export", "--model", llama_dir, "--graph", "traced", "--out", out)
    invoke("optimize", out)
    return out


def test_export_writes_one_kv_graph_that_matches_pytorch(run_dir):
    model = onnx.load(str(run_dir / "variants/fp32/model.onnx"))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == past_names(2)
    assert outputs == ["logits"] + present_names(2)
    dims = [d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"
    parity = RunDir(run_dir).results("export")["parity_max_abs_diff"]
    assert set(parity) == {"prefill", "decode"} and max(parity.values()) < 1e-4


def nodes_fed_by_inputs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes whose value depends on a graph input (the graph's nodes are in topological order)."""
    live = {i.name for i in model.graph.input}
    fed = []
    for node in model.graph.node:
        if live & set(node.input):
            fed.append(node)
            live.update(node.output)
    return fed


def test_optimize_fuses_one_attention_per_layer(run_dir):
    model = onnx.load(str(run_dir / "variants/fused/model.onnx"))
    counts = Counter(n.op_type for n in model.graph.node)
    assert counts["GroupQueryAttention"] == 2
    assert counts["SkipSimplifiedLayerNormalization"] + counts["SimplifiedLayerNormalization"] == 5
    # attention and rotary live inside GQA now: the one Cos/Sin pair builds GQA's cos/sin caches from constants
    # (folded at session creation), nothing trigonometric depends on the inputs
    assert counts["Softmax"] == 0 and counts["Sin"] == counts["Cos"] == 1
    fed_ops = {n.op_type for n in nodes_fed_by_inputs(model)}
    assert "GroupQueryAttention" in fed_ops and not {"Sin", "Cos"} & fed_ops
    # q/k/v packed into one MatMul per layer, gate/up into another: 2 layers x (qkv, o, gate_up, down) + lm_head
    assert counts["MatMul"] == 2 * 4 + 1 and counts["Split"] == 2
    res = RunDir(run_dir).results("optimize")
    assert res["fused_ops"]["GroupQueryAttention"] == 2 and res["packed_layers"] == {"qkv": 2, "gate_up": 2}
    assert max(res["parity_max_abs_logit_diff"].values()) < 1e-3


def test_check_fp32_and_fused_pass_tight_thresholds(run_dir, text_file):
    r = invoke("check", run_dir, "--variant", "fp32", "--variant", "fused", "--text", text_file, "--json",
               "--steps", "8", "--window", "64")
    res = json.loads(r.output)
    assert res["passed"]
    for row in res["variants"]:
        assert row["max_abs_diff"] < 1e-3 and row["top1"] == 1.0 and row["greedy"] == row["greedy_ref"]
        assert abs(row["ppl"] - row["ppl_ref"]) / row["ppl_ref"] < 1e-4


def manifest_results(run_dir, stage: str) -> dict:
    """The results of the latest `stage` entry in the run's manifest."""
    entries = [s for s in json.loads((run_dir / "manifest.json").read_text())["stages"] if s["stage"] == stage]
    return entries[-1]["results"]


@pytest.mark.parametrize("recipe,extra", [("w8a8", ()), ("static", ()), ("w8", ()), ("w4", ()),
                                          ("w4", ("--zero-points",)), ("w4", ("--no-rotate",))],
                         ids=["w8a8", "static", "w8", "w4", "w4-zero-points", "w4-not-rotated"])
def test_quantize_recipes_shrink_and_are_checked(run_dir, text_file, recipe, extra):
    invoke("quantize", run_dir, "--recipe", recipe, "--calib-text", text_file, "--calib-windows", "4",
           "--window", "32", "--max-ppl-increase", "1.0", *extra)
    path = run_dir / "variants" / recipe / "model.onnx"
    nodes = onnx.load(str(path)).graph.node
    ops = Counter(n.op_type for n in nodes)
    if recipe in ("w8", "w4"):
        assert ops["MatMulNBits"] > 0
        four = [n for n in nodes for a in n.attribute if n.op_type == "MatMulNBits" and a.name == "bits" and a.i == 4]
        zero_points = "--zero-points" in extra
        assert four and all(len(n.input) == (4 if zero_points else 3) for n in four) if recipe == "w4" else not four
    else:
        assert ops["DequantizeLinear"] > 0
    r = invoke("check", run_dir, "--variant", recipe, "--text", text_file, "--json", "--steps", "4",
               "--window", "64", ok=False)
    row = json.loads(r.output)["variants"][0]
    report = manifest_results(run_dir, "quantize")
    rotated = recipe == "w4" and "--no-rotate" not in extra
    if recipe in ("w8", "w4"):  # accuracy level 4: int8 arithmetic on activations quantized at run time
        # (rotated w4: but for the online Hadamard before each down_proj, in float and counted as such)
        assert row["int8_weight_flop_share"] == row["int8_compute_flop_share"] == \
            pytest.approx(report["quantized_flop_share"] + report["fallback_flop_share"])
        assert (report["quantized_flop_share"] + report["fallback_flop_share"] < 0.99) is rotated
        assert report["zero_points"] is ("--zero-points" in extra)
        assert report["rotation"]["residual"] if rotated else "rotation" not in report
        assert len(report["float_matmuls"]) == (2 if rotated else 0)  # one online Hadamard per layer
        assert row["int8_w8a8_flop_share"] == 0.0
    elif recipe == "static":  # budget 100%: nothing leaves static int8
        assert row["int8_w8a8_flop_share"] == row["int8_compute_flop_share"] == 1.0
        assert report["quantized_flop_share"] == 1.0 and not report["fallback_matmuls"]
    else:  # the same, but for the online Hadamard before each down_proj: float, and counted as such
        assert row["int8_w8a8_flop_share"] == row["int8_compute_flop_share"] \
            == pytest.approx(report["quantized_flop_share"])
        assert 0.5 < report["quantized_flop_share"] < 1.0 and not report["fallback_matmuls"]
        assert all(why.startswith(("online Hadamard", "multiplies two activations"))
                   for why in report["float_matmuls"].values())
    assert row["size_bytes"] < (run_dir / "variants/fused/model.onnx").stat().st_size
    assert 0 <= row["top1"] <= 1 and np.isfinite(row["ppl"])


def w8a8_variant(run_dir, text_file) -> Path:
    path = run_dir / "variants" / "w8a8" / "model.onnx"
    if not path.exists():
        invoke("quantize", run_dir, "--recipe", "w8a8", "--calib-text", text_file, "--calib-windows", "4",
               "--window", "32", "--max-ppl-increase", "1.0")
    return path


def test_optimize_native_int8_without_the_kernel_is_one_line_error(run_dir, text_file, monkeypatch):
    w8a8_variant(run_dir, text_file)
    monkeypatch.setenv("PIPELINE_KERNELS", str(run_dir / "not-built.so"))
    before = set((run_dir / "variants").iterdir())
    one_line_error(invoke("optimize", run_dir, "--native-int8", ok=False), "w8a8-native")
    assert set((run_dir / "variants").iterdir()) == before  # nothing written that was not checked


def test_optimize_native_int8_keeps_w8a8_logits_and_is_checked_and_benched(run_dir, text_file, native_kernels):
    w8a8_variant(run_dir, text_file)
    res = json.loads(invoke("optimize", run_dir, "--native-int8", "--no-fuse-mlp", "--no-native-attention",
                            "--json").output)
    path = run_dir / "variants" / "w8a8-native" / "model.onnx"
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert res["matmuls"] == ops["StaticInt8MatMul"] > 0 and ops["QuantizeLinear"] == 0
    assert res["gated_mlps"] == ops["GluRotate"] == 0 and "drift_from_float" not in res
    assert res["native_attention"] == ops["CacheAttention"] == 0 and ops["GroupQueryAttention"] > 0
    assert res["parity_max_abs_logit_diff"]["prefill+decode"] <= 1e-4
    r = invoke("check", run_dir, "--variant", "w8a8", "--variant", "w8a8-native", "--text", text_file, "--json",
               "--steps", "4", "--window", "64", ok=False)
    rows = {row["variant"]: row for row in json.loads(r.output)["variants"]}
    for key in ("top1", "kl", "ppl", "int8_w8a8_flop_share", "greedy_match"):
        assert rows["w8a8-native"][key] == pytest.approx(rows["w8a8"][key], rel=1e-4, abs=1e-6), key
    r = invoke("bench", run_dir, "--variant", "w8a8-native", "--json", "--prompt-len", "8", "--new-tokens", "4",
               "--repeats", "1", "--threads", "1")
    assert json.loads(r.output)["rows"]["w8a8-native"]["decode_ms_p50"] > 0
    bundle = run_dir.parent / "native-bundle"  # shipped only when asked for, and runs from the bundle
    invoke("package", run_dir, "--out", bundle, "--variant", "w8a8-native")
    ids = list(range(3, 11))
    assert greedy_tokens(open_session(bundle), ids, 6) == greedy_tokens(open_session(path.parent.parent / "w8a8"),
                                                                        ids, 6)


def test_optimize_native_int8_of_full_8bit_weights_where_they_saturate_is_judged_against_the_float_model(
        run_dir, text_file, native_kernels, monkeypatch, tmp_path):
    """Full 8-bit static weights (quantized for a VNNI CPU) on a CPU whose int8 GEMM saturates on them: optimize
    computes w8a8 in float as its reference, and since float rounding flips later layers' activation codes, keeps
    w8a8-native by its distance from the float model; the variant then runs and is checked there. Saturation is
    forced, so every CPU takes this path."""
    from runtimes import session as session_module

    run_dir = shutil.copytree(run_dir, tmp_path / "run")  # its w8a8 replaced: the module's run stays as it was
    invoke("quantize", run_dir, "--recipe", "w8a8", "--no-reduce-range", "--calib-text", text_file,
           "--calib-windows", "4", "--window", "32", "--max-ppl-increase", "1.0")
    monkeypatch.setattr(session_module, "int8_gemm_saturates", lambda: True)
    one_line_error(invoke("check", run_dir, "--variant", "w8a8", "--text", text_file, ok=False),
                   "full 8-bit int8 weights")
    res = json.loads(invoke("optimize", run_dir, "--native-int8", "--json").output)
    drift = res["drift_from_float"]
    assert drift["kept"] and drift["reference"] == "fused" and drift["target_kl"] <= 2 * drift["source_kl"] + 1e-3
    r = invoke("check", run_dir, "--variant", "w8a8-native", "--text", text_file, "--json", "--steps", "4",
               "--window", "64", ok=False)
    assert json.loads(r.output)["variants"][0]["top1"] > 0.5


def test_a_native_variant_whose_logits_differ_is_not_kept(run_dir, text_file, native_kernels, monkeypatch):
    from pipeline.stages import optimize as optimize_stage

    w8a8_variant(run_dir, text_file)
    monkeypatch.setattr(optimize_stage, "logit_parity", lambda source, target: 0.5)
    before = run_state(run_dir)  # an earlier, good w8a8-native may be there: it stays as it was
    one_line_error(invoke("optimize", run_dir, "--native-int8", "--no-fuse-mlp", "--no-native-attention",
                          ok=False), "differs from w8a8 by 0.5", "not kept")
    assert run_state(run_dir) == before


def test_native_int8_fuses_each_mlp_and_judges_the_variant_by_the_float_model(run_dir, text_file, native_kernels,
                                                                              monkeypatch):
    """By default every layer's silu(gate) * up and online rotation become one GluRotate (and with
    --native-attention its GroupQueryAttention CacheAttention); the rounding that moves is judged against the
    float model (kept within twice w8a8's mean KL, the distances recorded) and the variant checks as w8a8 does;
    past that bound it is refused with one line and the run stays as it was."""
    from pipeline.stages import optimize as optimize_stage

    w8a8_variant(run_dir, text_file)
    res = json.loads(invoke("optimize", run_dir, "--native-int8", "--native-attention", "--json").output)
    path = run_dir / "variants" / "w8a8-native" / "model.onnx"
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    layers = json.loads((run_dir / "config.json").read_text())["num_hidden_layers"]
    assert res["gated_mlps"] == ops["GluRotate"] == layers and ops["Sigmoid"] == ops["Split"] == 0
    assert res["native_attention"] == ops["CacheAttention"] == layers and ops["GroupQueryAttention"] == 0
    session, ids = open_session(path), np.arange(3, 40)  # the cache in place (chunks, steps) and copied: one answer
    in_place, copied = Generator(session, prefill_chunk=16), Generator(session, io_binding=False)
    np.testing.assert_allclose(in_place.prefill(ids, capacity=48), copied.prefill(ids), atol=1e-5)
    np.testing.assert_allclose(in_place.step(7), copied.step(7), atol=1e-5)
    drift = res["drift_from_float"]
    assert drift["kept"] and drift["reference"] == "fused" and drift["target_kl"] <= 2 * drift["source_kl"] + 1e-3
    r = invoke("check", run_dir, "--variant", "w8a8", "--variant", "w8a8-native", "--text", text_file, "--json",
               "--steps", "4", "--window", "64", ok=False)
    rows = {row["variant"]: row for row in json.loads(r.output)["variants"]}
    assert rows["w8a8-native"]["top1"] == pytest.approx(rows["w8a8"]["top1"], abs=0.05)
    assert rows["w8a8-native"]["kl"] == pytest.approx(rows["w8a8"]["kl"], rel=0.5, abs=1e-3)
    before = run_state(run_dir)
    monkeypatch.setattr(optimize_stage, "KV16_DRIFT", 0.0)
    monkeypatch.setattr(optimize_stage, "KV16_DRIFT_FLOOR", 0.0)
    one_line_error(invoke("optimize", run_dir, "--native-int8", ok=False), "in mean KL from fused", "not kept")
    assert run_state(run_dir) == before


def test_optimize_kv_fp16_judges_a_variant_that_rounds_as_it_runs_against_its_float_ancestor(run_dir, text_file,
                                                                                             monkeypatch):
    """Past the plain tolerance (forced here: real w4/w8 pass it by re-rolling their int8 activation rounding),
    the -kv16 variant is kept only when it is no further from the float model than its source, within
    KV16_DRIFT; the distances are recorded, and a refusal names them and leaves the run as it was."""
    from pipeline.stages import optimize as optimize_stage

    w8a8_variant(run_dir, text_file)
    monkeypatch.setattr(optimize_stage, "KV16_TOLERANCE", 0.0)
    res = json.loads(invoke("optimize", run_dir, "--kv-fp16", "--source", "w8a8", "--json").output)
    drift = res["drift_from_float"]
    assert drift["reference"] == "fused" and drift["kept"] and 0 < drift["source_kl"] < 0.1
    assert drift["target_kl"] <= 2 * drift["source_kl"] + 1e-3
    before = run_state(run_dir)
    monkeypatch.setattr(optimize_stage, "KV16_DRIFT", 0.0)
    monkeypatch.setattr(optimize_stage, "KV16_DRIFT_FLOOR", 0.0)
    one_line_error(invoke("optimize", run_dir, "--kv-fp16", "--source", "w8a8", ok=False),
                   "in mean KL from fused against w8a8's", "not kept")
    assert run_state(run_dir) == before
    from pipeline.stages.optimize import mean_kl

    logits = [np.array([[2.0, 0.0, -1.0]]), np.array([[0.5, 0.5, 3.0]])]
    assert mean_kl(logits, logits) == 0.0
    moved = [x + np.array([[0.0, 1.0, 0.0]]) for x in logits]
    p = np.exp(logits[0][0]) / np.exp(logits[0][0]).sum()
    q = np.exp(moved[0][0]) / np.exp(moved[0][0]).sum()
    assert mean_kl(logits[:1], moved[:1]) == pytest.approx(float(np.sum(p * np.log(p / q))))


def test_optimize_kv_fp16_writes_a_checked_variant_of_a_quantized_one(run_dir, text_file):
    """From the CLI, on a static int8 variant: <source>-kv16, checked against its source; unfused refused."""
    w8a8_variant(run_dir, text_file)
    res = json.loads(invoke("optimize", run_dir, "--kv-fp16", "--source", "w8a8", "--json").output)
    assert res["kv_dtype"] == "float16" and 0 < res["parity_max_abs_logit_diff"]["prefill+decode"] < 0.25
    r = invoke("check", run_dir, "--variant", "w8a8", "--variant", "w8a8-kv16", "--text", text_file, "--json",
               "--steps", "4", "--window", "64", ok=False)
    rows = {row["variant"]: row for row in json.loads(r.output)["variants"]}
    assert rows["w8a8-kv16"]["kl"] == pytest.approx(rows["w8a8"]["kl"], abs=2e-3)
    assert rows["w8a8-kv16"]["size_bytes"] == pytest.approx(rows["w8a8"]["size_bytes"], abs=4096)  # a few Casts
    before = set((run_dir / "variants").iterdir())
    one_line_error(invoke("optimize", run_dir, "--kv-fp16", "--source", "fp32", ok=False), "needs a fused graph")
    one_line_error(invoke("optimize", run_dir, "--kv-fp16", "--native-int8", ok=False), "separate rewrites")
    one_line_error(invoke("optimize", run_dir, "--static-head", ok=False), "--static-head is a choice of --native-int8")
    one_line_error(invoke("optimize", run_dir, "--no-native-attention", ok=False),
                   "--no-native-attention is a choice of --native-int8")
    assert set((run_dir / "variants").iterdir()) == before


def test_quantize_weight_rounding_option_reaches_the_quantizer(run_dir, text_file):
    """GPTQ is the default and reports the calibration tokens it saw (4 windows: 4 x 28 prefill + 4 x 4 decode);
    `--weight-rounding nearest` turns it off."""
    common = ("--recipe", "w8", "--calib-text", text_file, "--calib-windows", "4", "--window", "32")
    invoke("quantize", run_dir, *common)
    report = manifest_results(run_dir, "quantize")
    assert report["weight_rounding"] == "gptq" and report["gptq"]["calibration_tokens"] == 4 * 32
    invoke("quantize", run_dir, *common, "--weight-rounding", "nearest")
    report = manifest_results(run_dir, "quantize")
    assert report["weight_rounding"] == "nearest" and "gptq" not in report


def test_quantize_rotate_option_reaches_the_quantizer(run_dir, text_file):
    """w8a8 rotates the fused graph by default and says so; `--no-rotate` leaves it unrotated and is recorded."""
    common = ("--recipe", "w8a8", "--calib-text", text_file, "--calib-windows", "4", "--window", "32",
              "--max-ppl-increase", "1.0")
    invoke("quantize", run_dir, *common)
    report = manifest_results(run_dir, "quantize")
    assert report["rotation"]["residual"] and report["rotation"]["value_heads"] > 0
    assert report["online_hadamard"]["block"] == 128 and report["online_hadamard"]["matmuls"]
    invoke("quantize", run_dir, *common, "--no-rotate")
    entry = [s for s in json.loads((run_dir / "manifest.json").read_text())["stages"] if s["stage"] == "quantize"][-1]
    assert "rotation" not in entry["results"] and entry["config"]["rotate"] is False
    assert "online_hadamard" not in entry["results"]
    out = invoke("quantize", run_dir, *common, "--online-hadamard", "64", "--outlier-channels", "0").output
    entry = [s for s in json.loads((run_dir / "manifest.json").read_text())["stages"] if s["stage"] == "quantize"][-1]
    assert entry["results"]["online_hadamard"]["block"] == 64 and "online Hadamard (64-wide blocks" in out
    assert entry["config"]["outlier_channels"] == 0 and entry["results"]["config"]["outlier_channels"] == 0
    one_line_error(invoke("quantize", run_dir, *common, "--online-hadamard", "100", ok=False),
                   "online_hadamard", "2^a * 12^b")


@pytest.mark.parametrize("saturates, flag, bits", [(True, (), 7), (False, (), 8), (False, ("--reduce-range",), 7),
                                                   (True, ("--no-reduce-range",), 8)])
def test_quantize_weight_range_follows_the_machine_unless_told(run_dir, text_file, monkeypatch, saturates, flag,
                                                              bits):
    """7-bit weights exactly where this machine's int8 kernels saturate, unless --reduce-range says otherwise;
    the choice is reported, recorded in the manifest and written into the model."""
    import pipeline.stages.quantize as stage

    monkeypatch.setattr(stage, "int8_gemm_saturates", lambda: saturates)
    out = invoke("quantize", run_dir, "--recipe", "static", "--calib-text", text_file, "--calib-windows", "4",
                 "--window", "32", *flag).output
    assert f"static int8 weights: {bits}-bit" in out
    assert manifest_results(run_dir, "quantize")["reduce_range"] is (bits == 7)
    meta = {p.key: p.value for p in onnx.load(str(run_dir / "variants/static/model.onnx")).metadata_props}
    assert meta["pipeline.int8_weight_bits"] == str(bits)


def test_check_fails_loudly_when_a_threshold_is_missed(run_dir, text_file, monkeypatch):
    from pipeline.stages import check as check_mod

    monkeypatch.setitem(check_mod.THRESHOLDS, "fused", check_mod.Thresholds(max_abs_diff=-1.0))
    r = invoke("check", run_dir, "--variant", "fused", "--text", text_file, "--steps", "2", "--window", "32",
               ok=False)
    assert r.exit_code == 1 and "FAIL: max_abs_diff" in r.output


def test_bench_reports_every_runner_with_pytorch_baseline(run_dir):
    r = invoke("bench", run_dir, "--variant", "fused", "--json", "--prompt-len", "8", "--new-tokens", "4",
               "--repeats", "1", "--threads", "1")
    results = json.loads(r.output)
    rows = results["rows"]
    assert set(rows) == {"pytorch", "fused"}
    for row in rows.values():
        assert row["decode_ms_p50"] > 0 and row["prefill_ms"] > 0 and row["peak_rss_mb"] > 10
    assert rows["fused"]["decode_speedup_vs_pytorch"] > 0
    # the session sized for the request, as llama.cpp's n_ctx: a graph beside the variant's for the runner's time
    assert results["context"] == rows["fused"]["context"] == 12
    assert rows["fused"]["file_bytes"] == model_bytes(run_dir / "variants/fused/model.onnx")  # not the sized graph's
    assert sorted(p.name for p in (run_dir / "variants/fused").iterdir() if p.name.startswith("."))  == []
    full = json.loads(invoke("bench", run_dir, "--variant", "fused", "--json", "--prompt-len", "8", "--new-tokens",
                             "4", "--repeats", "1", "--threads", "1", "--compare", "none", "--full-context").output)
    assert full["context"] == "full" and "context" not in full["rows"]["fused"]


def test_bench_names_missing_peers(run_dir, monkeypatch):
    """Optimum runs from the interpreter PIPELINE_OPTIMUM_PYTHON names; one without it (here: a missing file)
    is reported with the way to set it up, not a crash."""
    from pipeline.peers import OPTIMUM_PYTHON

    monkeypatch.setenv(OPTIMUM_PYTHON, str(run_dir / "no-such-venv" / "bin" / "python"))
    r = invoke("bench", run_dir, "--variant", "fused", "--compare", "optimum", "--prompt-len", "4",
               "--new-tokens", "2", "--repeats", "1")
    assert "optimum" in r.output and "not installed" in r.output and OPTIMUM_PYTHON in r.output
    fused = next(line for line in r.output.splitlines() if line.startswith("fused")).split()
    assert fused[7] == "-", fused  # no PyTorch row to divide by: a dash, not "nanx"
    low, high = map(float, fused[4].split("-"))  # decode min-max over the repeats, around the p50
    assert low <= float(fused[3]) <= high
    assert " ".join(fused[-6:]) == "noisy: fewer than 5 repeats (1)"  # one repeat says nothing of the spread


def test_bench_csv_has_one_row_per_runner_with_the_json_figures(run_dir):
    import csv

    r = invoke("bench", run_dir, "--variant", "fused", "--format", "csv", "--prompt-len", "4", "--new-tokens", "3",
               "--warmup", "0", "--repeats", "2", "--threads", "1")
    table = list(csv.DictReader(r.stdout.splitlines()))
    recorded = RunDir(run_dir).results("bench")["rows"]  # the JSON of the same run, as the manifest holds it
    assert [row["runner"] for row in table] == ["pytorch", "fused"]
    for row in table:
        figures = recorded[row["runner"]]
        assert float(row["decode_ms_p50"]) == pytest.approx(figures["decode_ms_p50"], rel=1e-9)
        assert float(row["decode_ms_min"]) <= float(row["decode_ms_p50"]) <= float(row["decode_ms_max"])
        assert float(row["prefill_ms_min"]) <= float(row["prefill_ms"]) <= float(row["prefill_ms_max"])
        assert row["noisy"] == "True" and row["note"] == "noisy: fewer than 5 repeats (2)"
    assert float(table[1]["decode_speedup_vs_pytorch"]) == pytest.approx(
        recorded["pytorch"]["decode_ms_p50"] / recorded["fused"]["decode_ms_p50"])


def test_bench_markdown_and_json_formats(run_dir):
    md = invoke("bench", run_dir, "--variant", "fused", "--compare", "none", "--format", "md", "--prompt-len", "4",
                "--new-tokens", "3", "--warmup", "0", "--repeats", "5", "--threads", "1").stdout.splitlines()
    start = next(i for i, line in enumerate(md) if line.startswith("| runner |"))
    header, separator, *rows = md[start:]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:4] == ["runner", "prefill ms", "min-max", "decode p50"] and cells[-1] == "note"
    assert separator.count("|") == header.count("|") and set(separator) <= set("|-:")
    assert len(rows) == 1 and rows[0].startswith("| fused |") and rows[0].count("|") == header.count("|")
    as_json = json.loads(invoke("bench", run_dir, "--variant", "fused", "--compare", "none", "--json",
                                "--prompt-len", "4", "--new-tokens", "3", "--warmup", "0", "--threads", "1").stdout)
    fused = as_json["rows"]["fused"]
    assert fused["repeats"] == 5 and len(fused["decode_ms_repeats"]) == 5  # the new default
    assert fused["decode_ms_min"] == pytest.approx(min(fused["decode_ms_repeats"]))
    assert isinstance(fused["noisy"], bool)
    one_line_error(invoke("bench", run_dir, "--json", "--format", "csv", ok=False), "--json and --format csv")
    one_line_error(invoke("bench", run_dir, "--format", "xml", ok=False), "xml")


def test_bench_plot_writes_a_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib: pip install 'edge-pipeline[plot]'")
    png = tmp_path / "bench.png"
    r = invoke("bench", run_dir, "--variant", "fused", "--compare", "none", "--plot", png, "--json",
               "--prompt-len", "4", "--new-tokens", "3", "--warmup", "0", "--repeats", "2", "--threads", "1")
    assert json.loads(r.stdout)["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temporary file left beside it


def test_bench_plot_without_matplotlib_stops_before_any_runner(run_dir, tmp_path, monkeypatch):
    import pipeline.stages.bench as stage

    def ran(*args, **kwargs):
        raise AssertionError("a runner started")

    monkeypatch.setattr(stage, "bench_variant", ran)
    monkeypatch.setattr(stage, "bench_peer", ran)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    png = tmp_path / "bench.png"
    r = invoke("bench", run_dir, "--variant", "fused", "--plot", png, ok=False)
    one_line_error(r)
    assert r.output.strip() == "error: --plot needs matplotlib: pip install 'edge-pipeline[plot]'"
    assert not png.exists() and list(tmp_path.iterdir()) == []
    one_line_error(invoke("bench", run_dir, "--plot", tmp_path / "chart.svg", ok=False), ".png")


def test_peers_run_from_their_own_interpreter_with_our_modules_on_its_path(tmp_path, monkeypatch):
    """The command a peer runs under works from any directory: the project root is on PYTHONPATH."""
    import subprocess

    from pipeline.peers import OPTIMUM_PYTHON, command, interpreter

    monkeypatch.setenv(OPTIMUM_PYTHON, sys.executable)
    assert interpreter("optimum") == sys.executable
    cmd, env = command("optimum", "MODEL", "--threads", "1")
    assert cmd[1:] == ["-m", "pipeline.peers", "optimum", "MODEL", "--threads", "1"]
    import pipeline.peers

    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(pipeline.peers.__file__).resolve().parents[1])
    probe = subprocess.run([cmd[0], "-c", "import pipeline.peers, runtimes.bench; print('ok')"], env=env,
                           cwd=tmp_path, capture_output=True, text=True)
    assert probe.stdout.strip() == "ok"


def test_generate_streams_text_and_seeds_reproduce(run_dir):
    a = invoke("generate", run_dir, "--prompt", "def function_1(x", "--max-new-tokens", "12",
               "--temperature", "0.9", "--top-p", "0.9", "--seed", "3")
    b = invoke("generate", run_dir, "--prompt", "def function_1(x", "--max-new-tokens", "12",
               "--temperature", "0.9", "--top-p", "0.9", "--seed", "3")
    assert a.output == b.output and a.output.strip()


def test_manifest_records_hashes_that_match_the_files(run_dir):
    data = json.loads((run_dir / "manifest.json").read_text())
    assert [s["stage"] for s in data["stages"]][:2] == ["export", "optimize"]
    fused = data["artifacts"]["fused"]
    assert fused["parent"] == "fp32" and fused["stage"] == "optimize"
    for rel, digest in fused["files"].items():
        assert sha256(run_dir / rel) == digest


def test_run_from_toml_config(tmp_path, llama_dir, text_file):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'out = "{tmp_path / "r"}"\n[export]\nmodel = "{llama_dir}"\n[optimize]\n'
                   f'[check]\ntext = "{text_file}"\nwindow = 32\nsteps = 4\n'
                   f'[package]\nout = "{tmp_path / "bundle"}"\n')
    invoke("run", cfg)
    stages = [s["stage"] for s in json.loads((tmp_path / "r/manifest.json").read_text())["stages"]]
    assert stages == ["export", "check", "package"]  # export built the fused graph: optimize had nothing to do
    bundle = json.loads((tmp_path / "bundle/manifest.json").read_text())
    assert "model.onnx" in json.dumps(bundle["files"]) and (tmp_path / "bundle/genai_config.json").exists()


def test_run_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[export]\nmodel = 'x'\n[quantise]\n")
    one_line_error(invoke("run", bad, ok=False), "quantise")
    bad.write_text("[export]\nmodel = 'x'\n[package]\n")
    one_line_error(invoke("run", bad, ok=False), "out")
    one_line_error(invoke("run", tmp_path / "missing.toml", ok=False), "missing.toml")


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mistral"])
def test_other_families_export_fuse_and_match(tmp_path, family, text_file):
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", family)
    invoke("export", "--model", ckpt, "--graph", "traced", "--out", tmp_path / "run")
    if family == "mistral":  # its 8-token window: only the builder writes local_window_size
        one_line_error(invoke("optimize", tmp_path / "run", ok=False), "sliding-window", "--graph built")
        invoke("export", "--model", ckpt, "--out", tmp_path / "run")
    else:
        invoke("optimize", tmp_path / "run")
    counts = Counter(n.op_type for n in onnx.load(str(tmp_path / "run/variants/fused/model.onnx")).graph.node)
    assert counts["GroupQueryAttention"] == 2
    r = invoke("check", tmp_path / "run", "--text", text_file, "--json", "--steps", "4", "--window", "32")
    assert json.loads(r.output)["passed"]


# ---- bad input: one line, non-zero exit, nothing half-written ----

def test_missing_model_path(tmp_path):
    one_line_error(invoke("export", "--model", tmp_path / "nope", "--out", tmp_path / "r", ok=False), "nope")


def test_hub_id_is_never_downloaded(tmp_path):
    one_line_error(invoke("export", "--model", "HuggingFaceTB/SmolLM2-135M", "--out", tmp_path / "r", ok=False),
                   "download")


def test_non_decoder_checkpoint(tmp_path, bert_dir):
    one_line_error(invoke("export", "--model", bert_dir, "--out", tmp_path / "r", ok=False), "bert")
    assert not (tmp_path / "r/variants/fp32/model.onnx").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_onnx(tmp_path, run_dir, damage):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    model = run / "variants/fp32/model.onnx"
    data = model.read_bytes()
    model.write_bytes(b"not an onnx file" * 10 if damage == "garbage" else data[:len(data) // 2])
    shutil.rmtree(run / "variants/fused")
    one_line_error(invoke("optimize", run, ok=False), "model.onnx")
    assert not (run / "variants/fused/model.onnx").exists()
    one_line_error(invoke("generate", run, "--variant", "fp32", "--prompt", "x", ok=False), "model.onnx")


def test_unknown_and_absent_providers(run_dir):
    one_line_error(invoke("bench", run_dir, "--provider", "npu", ok=False), "npu")
    one_line_error(invoke("bench", run_dir, "--cuda-graph", ok=False), "--cuda-graph is a CUDA option")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        one_line_error(invoke("bench", run_dir, "--provider", "cuda", ok=False), "pip install")
        one_line_error(invoke("generate", run_dir, "--provider", "tensorrt", "--prompt", "x", ok=False),
                       "pip install")


def test_interrupted_export_leaves_nothing_half_written(tmp_path, llama_dir, monkeypatch):
    import torch

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    r = invoke("export", "--model", llama_dir, "--graph", "traced", "--out", tmp_path / "r", ok=False)
    assert r.exit_code == 130 and "Traceback" not in r.output
    leftovers = [p for p in (tmp_path / "r").rglob("*") if p.is_file() or p.name.startswith(".")]
    assert not [p for p in leftovers if p.suffix in (".onnx", ".data") or p.name.startswith(".export")]


def test_entry_point_prints_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline", "check", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_source_becomes_a_hugging_face_directory_for_peers(tmp_path, tied):
    """Optimum exports from an HF directory: a .gguf source is written out once as one, which transformers
    loads back with the same logits (save_pretrained itself refuses GGUF-loaded models). Tied embeddings are
    stored once, as the input embedding (SmolLM2: stored as lm_head only, transformers 4.57 left the
    embedding on the meta device and Optimum's export failed)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.stages.bench import hf_directory
    from tests.models.test_hf import TINY, TOKENS, tiny_hf, write_gguf

    ref = tiny_hf(LlamaConfig(**{**TINY, "vocab_size": len(TOKENS)}, rms_norm_eps=1e-5, tie_word_embeddings=tied))
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(ref, gguf_path)
    out = hf_directory(str(gguf_path), tmp_path / "peers" / "hf")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "model.embed_tokens.weight" in stored and ("lm_head.weight" in stored) is not tied
    ids = torch.tensor([[1, 5, 3, 2, 7]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        want = ref(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert hf_directory(str(gguf_path), out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(out.parent.glob(".hf-*"))


def test_the_quantize_summary_reads_what_the_report_lists_not_its_reason_texts():
    from pipeline.stages.quantize import render

    report = {"recipe": "w8a8", "size_before": 4e6, "size_after": 1e6, "quantized_matmuls": ["a", "b"],
              "quantized_flop_share": 0.9, "fallback_matmuls": {}, "fallback_flop_share": 0.0, "reduce_range": False,
              "ppl": None, "added_float_matmuls": {"outlier_split": ["s"], "online_hadamard": ["h"]},
              "smoothing": {"outlier_channels": {"x": [1, 2]}}, "online_hadamard": {"block": 128},
              "float_matmuls": {"s": "any words", "h": "any words", "attn": "any words", "lm": "excluded by config"},
              "activation_matmuls": ["attn"]}
    lines = render(report).splitlines()
    assert lines[0] == "w8a8: 4.00 MB -> 1.00 MB (0.25x); 2 MatMuls quantized, 90% of weight-MatMul FLOPs"
    assert "2 channels of 1 activations (1 small MatMuls)" in lines[2] and "before 1 MatMuls" in lines[3]
    assert lines[-1] == "  left in float: lm (excluded by config)"
    many = {f"m{i}": "sensitive" for i in range(119)}  # a search that moved every MatMul: a line, not a page
    lines = render({**report, "fallback_matmuls": many, "fallback_flop_share": 1.0}).splitlines()
    assert lines[1] == ("  8-bit weight-only instead: 119 MatMuls, 100% of FLOPs: m0, m1, m2, m3, m4, m5, m6, m7, "
                        "... (111 more: --json lists them all)")


def test_short_help_and_the_provider_choices():
    from pipeline.options import PROVIDERS
    from runtimes.providers import FACTORIES

    assert tuple(FACTORIES) == PROVIDERS  # the CLI offers exactly the providers the runtime knows
    for args in (["-h"], ["bench", "-h"], ["optimize", "-h"]):
        assert invoke(*args).output.startswith("Usage: "), args
    bench = invoke("bench", "-h").output
    assert "[cpu|cuda|tensorrt]" in bench and "w8a8-native" in bench


def test_greedy_check_takes_the_prompt_whose_reference_does_not_repeat_itself():
    import torch

    from pipeline.stages.check import CheckConfig, greedy_reference, render_table

    class Repeats:
        """A model that repeats its prompt's first token, except after prompts starting with 7."""
        def generate(self, x, steps):
            first = int(x[0, 0])
            return torch.tensor([list(range(10, 10 + steps)) if first == 7 else [first] * steps])

    windows = [[3] * 40, [7] * 40, [5] * 40]
    config = CheckConfig(steps=8, prompt_tokens=4)
    prompt, ref = greedy_reference(Repeats(), windows, config)
    assert prompt == [7] * 4 and ref == list(range(10, 18))
    rows = {"variants": [], "passed": True, "tokens_evaluated": 1, "greedy_steps": 8, "greedy_distinct": 1}
    assert "1 distinct tokens; it repeats itself" in render_table(rows)
    assert "repeats" not in render_table({**rows, "greedy_distinct": 8})


def test_check_measures_llama_cpp_files_beside_the_variants(tmp_path, text_file):
    """check --compare: llama.cpp running the GGUF source itself (float32 weights: it computes what PyTorch does,
    up to its float16 KV cache) and a Q4_0 copy made by its own quantizer, on the same windows and greedy prompt."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                        "'edge-pipeline[llamacpp]')")
    from transformers import LlamaConfig

    from tests.models.test_hf import TINY, TOKENS, tiny_hf, write_gguf

    source = tmp_path / "tiny.gguf"
    write_gguf(tiny_hf(LlamaConfig(**{**TINY, "vocab_size": len(TOKENS), "num_attention_heads": 2,
                                      "num_key_value_heads": 1}, rms_norm_eps=1e-5)), source)
    run = tmp_path / "run"
    invoke("export", "--model", source, "--out", run)
    (run / "peers").mkdir()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(run / "peers/q4_0.gguf").encode(), params) == 0
    out = json.loads(invoke("check", run, "--variant", "fused", "--text", text_file, "--json", "--steps", "8",
                            "--window", "32", "--windows", "2", "--compare", "llamacpp,llamacpp:q4_0",
                            ok=False).output)
    rows = {r["variant"]: r for r in out["variants"]}
    fused, f32, q4 = rows["fused"], rows["llamacpp"], rows["llamacpp:q4_0"]
    assert (f32["gguf_type"], q4["gguf_type"]) == ("F32", "Q4_0") and f32["peer"] and not f32["failed"]
    assert f32["size_bytes"] == source.stat().st_size and f32["ppl_ref"] == pytest.approx(fused["ppl_ref"])
    assert f32["kl"] < 1e-3 and f32["top1"] > 0.9 and f32["greedy_ref"] == fused["greedy_ref"]
    assert q4["kl"] > 10 * f32["kl"] and q4["size_bytes"] < f32["size_bytes"]
    table = invoke("check", run, "--variant", "fused", "--text", text_file, "--steps", "8", "--window", "32",
                   "--windows", "2", "--compare", "llamacpp:q4_0", ok=False).output
    assert "llamacpp:q4_0 Q4_0" in table and "(peer, not judged)" in table
    one_line_error(invoke("check", run, "--compare", "optimum", ok=False), "llama.cpp files only")
    one_line_error(invoke("check", run, "--window", "32", "--compare", "llamacpp:absent", ok=False),
                   "absent.gguf")


def test_the_llama_cpp_peer_runs_the_runs_own_gguf_before_the_source_and_names_its_type(tmp_path):
    """A .gguf source is run as it is only when RUN/peers/model.gguf (the benchmarks' re-quantization at the
    bits compared) is absent; llamacpp:NAME is RUN/peers/NAME.gguf; the tables name the file's weight type."""
    from models.errors import UserError
    from pipeline.manifest import SCHEMA
    from pipeline.stages.bench import peer_model, render_markdown, render_table

    source = tmp_path / "model-q4_1.gguf"
    source.write_bytes(b"GGUF")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "stages": [], "artifacts": {"source": {
        "kind": "source", "path": str(source), "files": {}, "digest": "", "parent": None}}}))
    r = RunDir(run)
    assert peer_model(r, "llamacpp") == str(source)
    (run / "peers").mkdir()
    (run / "peers/model.gguf").write_bytes(b"GGUF")
    (run / "peers/q4_k_m.gguf").write_bytes(b"GGUF")
    assert peer_model(r, "llamacpp") == str(run / "peers/model.gguf")
    assert peer_model(r, "llamacpp", "q4_k_m") == str(run / "peers/q4_k_m.gguf")
    assert peer_model(r, "llamacpp", str(source)) == str(source)
    with pytest.raises(UserError, match="absent.gguf is not a file"):
        peer_model(r, "llamacpp", "absent")
    row = {"prefill_ms": 1.0, "decode_ms_p50": 2.0, "decode_ms_p90": 2.5, "tokens_per_s": 500.0, "peak_rss_mb": 9.0}
    results = {"provider": "cpu", "threads": 2, "prompt_len": 4, "new_tokens": 4,
               "rows": {"llamacpp": {**row, "gguf_type": "Q8_0"}, "llamacpp:q4_k_m": {**row, "gguf_type": "Q4_K_M"},
                        "w8a8": row}}
    assert "llamacpp Q8_0" in render_table(results) and "| llamacpp:q4_k_m Q4_K_M |" in render_markdown(results)


def test_quantize_gguf_keeps_the_files_blocks_and_refuses_a_run_without_them(tmp_path, text_file, llama_dir):
    from tests.exporters.test_grid import mixed_gguf

    run = tmp_path / "run"
    invoke("export", "--model", mixed_gguf(tmp_path / "tiny.gguf", tied=True, with_tokenizer=True), "--out", run)
    out = invoke("quantize", run, "--recipe", "gguf", "--calib-text", text_file, "--calib-windows", "2",
                 "--window", "32").output
    assert "gguf: " in out and "8-bit weight-only instead" in out  # the Q5/Q8 MatMuls, exactly at 8 bits
    report = manifest_results(run, "quantize")
    assert report["grid"]["tied_table_shared"] and report["fallback_matmuls"]["/model/lm_head/MatMul"] \
        == "GGUF Q8_0: its exact 8-bit form"
    r = invoke("check", run, "--variant", "gguf", "--text", text_file, "--json", "--steps", "4", "--window", "32")
    row = json.loads(r.output)["variants"][0]
    assert not row["failed"] and row["kl"] < 0.02 and row["top1"] >= 0.95  # judged as the GGUF's own blocks

    hf_run = tmp_path / "hf"
    invoke("export", "--model", llama_dir, "--out", hf_run)
    one_line_error(invoke("quantize", hf_run, "--recipe", "gguf", "--calib-text", text_file, "--window", "32",
                          ok=False), "keeps a GGUF file's own blocks", "use --recipe w4 or w8")
    assert not (hf_run / "variants" / "gguf").exists()
