"""Every variant a pass writes carries the full I/O contract (runtimes/contract.py), with the decoder's own
dimensions, and fusion reads the dimensions from it rather than from node names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters.cpu_kernels import specialize
from exporters.export import export_onnx
from exporters.optimize import OptimizeConfig, optimize
from exporters.quantize import QuantConfig, quantize
from models.decoder import Decoder, DecoderConfig
from runtimes.contract import METADATA_KEY, Contract, read_contract
from runtimes.errors import RuntimeUserError

VOCAB = 128
CONFIG = DecoderConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       vocab_size=VOCAB, max_position_embeddings=64)
QUANT = dict(num_prefill=2, seq_len=16, num_decode_steps=1, max_ppl_increase=1e9, w4_max_ppl_increase=1e9)
# variant -> (fused_attention, kv_dtype)
EXPECTED = {"fp32": (False, "float32"), "fused": (True, "float32"), "fused-fp16": (True, "float16"),
            "w8a8": (True, "float32"), "w4": (True, "float32"), "w8a8-native": (True, "float32")}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    torch.manual_seed(0)
    paths = {name: root / f"{name}.onnx" for name in EXPECTED}
    export_onnx(Decoder(CONFIG), paths["fp32"])
    optimize(paths["fp32"], paths["fused"], OptimizeConfig(check_parity=False))
    optimize(paths["fp32"], paths["fused-fp16"], OptimizeConfig(fp16=True, check_parity=False))
    calib = [np.random.default_rng(0).integers(0, VOCAB, 80).tolist()]
    for recipe in ("w8a8", "w4"):
        quantize(paths["fused"], paths[recipe], calib, QuantConfig(recipe=recipe, **QUANT))
    specialize(paths["w8a8"], paths["w8a8-native"])  # a graph rewrite: the kernel library is not needed here
    return paths


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_every_variant_carries_the_full_contract_with_the_decoders_dimensions(variants, variant):
    model = onnx.load(str(variants[variant]), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(json.loads(meta[METADATA_KEY])) == {f.name for f in dataclasses.fields(Contract)}
    c = read_contract(model, variants[variant])
    cfg = CONFIG
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.vocab_size,
            c.max_position_embeddings, c.attention_windows) == \
        (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.vocab_size,
         cfg.max_position_embeddings, (None, None))
    assert (c.family, c.rope_theta, c.rope_scaling) == (cfg.family, cfg.rope_theta, cfg.rope_scaling)
    assert (c.fused_attention, c.kv_dtype) == EXPECTED[variant]
    # the graph keeps the contract's names and dtypes (fused graphs drop position_ids)
    dtypes = c.dtypes()
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert set(inputs) <= set(c.input_names()) and list(outputs) == c.output_names()
    for name, elem in {**inputs, **outputs}.items():  # the logits: float32, or float16 in fused-fp16
        assert onnx.helper.tensor_dtype_to_np_dtype(elem) == np.dtype(dtypes.get(name, c.kv_dtype)), name
    assert set(dtypes) == set(c.input_names()) | set(c.output_names()) - {"logits"}


def test_fusion_reads_the_heads_from_the_contract_not_the_q_proj_weight(variants, tmp_path):
    """Layer 0's q_proj weight reaches its MatMul through an Identity, so it is no initializer of that MatMul:
    reading the query heads off that weight's shape (as fusion once did) finds nothing; the contract has them."""
    model = onnx.load(str(variants["fp32"]))
    q_proj = next(n for n in model.graph.node if n.name == "/model/layers.0/attn/q_proj/MatMul")
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [q_proj.input[1]], ["q_proj_weight"]))
    q_proj.input[1] = "q_proj_weight"
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = optimize(tmp_path / "in.onnx", tmp_path / "out.onnx")
    gqa = [n for n in onnx.load(str(tmp_path / "out.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    assert [next(a.i for a in n.attribute if a.name == "num_heads") for n in gqa] == [CONFIG.num_heads] * 2
    assert max(report["parity_max_abs_logit_diff"].values()) < 1e-4


def test_fusing_a_model_from_an_older_version_is_refused_with_one_line(variants, tmp_path):
    model = onnx.load(str(variants["fp32"]))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items()
                              if k not in ("num_heads", "hidden_size", "attention_windows")})
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(RuntimeUserError) as err:
        optimize(tmp_path / "old.onnx", tmp_path / "out.onnx")
    assert "\n" not in str(err.value) and "re-export" in str(err.value) and "old.onnx" in str(err.value)
