"""Every stage on the families only the graph builder fuses: Qwen3 (q/k norms, its own head width), Gemma 3
(q/k norms, sandwich norms, scaled embeddings, GELU, local and global layers), Gemma 2 (soft-capped attention
and logits), Phi-3 (packed projections, partial
rotary, LongRoPE), plus Mistral's sliding window.

Tiny random checkpoints (tests/pipeline/conftest.py) with windows of 8 tokens, shorter than every text below:
export builds the fused graph, each quantization recipe keeps it runnable and close to the float graph, check
and bench run every variant, package ships one, and generation runs past the window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

from exporters.quantization.prefix import MASK
from tests.pipeline.conftest import make_hf_checkpoint
from tests.pipeline.test_cli import invoke, manifest_results

RECIPES = ("w8a8", "w8", "w4")


@pytest.fixture(scope="module", params=["qwen3", "gemma3_text", "gemma2", "mistral", "phi3"])
def family_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    run = root / "run"
    # Gemma 3's tokenizer opens every text with its token 0, as Gemma's does with <bos>
    checkpoint = make_hf_checkpoint(root / "ckpt", request.param, tied=True, bos=request.param == "gemma3_text")
    exported = json.loads(invoke("export", "--model", checkpoint, "--out", run, "--json").output)
    return request.param, run, exported


def test_every_stage(family_run, text_file, tmp_path):
    family, run, exported = family_run
    assert exported["graph"] == "built" and exported["parity_checked"] == "full and layer by layer"
    assert max(exported["parity_max_abs_diff"].values()) < 1e-4
    fused = onnx.load(str(run / "variants/fused/model.onnx"), load_external_data=False)
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), None) for n in gqa]
    assert windows == {"qwen3": [None, None], "gemma3_text": [8, None], "mistral": [8, 8], "phi3": [None, None],
                       "gemma2": [8, None]}[family]

    for recipe in RECIPES:
        # no budget search (--valid-windows 0): a random tiny model's 4-bit top-1 sits at the threshold, and
        # the search's choices are tested in tests/exporters/test_quantize.py; here every stage must run
        invoke("quantize", run, "--recipe", recipe, "--calib-text", text_file, "--calib-windows", "4",
               "--window", "32", "--valid-windows", "0", *(("--online-hadamard", "32") if recipe != "w8" else ()))
        report = manifest_results(run, "quantize")
        every = {f"/model/layers.{i}/{m}/MatMul" for i in range(2)
                 for m in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj")}
        integer = set(report["quantized_matmuls"]) | set(report["fallback_matmuls"])  # the budget's w8 fallback
        assert report["recipe"] == recipe and every <= integer and report["quantized_matmuls"], report
        nodes = onnx.load(str(run / f"variants/{recipe}/model.onnx")).graph.node
        ops = Counter(n.op_type for n in nodes)
        assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits" if recipe != "w8a8" else "DequantizeLinear"]
        # w8a8 pins the keys and values of Gemma 3's opening token (2 layers x key, value) and the final norm's
        # two inputs at position 0
        pinned = {"token": 0, "tensors": 6} if family == "gemma3_text" and recipe == "w8a8" else None
        assert report.get("pinned_first_token") == pinned
        assert sum(n.op_type == "Where" and n.input[0] == MASK for n in nodes) == (6 if pinned else 0)
        if pinned:  # and --no-pin-first-token leaves it to the int8 arithmetic
            invoke("quantize", run, "--recipe", recipe, "--calib-text", text_file, "--calib-windows", "4",
                   "--window", "32", "--valid-windows", "0", "--online-hadamard", "32", "--no-pin-first-token")
            assert "pinned_first_token" not in manifest_results(run, "quantize")
        if recipe != "w8":  # where R1 cannot rotate the stream (Gemma's norms after attention and MLP), the
            # online Hadamard rotates the norm outputs' readers too: every static int8 input is rotated
            rotated = report["rotation"]["residual"]
            values = report["rotation"]["value_heads"] > 0  # R2: the o_proj inputs; else the online rotation
            online = {m for m in every if m.endswith("down_proj/MatMul") or not rotated and "o_proj" not in m
                      or not values and "o_proj" in m}
            assert rotated == (family not in ("gemma3_text", "gemma2"))
            assert set(report["online_hadamard"]["matmuls"]) == online, report["online_hadamard"]

    variants = [x for v in ("fused", *RECIPES) for x in ("--variant", v)]
    check = json.loads(invoke("check", run, *variants, "--text", text_file, "--json", "--steps", "4",
                              "--window", "48", ok=False).output)
    rows = {r["variant"]: r for r in check["variants"]}
    assert rows["fused"]["kl"] < 1e-6 and rows["fused"]["top1"] == 1.0  # the fused graph is the float model
    for recipe in RECIPES:  # a window of 48 tokens runs well past the 8-token attention window
        assert np.isfinite(rows[recipe]["ppl"]) and rows[recipe]["top1"] > 0.5, rows[recipe]

    bench = json.loads(invoke("bench", run, "--variant", "w8a8", "--json", "--prompt-len", "16", "--new-tokens", "8",
                              "--repeats", "1").output)
    assert bench["rows"]["w8a8"]["decode_ms_p50"] > 0

    invoke("package", run, "--out", tmp_path / "bundle")
    genai = json.loads((tmp_path / "bundle/genai_config.json").read_text())
    assert genai["model"]["context_length"] == 512 and genai["search"]["past_present_share_buffer"] is True
    device = subprocess.run([sys.executable, "-m", "runtimes", "generate", str(tmp_path / "bundle"), "--prompt",
                             "def function_1(x, y):", "--max-new-tokens", "12"], capture_output=True, text=True)
    assert device.returncode == 0 and device.stdout.strip(), device.stderr
