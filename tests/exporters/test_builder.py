"""exporters/builder.py and models/weights.py: the fused graph written from config and streamed weights.

Three oracles: transformers (the checkpoint loaded by its own code), the traced export fused by `pipeline
optimize` (the old route; same tensor and node names, so the same logits to float rounding), and our PyTorch
decoder. Sources: float32, bfloat16 and sharded safetensors, F32 and Q8_0 GGUF files with llama.cpp's q/k order.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

from exporters.builder import build_graph, check_built
from exporters.graph import GraphIndex
from exporters.quantization.scales import stored_scales
from exporters.export import export_onnx, parity
from exporters.optimize import OptimizeConfig, add_rotary_caches, optimize, rotary_table
from models.errors import UserError
from models.hf import load_model
from models.weights import NotBuildable, open_weights
from runtimes.contract import Contract, past_names, read_contract
from tests.models.test_hf import TOKENS, llama_cpp_permute, tiny_hf, write_gguf
from tests.pipeline.test_cli import invoke, one_line_error
from tests.hf_cache import cache_of, with_cache

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=160, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama_tied_llama3_rope": lambda: LlamaConfig(**TINY, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama_biases": lambda: LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
    "mistral_window_unused": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
}
# the families only the builder fuses (q/k norms, sandwich norms, sliding windows), each with windows shorter than
# the sequences below; layer_types mixes local and global layers
NEW_FAMILIES = {
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32),
    "gemma3_text": lambda: Gemma3TextConfig(
        **TINY, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=4),
    "qwen2_window": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    # packed qkv/gate_up, half of each 32-wide head rotated, LongRoPE past a pretraining context of 8
    "phi3": lambda: Phi3Config(**{**TINY, "num_attention_heads": 2, "num_key_value_heads": 1},
                               partial_rotary_factor=0.5, original_max_position_embeddings=8,
                               rope_scaling={"rope_type": "longrope",
                                             "short_factor": [1.0, 1.5, 2.0, 1.2, 1.1, 1.3, 1.0, 1.4],
                                             "long_factor": [3.0, 7.0, 2.0, 4.0, 5.0, 6.0, 2.5, 9.0]},
                               bos_token_id=0, eos_token_id=1, pad_token_id=0),
}


def save(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = read_contract(onnx.load(str(path), load_external_data=False))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in {i.name for i in sess.get_inputs()}:
        feeds["position_ids"] = np.arange(ids.shape[1])[None]
    feeds.update(dict.fromkeys(past_names(c.num_layers), np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32)))
    return sess.run(["logits"], feeds)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_built_graph_matches_transformers_and_the_fused_trace(family, tmp_path):
    ckpt = save(tiny_hf(FAMILIES[family]()), tmp_path / "ckpt")
    weights = open_weights(ckpt)
    built = tmp_path / "built.onnx"
    contract = build_graph(weights, built)
    reference = load_model(ckpt).model
    assert weights.parameters() == reference.num_parameters()
    for seq, past in ((6, 0), (1, 7)):  # prefill, then a decode step through a random cache
        assert parity(reference, built, contract, batch=1, seq=seq, past=past).worst[1] < 1e-4

    traced = tmp_path / "traced.onnx"
    export_onnx(reference, traced)
    optimize(traced, tmp_path / "fused.onnx", OptimizeConfig(check_parity=False))
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    mine = onnx.load(str(built))
    ops = sorted(n.op_type for n in mine.graph.node if not n.name.startswith("/model/keep/"))  # logits_to_keep
    if weights.config.tie_word_embeddings:  # the table is stored once: tokens gathered from lm_head's columns
        ops.remove("Transpose")
        tables = [t for t in mine.graph.initializer if TINY["vocab_size"] in t.dims]
        assert [(t.name, list(t.dims)) for t in tables] == [("model.lm_head.weight", [TINY["hidden_size"],
                                                                                      TINY["vocab_size"]])]
    assert ops == sorted(n.op_type for n in fused.graph.node)
    assert read_contract(mine) == read_contract(fused)
    weight_inits = {t.name for t in mine.graph.initializer if len(t.dims) == 2}
    for n in mine.graph.node:  # the names the quantization passes and the native rewrite know
        if n.op_type == "MatMul":
            assert n.input[1] in weight_inits, n.name
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (1, 9))
    np.testing.assert_allclose(logits(built, ids), logits(tmp_path / "fused.onnx", ids), atol=2e-5)


def graph_run(path: Path, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits of a prefill of ids[:, :-steps], then of each remaining token decoded through the returned cache."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = read_contract(onnx.load(str(path), load_external_data=False))
    past = dict.fromkeys(past_names(c.num_layers), np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32))
    names = ["logits"] + [n.replace("past_key_values", "present") for n in past]
    out, decoded, start = None, [], 0
    for stop in range(ids.shape[1] - steps, ids.shape[1] + 1):
        res = sess.run(names, {"input_ids": ids[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
                               **past})
        past = dict(zip(past, res[1:]))
        out = res[0] if out is None else out
        decoded += [res[0]] if start else []
        start = stop
    return out, decoded


def transformers_run(model, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    t = torch.from_numpy(ids)
    with torch.no_grad():
        res = model(input_ids=t[:, :-steps], use_cache=True)
        out, cache, decoded = res.logits.numpy(), cache_of(res), []
        for j in range(ids.shape[1] - steps, ids.shape[1]):
            res = model(input_ids=t[:, j:j + 1], **with_cache(cache), use_cache=True)
            cache = cache_of(res)
            decoded.append(res.logits.numpy())
    return out, decoded


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_new_families_match_transformers_past_the_window(family, tmp_path):
    hf = tiny_hf(NEW_FAMILIES[family]())
    ckpt = save(hf, tmp_path / "ckpt")
    weights = open_weights(ckpt)
    built = tmp_path / "built.onnx"
    contract = build_graph(weights, built)
    cfg, n = weights.config, TINY["num_hidden_layers"]
    assert weights.parameters() == sum(p.numel() for p in hf.parameters())
    assert contract.attention_windows == tuple(cfg.window(i) for i in range(n))
    assert check_built(weights, built, contract, reference=load_model(ckpt).model)["how"] == "full and layer by layer"

    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], (1, 24))
    for steps in (3, 18):  # a long prefill; a 6-token one whose decode steps cross every window (and LongRoPE's 8)
        ours, our_steps = graph_run(built, ids, steps=steps)
        ref, ref_steps = transformers_run(hf, ids, steps=steps)
        assert np.abs(ref).max() > 1.0  # not flat logits: parity means something
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        for got, want in zip(our_steps, ref_steps):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    nodes = onnx.load(str(built), load_external_data=False).graph.node
    ops = {op: sum(nd.op_type == op for nd in nodes) for op in
           ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu",
            "Sigmoid", "MatMul")}
    norms_per_layer = 2 * cfg.qk_norm + 2 * cfg.sandwich_norm  # every layer fused, local and global alike
    gelu = family.startswith("gemma")
    assert ops == {"GroupQueryAttention": n, "SimplifiedLayerNormalization": 1 + n * norms_per_layer,
                   "SkipSimplifiedLayerNormalization": 2 * n, "FastGelu": n if gelu else 0,
                   "Sigmoid": 0 if gelu else n, "MatMul": 4 * n + 1}
    if family == "phi3":  # half of each head rotated; the short and long tables computed from 8 frequencies each
        tables = {t.name: list(t.dims) for t in onnx.load(str(built), load_external_data=False).graph.initializer}
        assert tables["gqa.cos_cache.short/inv_freq"] == tables["gqa.cos_cache.long/inv_freq"] == [1, 8]
    gqa = [nd for nd in nodes if nd.op_type == "GroupQueryAttention"]
    windows = [next((a.i for a in nd.attribute if a.name == "local_window_size"), None) for nd in gqa]
    assert windows == [cfg.window(i) for i in range(n)]
    if family == "gemma2":
        assert all(next(a.f for a in nd.attribute if a.name == "softcap") == 2.0 for nd in gqa)
        assert [nd.op_type for nd in nodes[-3:]] == ["Div", "Tanh", "Mul"] and nodes[-1].output[0] == "logits"
    if family == "gemma3_text":
        assert [nd.input[7] for nd in gqa] == ["gqa.cos_cache_local", "gqa.cos_cache", "gqa.cos_cache_local"]
        assert all(next(a.f for a in nd.attribute if a.name == "scale") == pytest.approx(24 ** -0.5) for nd in gqa)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "longrope", "short_factor": [1.0 + i / 50 for i in range(8)],
                                      "long_factor": [2.0 + i / 10 for i in range(8)], "factor": 4.0,
                                      "original_max_position_embeddings": 512}])
def test_rotary_tables_are_computed_in_the_graph_bit_for_bit(scaling):
    """The cos/sin caches are nodes over the frequencies, not stored tables; onnxruntime's float64 products and
    functions give numpy's table exactly, for each rope kind (LongRoPE: the short rows, then the long ones)."""
    c = Contract(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, hidden_size=32, vocab_size=8,
                 max_position_embeddings=2048, attention_windows=(None,), rope_theta=10000.0, rope_scaling=scaling)
    graph = onnx.helper.make_graph(
        [], "rope", [onnx.helper.make_tensor_value_info("gqa.total64", onnx.TensorProto.INT64, [1])],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["rows", 8]) for n in ("cos", "sin")],
        [onnx.numpy_helper.from_array(np.array([1], np.int64), "gqa.axis1")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    add_rotary_caches(model, c, 10000.0, scaling, ("cos", "sin"))
    assert max(int(np.prod(t.dims)) for t in model.graph.initializer) <= 8  # frequencies only, no table
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for total, long in [(100, False), (2000, True)][:2 if scaling and scaling["rope_type"] == "longrope" else 1]:
        got = session.run(None, {"gqa.total64": np.array([total], np.int64)})
        want = rotary_table(c, 10000.0, scaling, long=long)
        rows = total if long or scaling and scaling["rope_type"] == "longrope" else c.max_position_embeddings
        for g, w in zip(got, want):
            assert g.dtype == np.float32 and g.shape == (rows, 8)
            np.testing.assert_array_equal(g, w[:rows])
    if scaling and scaling["rope_type"] == "longrope":
        assert not np.array_equal(got[0][:100], session.run(None, {"gqa.total64": np.array([100], np.int64)})[0])


def test_traced_fusion_refuses_what_only_the_builder_fuses(tmp_path):
    ckpt = save(tiny_hf(NEW_FAMILIES["mistral"]()), tmp_path / "ckpt")
    export_onnx(load_model(ckpt).model, tmp_path / "traced.onnx")
    with pytest.raises(UserError, match="traced mistral graph with sliding-window attention is not supported: "
                                        "export it with --graph built"):
        optimize(tmp_path / "traced.onnx", tmp_path / "fused.onnx", OptimizeConfig(check_parity=False))
    phi3 = save(tiny_hf(NEW_FAMILIES["phi3"]()), tmp_path / "phi3")
    with pytest.raises(UserError, match="LongRoPE switches its rotary factors .* export with --graph built"):
        export_onnx(load_model(phi3).model, tmp_path / "phi3.onnx")


def test_weights_stream_into_external_data(tmp_path):
    ckpt = save(tiny_hf(LlamaConfig(**TINY)), tmp_path / "ckpt")
    built = tmp_path / "m.onnx"
    build_graph(open_weights(ckpt), built)
    proto = onnx.load(str(built), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in external} >= {"model.embed_tokens.weight", "model.lm_head.weight",
                                          "/model/layers.0/attn/qkv_proj.weight"}
    data = built.with_name("m.onnx.data").read_bytes()
    for t in external:  # every tensor lies where it says, aligned
        entry = {e.key: e.value for e in t.external_data}
        offset, length = int(entry["offset"]), int(entry["length"])
        assert offset % 64 == 0 and offset + length <= len(data)
    full = onnx.load(str(built))
    qkv = onnx.numpy_helper.to_array(next(t for t in full.graph.initializer
                                          if t.name == "/model/layers.1/attn/qkv_proj.weight"))
    from safetensors.numpy import load_file

    st = load_file(str(ckpt / "model.safetensors"))
    want = np.concatenate([st[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]).T
    np.testing.assert_array_equal(qkv, want)


def test_bf16_sharded_checkpoint(tmp_path):
    ref = tiny_hf(Qwen2Config(**TINY)).to(torch.bfloat16)
    ckpt = save(ref, tmp_path / "ckpt", max_shard_size="40KB")
    assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2
    weights = open_weights(ckpt)
    assert weights.storage_dtype == "BF16"
    contract = build_graph(weights, tmp_path / "m.onnx")
    reference = load_model(ckpt).model  # transformers upcasts the same bf16 values
    assert parity(reference, tmp_path / "m.onnx", contract, batch=1, seq=5).worst[1] < 1e-4

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    (ckpt / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(UserError, match="missing: the sharded checkpoint is incomplete"):
        open_weights(ckpt)


def write_q8_gguf(ref, path: Path, type_of=lambda name: "Q8_0", with_tokenizer: bool = False) -> None:
    """As write_gguf, with every 2-D tensor stored Q8_0 (llama.cpp's blocks of 32 int8 and a float16 scale), or
    in the type `type_of(tensor name)` names (any type gguf's quantize writes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)."""
    write_gguf(ref, path.with_suffix(".f32.gguf"), with_tokenizer=with_tokenizer)
    src = gguf.GGUFReader(str(path.with_suffix(".f32.gguf")))
    w = gguf.GGUFWriter(str(path), "llama")
    for field in src.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, kind)
    for t in src.tensors:
        arr = np.array(t.data).reshape([int(d) for d in reversed(t.shape)])
        if arr.ndim == 2:
            kind = gguf.GGMLQuantizationType[type_of(t.name)]
            w.add_tensor(t.name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_gguf_source_matches_transformers(kind, tmp_path):
    ref = tiny_hf(LlamaConfig(**{**TINY, "vocab_size": len(TOKENS)}, rms_norm_eps=1e-5))
    path = tmp_path / "tiny.gguf"
    (write_gguf(ref, path, with_tokenizer=False) if kind == "F32" else write_q8_gguf(ref, path))
    weights = open_weights(path)
    assert kind in weights.storage_dtype and weights.source["format"] == "gguf"
    contract = build_graph(weights, tmp_path / "m.onnx")
    reference = load_model(path).model  # transformers' own dequantization and q/k un-permutation
    assert parity(reference, tmp_path / "m.onnx", contract, batch=1, seq=6).worst[1] < 1e-4
    if kind == "F32":  # un-permuted back to the checkpoint's rows exactly
        np.testing.assert_array_equal(weights.tensor("layers.0.attn.k_proj.weight"),
                                      ref.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy())
        assert not np.array_equal(llama_cpp_permute(weights.tensor("layers.0.attn.k_proj.weight"), 2),
                                  weights.tensor("layers.0.attn.k_proj.weight"))


def test_layerwise_check_catches_a_wrong_graph(tmp_path):
    ckpt = save(tiny_hf(LlamaConfig(**TINY)), tmp_path / "ckpt")
    weights = open_weights(ckpt)
    built = tmp_path / "m.onnx"
    contract = build_graph(weights, built)
    result = check_built(weights, built, contract)
    assert result["how"] == "layer by layer" and max(result["max_abs_diff"].values()) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.onnx", "m.onnx.data"]  # no probe left

    for corrupt, where in (("layers.2.mlp.down_proj.weight", "layer 2"), ("layers.1.attn.k_proj.weight", "layer 1"),
                           ("norm.weight", "the logits")):
        bad = open_weights(ckpt)
        true_read = bad._reader
        bad._reader = lambda name, c=corrupt, r=true_read: r(name) * (1.01 if name == c else 1)
        build_graph(bad, tmp_path / "bad.onnx")
        with pytest.raises(UserError, match=f"differs from PyTorch at prefill, {where}"):
            check_built(weights, tmp_path / "bad.onnx", contract)  # the oracle reads the checkpoint's bytes


def test_cli_export_builds_and_optimize_has_nothing_to_fuse(tmp_path):
    ckpt = save(tiny_hf(LlamaConfig(**TINY)), tmp_path / "ckpt")
    run = tmp_path / "run"
    r = invoke("export", "--model", ckpt, "--out", run, "--json")
    results = json.loads(r.output)
    assert results["graph"] == "built" and results["parity_checked"] == "full and layer by layer"
    assert (run / "variants/fused/model.onnx.data").is_file() and not (run / "variants/fp32").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    # the model, and what other tools load beside it (no tokenizer: this checkpoint has none)
    assert set(manifest["artifacts"]["fused"]["files"]) == {f"variants/fused/{name}" for name in (
        "model.onnx", "model.onnx.data", "config.json", "generation_config.json", "genai_config.json")}
    assert "nothing to fuse" in invoke("optimize", run).output or "built fused" in invoke("optimize", run).output
    assert json.loads((run / "manifest.json").read_text()) == manifest  # a no-op changes nothing
    invoke("optimize", run, "--fp16")
    assert read_contract(onnx.load(str(run / "variants/fused-fp16/model.onnx"))).kv_dtype == "float16"


def test_cli_graph_choice(tmp_path):
    from tests.pipeline.conftest import make_hf_checkpoint

    gpt2 = make_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    one_line_error(invoke("export", "--model", gpt2, "--out", tmp_path / "a", "--graph", "built", ok=False),
                   "--graph traced")
    assert json.loads(invoke("export", "--model", gpt2, "--out", tmp_path / "b", "--json").output)["graph"] == "traced"
    llama = make_hf_checkpoint(tmp_path / "llama", "llama")
    r = json.loads(invoke("export", "--model", llama, "--out", tmp_path / "c", "--graph", "traced", "--json").output)
    assert r["variant"] == "fp32" and (tmp_path / "c/variants/fp32/model.onnx").is_file()


def test_refusals(tmp_path):
    ckpt = save(tiny_hf(LlamaConfig(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 4})), tmp_path / "a")
    with pytest.raises(UserError, match="head_dim 8 is not a multiple of 16"):
        build_graph(open_weights(ckpt), tmp_path / "m.onnx")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(UserError, match="do not belong together"):
        open_weights(ckpt).tensor("layers.0.mlp.up_proj.weight")
    with pytest.raises(NotBuildable):
        from tests.pipeline.conftest import make_hf_checkpoint
        open_weights(make_hf_checkpoint(tmp_path / "g", "gpt2"))


def test_quantize_memory_estimate_counts_copies_hessians_and_packed_weights(tmp_path):
    from exporters.quantization.memory import BASE_BYTES, GGUF_COPIES, MODEL_COPIES, PACKED_COPIES, \
        WEIGHT_ONLY_COPIES, estimate

    ckpt = save(tiny_hf(LlamaConfig(**TINY)), tmp_path / "ckpt")
    built = tmp_path / "m.onnx"
    build_graph(open_weights(ckpt), built)
    h, i, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    # per layer: qkv, o_proj and gate_up read width-64 inputs, down_proj a width-96 one; lm_head its own
    hessians = 8 * (layers * (3 * h * h + i * i) + h * h)
    size = built.stat().st_size + built.with_name("m.onnx.data").stat().st_size
    # (K, N) of qkv (64 query + 2 x 32 key/value), o_proj, gate_up, down_proj per layer, and lm_head; blocks of 32
    shapes = [(h, 128), (h, h), (h, 2 * i), (i, h)] * layers + [(h, TINY["vocab_size"])]
    blocks = sum(-(-k // 32) * n for k, n in shapes)
    packed_4_and_8 = blocks * (16 + 4) + blocks * (32 + 4)  # codes and a float32 scale per block, at each width
    w4 = estimate(built, "w4")
    assert (w4.hessian_bytes, w4.model_bytes, w4.copies, w4.packed_bytes) == (hessians, size, WEIGHT_ONLY_COPIES,
                                                                              packed_4_and_8)
    logits = 4 * TINY["vocab_size"] * (256 + 3 * 128)  # the ranking's reference rows and a judged window's
    assert w4.logits_bytes == logits
    assert w4.total == int(BASE_BYTES + size + hessians + logits + PACKED_COPIES * packed_4_and_8)
    assert estimate(built, "w4", window=64, sensitivity_tokens=100).logits_bytes == 4 * TINY["vocab_size"] * 292
    rotated = estimate(built, "w4", rotate=True)  # two float64 copies of the largest weight, the packed gate_up
    assert rotated.rotation_bytes == 16 * max(h * 2 * i, h * TINY["vocab_size"]) and w4.rotation_bytes == 0
    assert rotated.total == w4.total + rotated.rotation_bytes and estimate(built, "w8", rotate=True).rotation_bytes == 0
    assert estimate(built, "w4", "nearest").hessian_bytes == 0 and estimate(built, "static").hessian_bytes == 0
    lean = estimate(built, "w4", "nearest", search=False)  # written and measured: no ranking rows, 4 bits only
    assert (lean.copies, lean.logits_bytes, lean.packed_bytes) == (WEIGHT_ONLY_COPIES,
                                                                   4 * TINY["vocab_size"] * 3 * 128, blocks * 20)
    assert estimate(built, "w8", "nearest").packed_bytes == blocks * 36  # w8 has no search
    blocks_64 = sum(-(-k // 64) * n for k, n in shapes)
    assert estimate(built, "w4", block_size=64).packed_bytes == blocks_64 * ((32 + 4) + (64 + 4))
    assert estimate(built, "gguf").copies == GGUF_COPIES and estimate(built, "gguf").packed_bytes == 0
    w8a8 = estimate(built, "w8a8")  # Hessians in bounded groups (one here); GPTQ's codes and the fallback's blocks
    assert (w8a8.copies, w8a8.hessian_bytes, w8a8.packed_bytes) == (MODEL_COPIES["w8a8"], hessians, blocks * 36)
    assert estimate(built, "w8a8", search=False).packed_bytes == blocks * 18  # the codes alone
    assert estimate(built, "w8a8", "nearest").packed_bytes == 0
    tied = tmp_path / "tied.onnx"  # its table is stored once but split for quantizing: counted twice
    build_graph(open_weights(save(tiny_hf(LlamaConfig(**TINY, tie_word_embeddings=True)), tmp_path / "t")), tied)
    files = tied.stat().st_size + tied.with_name("tied.onnx.data").stat().st_size
    assert estimate(tied, "w4").model_bytes == files + 4 * TINY["vocab_size"] * h


def test_streamed_gptq_groups_hessians_within_the_budget():
    from exporters.quantization.packs import hessian_groups

    widths = {"a": 64, "b": 96, "c": 64}  # 32 KiB, 72 KiB and 32 KiB of float64 Hessians
    assert hessian_groups(widths, 1 << 30) == [["a", "b", "c"]]
    assert hessian_groups(widths, 8 * (64 * 64 + 96 * 96)) == [["a", "b"], ["c"]]
    assert hessian_groups(widths, 8 * 64 * 64) == [["a"], ["b"], ["c"]]  # one over the budget is a group alone
    assert hessian_groups({}, 1) == []


def test_quantize_refuses_before_starting_when_over_max_memory(tmp_path):
    from tests.pipeline.conftest import TEXT, make_hf_checkpoint

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    ckpt = make_hf_checkpoint(tmp_path / "ckpt")
    run = tmp_path / "run"
    invoke("export", "--model", ckpt, "--out", run)
    before = (run / "manifest.json").read_bytes()
    r = invoke("quantize", run, "--recipe", "w4", "--calib-text", text_file, "--window", "32", "--max-memory", "0.5",
               ok=False)
    one_line_error(r, "needs about", "more than --max-memory 0.5 GiB", "--weight-rounding nearest needs no Hessians")
    assert "--no-search" not in r.output  # the lean way does not fit 0.5 GiB either: not offered
    from exporters.quantization.memory import estimate

    source = run / "variants/fused/model.onnx"
    full, lean = estimate(source, "w4", "gptq", 32), estimate(source, "w4", "nearest", 32, search=False)
    limit = (full.total + lean.total) / 2 / (1 << 30)
    r = invoke("quantize", run, "--recipe", "w4", "--calib-text", text_file, "--window", "32", "--max-memory",
               f"{limit:.6f}", ok=False)
    one_line_error(r, "--weight-rounding nearest needs no Hessians; --weight-rounding nearest --no-search "
                   f"--no-rotate needs about {lean.total / (1 << 30):.1f} GiB")
    assert (run / "manifest.json").read_bytes() == before and not (run / "variants/w4").exists()
    report = json.loads(invoke("quantize", run, "--recipe", "w4", "--calib-text", text_file, "--window", "32",
                               "--calib-windows", "4",
                               "--valid-windows", "0", "--json").output)
    memory = report["memory"]
    assert memory["limit_bytes"] > 0 and memory["peak_rss_bytes"] > 0
    assert memory["logits_bytes"] == 4 * 256 * (256 + 3 * 32)  # this checkpoint's vocabulary, --window 32
    assert memory["estimate_bytes"] == int(memory["model_bytes"] * memory["model_copies"] + memory["hessian_bytes"]
                                           + memory["logits_bytes"] + 2 * memory["packed_bytes"]
                                           + memory["rotation_bytes"] + (600 << 20))
    assert memory["rotation_bytes"] > 0  # w4 rotates by default


def test_a_tied_table_stored_once_is_split_for_the_quantizers_and_shared_again_by_8_bit_blocks(tmp_path):
    from exporters.quantization.embedding import untie_embeddings

    ckpt = save(tiny_hf(LlamaConfig(**TINY, tie_word_embeddings=True)), tmp_path / "ckpt")
    built = tmp_path / "m.onnx"
    build_graph(open_weights(ckpt), built)
    model = onnx.load(str(built))
    assert untie_embeddings(model) == ["model.lm_head.weight"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["model.embed_tokens.weight"], inits["model.lm_head.weight"].T)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert gather.input[0] == "model.embed_tokens.weight" and not gather.attribute
    assert "Transpose" not in {n.op_type for n in model.graph.node}
    onnx.save(model, str(tmp_path / "untied.onnx"))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (1, 9))
    np.testing.assert_array_equal(logits(tmp_path / "untied.onnx", ids), logits(built, ids))
    assert untie_embeddings(model) == []  # nothing left to split
    from exporters.quantize import QuantConfig, quantize

    rng = np.random.default_rng(1)
    calib = [list(rng.integers(0, TINY["vocab_size"], 40)) for _ in range(4)]
    inits_float = inits["model.embed_tokens.weight"]
    for recipe in ("w8a8", "w4", "w8"):  # (w4 not rotated: the tie through a rotation's map is test_packs')
        report = quantize(built, tmp_path / f"{recipe}.onnx", calib,
                          QuantConfig(recipe=recipe, num_prefill=4, seq_len=32, num_decode_steps=4,
                                      rotate=recipe == "w8a8"))
        assert "/model/lm_head/MatMul" not in report["float_matmuls"]
        q = onnx.load(str(tmp_path / f"{recipe}.onnx"))
        assert not [t.name for t in q.graph.initializer if t.name == "model.lm_head.weight"]  # no float copy left
        if recipe == "w8a8":  # a static int8 head (smoothed, rotated): the Gather reads its int8 columns where
            share = report["embedding"]["static_head_share"]  # they are fine enough a table, else blocks of its own
            assert share["shared"] == (share["relative_error"] <= 2.2 * share["own_blocks_relative_error"])
            tables = [t.name for t in q.graph.initializer
                      if sorted(t.dims) == sorted([TINY["vocab_size"], TINY["hidden_size"]])]
            assert report["embedding"]["shared_with_head"] == share["shared"]
            assert tables == ["model.lm_head.weight_quantized"] + ([] if share["shared"] else [
                "model.embed_tokens.weight_Q8"])
            continue
        # weight-only: the head is 8-bit MatMulNBits (w4 keeps it at 8) and the embedding reads its blocks
        assert report["tied_table_shared"] and report["embedding"]["tables"] == []
        assert [(t.name, t.data_type) for t in q.graph.initializer if TINY["vocab_size"] in t.dims] == [
            ("model.lm_head.weight_Q8", onnx.TensorProto.UINT8),
            ("model.lm_head.weight_scales_f16", onnx.TensorProto.FLOAT16)]  # read through a Cast to float
        shared = next(n for n in q.graph.node if n.name.endswith("/shared/Reshape")).output[0]
        q.graph.output.append(onnx.helper.make_tensor_value_info(shared, onnx.TensorProto.FLOAT, None))
        onnx.save(q, str(tmp_path / "probe.onnx"))
        sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
        c = read_contract(q)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 **dict.fromkeys(past_names(c.num_layers), np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32))}
        rows = sess.run([shared], feeds)[0]
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
        blocks = inits["model.lm_head.weight_Q8"][ids[0]]
        scales = stored_scales(GraphIndex(q), "model.lm_head.weight_scales")[ids[0]]
        want = ((blocks.astype(np.float32) - 128) * scales[..., None]).reshape(ids.shape[1], -1)
        np.testing.assert_array_equal(rows[0], want)  # exactly the head's own 8-bit weights, row by row
        np.testing.assert_allclose(rows[0], inits_float[ids[0]], atol=np.abs(inits_float).max() / 100)


def test_logits_to_keep_computes_only_the_last_positions(tmp_path):
    from runtimes.generate import Generator
    from runtimes.session import open_session

    ckpt = save(tiny_hf(LlamaConfig(**TINY, tie_word_embeddings=True)), tmp_path / "ckpt")
    built = tmp_path / "m.onnx"
    build_graph(open_weights(ckpt), built)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(built), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_overridable_initializers()] == ["logits_to_keep"]
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (1, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds.update(dict.fromkeys(past_names(TINY["num_hidden_layers"]), np.zeros((1, 2, 0, 16), np.float32)))
    every = sess.run(["logits"], feeds)[0]  # not fed: every position, as Optimum and onnxruntime-genai expect
    assert every.shape == (1, 9, TINY["vocab_size"])
    for k in (1, 4, 9):
        kept = sess.run(["logits"], {**feeds, "logits_to_keep": np.array(k)})[0]
        assert kept.shape == (1, k, TINY["vocab_size"])
        np.testing.assert_array_equal(kept, every[:, -k:])
    generator = Generator(open_session(built, threads=1))
    assert "logits_to_keep" in generator.session.input_names
    np.testing.assert_array_equal(generator.prefill(ids[0], 12), every[:, -1])
    # the in-place cache takes the prefill's presents once, then decodes as before
    plain = Generator(open_session(built, threads=1))
    plain._keeps_last = False  # every position's logits, the cache shared from the prefill on
    host = Generator(open_session(built, threads=1), io_binding=False)
    runs = [g.prefill(ids[0], 16) for g in (generator, plain, host)]
    for _ in range(5):
        for a in runs[1:]:
            np.testing.assert_allclose(a, runs[0], atol=1e-5)
        token = int(runs[0].argmax())
        runs = [g.step(token) for g in (generator, plain, host)]


def test_the_built_graph_rotates_through_its_position_slices(tmp_path):
    """R1 (exporters/rotation.py) follows the residual stream through logits_to_keep's Slices to the final norm
    and lm_head, so w8a8 gets its rotation on built graphs as on traced ones; exact in float."""
    from exporters.quantization.embedding import untie_embeddings
    from exporters.rotation import rotate_residual

    ckpt = save(tiny_hf(LlamaConfig(**TINY, tie_word_embeddings=True)), tmp_path / "ckpt")
    built = tmp_path / "m.onnx"
    build_graph(open_weights(ckpt), built)
    model = onnx.load(str(built))
    untie_embeddings(model)
    assert rotate_residual(model) is None
    onnx.save(model, str(tmp_path / "rotated.onnx"))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (1, 9))
    np.testing.assert_allclose(logits(tmp_path / "rotated.onnx", ids), logits(built, ids), atol=1e-4)


def test_a_shipped_model_keeps_its_weights_beside_it_and_a_resave_never_appends_or_leaves_stale_data(tmp_path):
    """Quantized variants save their weights to model.onnx.data from 1 MiB on (onnxruntime then holds no second
    copy of the file); saving again to the same path writes the data file afresh (onnx appends to one it finds),
    and an inline save removes one a previous save left."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_io import SHIPPED_EXTERNAL_THRESHOLD, files_size, model_files, save_model_auto

    def model(n: int) -> onnx.ModelProto:
        w = (np.arange(n * 256) % 7 - 3).astype(np.float32).reshape(n, 256)  # small integers: sums are exact
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                                  [numpy_helper.from_array(w, "w")])
        return helper.make_model(graph)

    assert 4 * 2048 * 256 > SHIPPED_EXTERNAL_THRESHOLD > 4 * 8 * 256  # 2 MiB and 8 KiB of weights
    path = tmp_path / "model.onnx"
    save_model_auto(model(2048), path)  # a float intermediate: inline below 2 GB, as before
    assert model_files(path) == [path]
    for _ in range(3):  # as a search writes candidate after candidate to one path
        save_model_auto(model(2048), path, shipped=True)
        assert model_files(path) == [path, tmp_path / "model.onnx.data"]
        assert (tmp_path / "model.onnx.data").stat().st_size == 4 * 2048 * 256  # rewritten, not appended to
    x = np.ones((1, 2048), np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x @ numpy_helper.to_array(model(2048).graph.initializer[0]))
    save_model_auto(model(8), path, shipped=True)  # too small to bother: inline, and the old data file is gone
    assert model_files(path) == [path] and files_size(path) == path.stat().st_size


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "llama"])
def test_a_graph_sized_for_a_context_computes_the_same_logits_and_refuses_past_it(family, tmp_path):
    """`write_with_context`: rotary tables of 24 rows instead of 64 (Gemma's two bases; Phi-3's LongRoPE, whose
    long-factor table is used past 8 positions here), the same logits bit for bit within the context, and a
    longer request refused by the runtime from the contract, in one line."""
    from exporters.optimize import write_with_context
    from runtimes.errors import RuntimeUserError
    from runtimes.generate import greedy_tokens
    from runtimes.session import open_session

    weights = open_weights(save(tiny_hf({**FAMILIES, **NEW_FAMILIES}[family]()), tmp_path / "ckpt"))
    built = tmp_path / "built" / "model.onnx"
    built.parent.mkdir()
    full = build_graph(weights, built)
    sized = built.with_name("sized.onnx")
    contract = write_with_context(built, sized, 24)
    assert full.max_position_embeddings == 64 and contract == read_contract(onnx.load(str(sized)))
    assert contract.max_position_embeddings == 24
    graph = onnx.load(str(sized), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    rows = [float(onnx.numpy_helper.to_array(inits[n.input[1]])) for n in graph.node
            if n.op_type == "Range" and n.name.startswith("gqa/")]
    assert rows and set(rows) == {24.0} and len(rows) == (2 if family in ("gemma3_text", "phi3") else 1)
    ids = np.random.default_rng(2).integers(0, TINY["vocab_size"], (1, 24))
    for steps in (3, 18):
        before, before_steps = graph_run(built, ids, steps)
        after, after_steps = graph_run(sized, ids, steps)
        np.testing.assert_array_equal(after, before)
        for a, b in zip(after_steps, before_steps):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeUserError, match="exceeds the model's context of 24") as e:
        greedy_tokens(open_session(sized), list(range(20)), 8)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="context 65: give a number of positions from 1 to the model's 64"):
        write_with_context(built, built.with_name("other.onnx"), 65)
