"""models/hf.py and models/checkpoint.py against transformers itself, on tiny random-init models built from configs.

Every family is checked the way the exporter uses the decoder: a left-padded prefill, then one decode step fed
with our own cache, logits within 1e-4 of the transformers implementation. Nothing is downloaded.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, BertConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          MistralConfig, Phi3Config, PreTrainedModel, Qwen2Config, Qwen3Config)

from models.checkpoint import save_checkpoint
from models.decoder import Decoder, DecoderConfig
from models.errors import UserError
from models.hf import decoder_from_hf, export_tokenizer, load_hf_reference, load_model
from tests.hf_cache import cache_of, with_cache

torch.set_num_threads(1)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
TOL = 1e-4
PHI3_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=0)  # its defaults lie outside a tiny vocabulary
# Gemma 3 with every switch away from its default: a window shorter than the test's sequences, local and global
# layers with different rotary bases, an attention scale that is not head_dim's, a decoupled head width
GEMMA3 = dict(TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace the init (zero biases, unit norms) by noise, so a mis-mapped bias or norm cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tiny_hf(config, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    return model.float().eval()


FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama_tied_llama3_rope": lambda: LlamaConfig(**TINY, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama_biases": lambda: LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=4),  # the 7-token batch runs past every window
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen2_window_from_layer_1": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                                     max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),  # 4 heads x 16 != hidden 32: a head width of its own
    "gemma3_text": lambda: Gemma3TextConfig(**GEMMA3),
    # Gemma 2: soft-capped attention scores and logits (caps low enough to bite on these random weights)
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=2.0,
                                   final_logit_softcapping=3.0),
    "phi3_partial_rotary": lambda: Phi3Config(**TINY, partial_rotary_factor=0.5, **PHI3_IDS),
    # LongRoPE past a pretraining context of 6: the 7-token batch takes the long factors
    "phi3_longrope": lambda: Phi3Config(**TINY, partial_rotary_factor=0.5, original_max_position_embeddings=6,
                                        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5],
                                                      "long_factor": [3.0, 7.0]}, **PHI3_IDS),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                               bos_token_id=0, eos_token_id=1),
}


def batch(vocab: int, seed: int = 1):
    """Two rows of 7 tokens, the second left-padded by 3, with the positions a padded prefill uses."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = torch.randint(0, vocab, (2, 1), generator=g)
    return ids, mask, pos, nxt


def assert_matches(ours: Decoder, ref: PreTrainedModel, vocab: int) -> None:
    """Prefill with left padding, then a decode step on our own cache: logits equal transformers' on real tokens."""
    ids, mask, pos, nxt = batch(vocab)
    with torch.no_grad():
        logits, past = ours(ids, mask, pos)
        ref_out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        real = mask.bool()
        torch.testing.assert_close(logits[real], ref_out.logits[real], atol=TOL, rtol=0)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        pos2 = pos[:, -1:] + 1
        step, _ = ours(nxt, mask2, pos2, past)
        ref_step = ref(input_ids=nxt, attention_mask=mask2, position_ids=pos2,
                       **with_cache(cache_of(ref_out)), use_cache=True)
        torch.testing.assert_close(step, ref_step.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_logits_match_transformers(name, tmp_path):
    ref = tiny_hf(FAMILIES[name]())
    ref.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    family = ref.config.model_type
    assert loaded.source == {"path": str(tmp_path.resolve()), "format": "hf", "family": family,
                             "architecture": type(ref).__name__}
    assert loaded.model.config.family == family and not loaded.model.training
    assert loaded.model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert_matches(loaded.model, ref, ref.config.vocab_size)
    assert_matches(loaded.model, load_hf_reference(tmp_path), ref.config.vocab_size)


def test_gpt2_and_llama_token_ids(tmp_path):
    tiny_hf(FAMILIES["gpt2"]()).save_pretrained(tmp_path / "gpt2")
    loaded = load_model(tmp_path / "gpt2")
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 1)
    cfg = loaded.model.config
    assert (cfg.norm, cfg.positions, cfg.activation, cfg.gated_mlp, cfg.num_kv_heads) == (
        "layer", "learned", "gelu_tanh", False, 4)


def test_sliding_window_limits_attention_not_context(tmp_path):
    tiny_hf(FAMILIES["mistral"]()).save_pretrained(tmp_path / "mistral")
    cfg = load_model(tmp_path / "mistral").model.config
    assert (cfg.max_position_embeddings, cfg.sliding_window, cfg.layer_types) == (64, 4, None)
    assert [cfg.window(i) for i in range(2)] == [4, 4] and not cfg.extra
    qwen2 = decoder_from_hf(tiny_hf(FAMILIES["qwen2_window_from_layer_1"]())).config
    assert [qwen2.window(i) for i in range(2)] == [None, 4]
    unused = decoder_from_hf(tiny_hf(Qwen2Config(**TINY, use_sliding_window=False, sliding_window=4))).config
    assert [unused.window(i) for i in range(2)] == [None, None]

    gemma = decoder_from_hf(tiny_hf(FAMILIES["gemma3_text"]())).config
    assert [gemma.window(i) for i in range(2)] == [4, None]
    assert [gemma.rope(i) for i in range(2)] == [(10.0, None), (10000.0, None)]
    assert (gemma.head_dim, gemma.qk_norm, gemma.sandwich_norm) == (16, True, True)
    assert gemma.embed_scale == pytest.approx(32 ** 0.5) and gemma.attention_scale == pytest.approx(24 ** -0.5)

    # a sequence far past the window: prefill and decode still equal transformers, position by position
    ref = tiny_hf(FAMILIES["gemma3_text"]())
    ours = decoder_from_hf(ref)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, past = ours(ids[:, :39])
        ref_out = ref(input_ids=ids[:, :39], use_cache=True)
        torch.testing.assert_close(logits, ref_out.logits, atol=TOL, rtol=0)
        step, _ = ours(ids[:, 39:], past_key_values=past)
        ref_step = ref(input_ids=ids[:, 39:], **with_cache(cache_of(ref_out)), use_cache=True)
        torch.testing.assert_close(step, ref_step.logits, atol=TOL, rtol=0)


def test_longrope_switches_with_the_sequence_length():
    """transformers picks LongRoPE's factors per forward call by the sequence length so far: a short prefill rotates
    with the short factors, and a decode step past the pretraining context with the long ones, while the keys
    already cached keep their rotation. The decoder does the same."""
    ref = tiny_hf(FAMILIES["phi3_longrope"]())
    ours = decoder_from_hf(ref)
    assert ours.config.rotary_dim == 4 and ours.config.rope_scaling["factor"] == pytest.approx(64 / 6)
    ids = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, past = ours(ids[:, :5])
        ref_out = ref(input_ids=ids[:, :5], use_cache=True)
        torch.testing.assert_close(logits, ref_out.logits, atol=TOL, rtol=0)
        cache = cache_of(ref_out)
        for j in range(5, 9):  # positions 5..8: the sequence passes 6 tokens at j = 6
            step, past = ours(ids[:, j:j + 1], past_key_values=past)
            ref_step = ref(input_ids=ids[:, j:j + 1], **with_cache(cache), use_cache=True)
            cache = cache_of(ref_step)
            torch.testing.assert_close(step, ref_step.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("config, message", [
    (lambda: Gemma3TextConfig(**GEMMA3, final_logit_softcapping=30.0), "final_logit_softcapping=30.0 is not"),
    (lambda: Gemma3TextConfig(**GEMMA3, use_bidirectional_attention=True), "use_bidirectional_attention"),
])
def test_unsupported_switches_refused(config, message):
    with pytest.raises(UserError, match=message):
        decoder_from_hf(tiny_hf(config()))


def test_sharded_checkpoint(tmp_path):
    ref = tiny_hf(FAMILIES["qwen2"]())
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_matches(load_model(tmp_path).model, ref, ref.config.vocab_size)


def tiny_decoder(**kw) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, **kw))
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_save_checkpoint_round_trip(tied, tmp_path):
    ours = tiny_decoder(tie_word_embeddings=tied)
    tok = tmp_path / "tok.json"
    tok.write_text('{"fake": "tokenizer"}')
    out = save_checkpoint(ours, tmp_path / "ckpt", tokenizer_json=tok,
                          extra={"bos_token_id": 3, "eos_token_id": 4, "steps": 10})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok.json"]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline"]["extra"]["steps"] == 10 and config["pipeline"]["decoder"]["num_layers"] == 2
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert_matches(ours, hf, 128)
    loaded = load_model(out)
    assert loaded.source["format"] == "pipeline" and loaded.model.config.extra["pipeline"]["steps"] == 10
    assert (loaded.bos_token_id, loaded.eos_token_id) == (3, 4)
    assert_matches(loaded.model, hf, 128)
    assert export_tokenizer(out, tmp_path / "tok_out").read_text() == tok.read_text()


def test_save_checkpoint_replaces_existing_and_refuses_non_llama(tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(tiny_decoder(), out)
    (out / "stale.txt").write_text("old")
    save_checkpoint(tiny_decoder(rope_theta=500000.0), out)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 500000.0
    with pytest.raises(UserError, match="only Llama-shaped"):
        save_checkpoint(tiny_decoder(norm="layer", positions="learned", activation="gelu_tanh", gated_mlp=False),
                        tmp_path / "gpt2like")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
TOKENS = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K row order: each head's rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ref: PreTrainedModel, path, with_tokenizer: bool = True) -> None:
    """An F32 GGUF as llama.cpp writes it: its tensor names, byte-level BPE; for its llama architecture permuted
    Q/K, for gemma3 the norms stored as 1 + weight, q/k norms and the sandwich norms."""
    c = ref.config
    gemma = c.model_type == "gemma3_text"
    arch = {"gemma3_text": "gemma3", "qwen3": "qwen3"}.get(c.model_type, "llama")
    permute = arch == "llama"
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    if gemma:
        sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if arch != "llama":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if gemma:
        w.add_sliding_window(c.sliding_window)
        w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    else:
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([gguf.TokenType.NORMAL] * (len(TOKENS) - 1) + [gguf.TokenType.CONTROL])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(len(TOKENS) - 1)
        w.add_eos_token_id(len(TOKENS) - 1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if arch != "llama":
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if gemma:
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q" and permute:
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif gguf_name == "attn_k" and permute:
                t = llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:  # tied models (SmolLM2) ship without output.weight: llama.cpp reuses token_embd
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(TOKENS)}, [tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_gguf_llama(tmp_path):
    ref = tiny_hf(LlamaConfig(**{**TINY, "vocab_size": len(TOKENS)}, rms_norm_eps=1e-5, rope_theta=50000.0))
    path = tmp_path / "tiny.gguf"
    write_gguf(ref, path)
    loaded = load_model(path)
    assert loaded.source == {"path": str(path.resolve()), "format": "gguf", "family": "llama",
                             "architecture": "LlamaForCausalLM"}
    assert (loaded.bos_token_id, loaded.eos_token_id) == (len(TOKENS) - 1, len(TOKENS) - 1)
    assert loaded.model.config.rope_theta == 50000.0 and not loaded.model.config.tie_word_embeddings
    assert_matches(loaded.model, ref, len(TOKENS))

    exported = Tokenizer.from_file(str(export_tokenizer(path, tmp_path / "out")))
    text = "the cat in the hat"
    assert exported.encode(text).ids == reference_bpe().encode(text).ids
    assert exported.decode(exported.encode(text).ids) == text


def test_gguf_gemma3(tmp_path):
    """Gemma 3 as llama.cpp writes it (norms + 1, no q/k permutation). The GGUF carries no layer pattern, local
    rotary base or query scalar, so transformers (and we) take Gemma 3's defaults: every 6th layer global."""
    config = Gemma3TextConfig(**{**TINY, "vocab_size": len(TOKENS), "num_hidden_layers": 7}, head_dim=16,
                              sliding_window=4)
    ref = tiny_hf(config)
    path = tmp_path / "gemma.gguf"
    write_gguf(ref, path, with_tokenizer=False)
    loaded = load_model(path)
    cfg = loaded.model.config
    assert (loaded.source["family"], cfg.head_dim, cfg.sliding_window) == ("gemma3_text", 16, 4)
    assert [cfg.window(i) for i in range(7)] == [4, 4, 4, 4, 4, None, 4]
    assert_matches(loaded.model, ref, len(TOKENS))


def test_gguf_qwen3_with_its_own_head_width(tmp_path):
    """Qwen3's heads are wider than hidden / heads; transformers' GGUF reader does not read key_length for Qwen3,
    so the loader does (Qwen3-0.6B: 128, not 1024 / 16)."""
    ref = tiny_hf(Qwen3Config(**{**TINY, "vocab_size": len(TOKENS)}, head_dim=16))
    path = tmp_path / "qwen3.gguf"
    write_gguf(ref, path, with_tokenizer=False)
    loaded = load_model(path)
    assert (loaded.source["family"], loaded.model.config.head_dim) == ("qwen3", 16)
    assert_matches(loaded.model, ref, len(TOKENS))
    from models.weights import open_weights  # the builder's reader takes the same width

    np.testing.assert_array_equal(open_weights(path).tensor("layers.1.attn.k_norm.weight"),
                                  ref.state_dict()["model.layers.1.self_attn.k_norm.weight"].numpy())


def test_gguf_without_tokenizer(tmp_path):
    path = tmp_path / "bare.gguf"
    write_gguf(tiny_hf(LlamaConfig(**TINY)), path, with_tokenizer=False)
    assert export_tokenizer(path, tmp_path / "out") is None


def test_export_tokenizer_from_gpt2_vocab_files(tmp_path):
    tiny_hf(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(TOKENS), n_positions=64)).save_pretrained(
        tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOKENS)}))
    (tmp_path / "ckpt" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    out = export_tokenizer(tmp_path / "ckpt", tmp_path / "out")
    assert out == tmp_path / "out" / "tokenizer.json"
    text = "the in the"
    assert Tokenizer.from_file(str(out)).encode(text).ids == reference_bpe().encode(text).ids


def test_export_tokenizer_none_without_tokenizer(tmp_path):
    tiny_hf(LlamaConfig(**TINY)).save_pretrained(tmp_path / "ckpt")
    assert export_tokenizer(tmp_path / "ckpt", tmp_path / "out") is None


def test_decoder_from_hf_in_memory():
    ref = tiny_hf(Qwen2Config(**TINY))
    assert_matches(decoder_from_hf(ref), ref, 128)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass a local checkpoint directory"):
        load_model(tmp_path / "nope")


def test_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="looks like a Hub id, but nothing is downloaded"):
        load_model("meta-llama/Llama-3.2-1B")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(tmp_path)


def test_bert_is_unsupported(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"model_type 'bert' .* not supported; supported families: gpt2, llama"):
        load_model(tmp_path)


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "mamba_x"}', "model_type 'mamba_x' .* not supported"),
    ("{oops", "not a readable JSON file"),
])
def test_bad_config_json(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=message):
        load_model(tmp_path)


def test_weight_file_instead_of_directory(tmp_path):
    tiny_hf(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="pass its directory"):
        load_model(tmp_path / "model.safetensors")


def test_not_a_causal_decoder(tmp_path):
    config = LlamaConfig(**TINY, architectures=["LlamaForSequenceClassification"])
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a causal decoder"):
        load_model(tmp_path)


def test_config_without_weights(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no weights"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    tiny_hf(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(UserError, match=r"model\.safetensors.*corrupt or truncated") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(tiny_hf(LlamaConfig(**TINY)), path, with_tokenizer=False)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(UserError, match="cut.gguf"):
        load_model(path)
