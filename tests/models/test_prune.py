"""models/prune.py on tiny random-init checkpoints of each family it supports.

Exactness is proved by construction: a source whose layer, MLP channels or key/value group contributes exactly
nothing (its output weights zeroed) must lose exactly that part to pruning, with the logits unchanged; a source
pruned by layers alone must equal the source with those layers deleted by hand. The pruned checkpoint is then
read by transformers and by pipeline's own loader, which must agree.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, Phi3Config

from models.errors import UserError
from models.hf import load_model
from models.prune import PruneConfig, kept, prune
from tests.models.tiny_teacher import corpus_tokenizer, family_config, save, save_teacher, write_corpus

torch.set_num_threads(1)

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text")
EXACT = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus directory, tokenizer) shared by the module's tests."""
    root = tmp_path_factory.mktemp("prune-corpus")
    folder = write_corpus(root / "corpus")
    return folder, corpus_tokenizer(folder, root / "tokenizer.json")


def options(corpus_dir, **kw) -> PruneConfig:
    return PruneConfig(**{"multiple": 8, "seq_len": 16, "calib_windows": 8, "eval_windows": 8,
                          "corpus": str(corpus_dir), **kw})


def token_batch(vocab: int, seed: int = 7) -> torch.Tensor:
    """Two rows of 20 tokens: longer than Gemma's sliding window of 8."""
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def teacher(corpus, family: str, path, **kw):
    _, tok = corpus
    return save_teacher(family_config(family, tok.vocab_size, tok.eos_id, **kw), tok, path)


def test_kept_rounds_to_the_multiple_and_never_grows():
    assert kept(64, 0.25, 8) == 48
    assert kept(64, 0.0, 32) == 64      # nothing removed: not rounded either
    assert kept(64, 0.9, 32) == 32      # at least one multiple
    assert kept(20, 0.1, 32) == 20      # never more than there is
    assert kept(100, 0.5, 32) == 64     # 50 rounds to 64, the nearest multiple


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_has_the_new_sizes_and_the_source_weights(family, corpus, tmp_path):
    source = teacher(corpus, family, tmp_path / "src")
    hidden = 0.0 if family == "gemma3_text" else 0.25
    report = prune(tmp_path / "src", tmp_path / "out", options(corpus[0], mlp=0.25, heads=0.5, hidden=hidden,
                                                               layers=1))
    hd = 16 if family in ("qwen3", "gemma3_text") else 8
    want = {"hidden_size": 32 if family == "gemma3_text" else 24, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": hd}
    cfg = AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert cfg.model_type == family
    assert {k: getattr(cfg, k) for k in want} == want == report["shape_after"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "pruning.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert not list(tmp_path.glob(".out*")), "a staging folder was left behind"
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    keep = record["kept"]
    assert len(keep["layers"]) == 2 and len(keep["hidden"]) == want["hidden_size"]
    assert [len(m) for m in keep["mlp"]] == [48, 48] and [len(g) for g in keep["groups"]] == [1, 1]
    if family == "gemma3_text":  # each kept layer keeps its own kind of attention
        assert cfg.layer_types == [source.config.layer_types[i] for i in keep["layers"]]

    small = load(tmp_path / "out")
    assert record["after"]["parameters"] == sum(p.numel() for p in small.parameters())
    assert record["before"]["parameters"] == sum(p.numel() for p in source.parameters())
    assert record["non_embedding_ratio"] < 0.8 and record["per_token_ratio"] < 1
    # every kept weight is the source's own: q_proj and down_proj of the first kept layer, sliced by the record
    old, H, M = keep["layers"][0], torch.tensor(keep["hidden"]), torch.tensor(keep["mlp"][0])
    g = keep["groups"][0][0]
    q_rows = torch.arange(g * 2 * hd, (g + 1) * 2 * hd)  # 2 query heads per group
    src_layer, new_layer = source.model.layers[old], small.model.layers[0]
    torch.testing.assert_close(new_layer.self_attn.q_proj.weight, src_layer.self_attn.q_proj.weight[q_rows][:, H],
                               atol=0, rtol=0)
    torch.testing.assert_close(new_layer.mlp.down_proj.weight, src_layer.mlp.down_proj.weight[H][:, M],
                               atol=0, rtol=0)
    if family == "qwen2":
        torch.testing.assert_close(new_layer.self_attn.k_proj.bias,
                                   src_layer.self_attn.k_proj.bias[g * hd:(g + 1) * hd], atol=0, rtol=0)

    # pipeline's own loader reads the pruned checkpoint into its Decoder with transformers' logits
    ours = load_model(tmp_path / "out").model
    ids = token_batch(cfg.vocab_size)
    with torch.no_grad():
        mine, _ = ours(ids)
    torch.testing.assert_close(mine, logits(small, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_layers_equals_deleting_them_by_hand(family, corpus, tmp_path):
    source = teacher(corpus, family, tmp_path / "src", layers=4)
    report = prune(tmp_path / "src", tmp_path / "out", options(corpus[0], layers=2))
    keep = report["kept"]["layers"]
    assert len(keep) == 2 and keep == sorted(keep)
    assert report["shape_after"]["hidden_size"] == 32 and report["shape_after"]["intermediate_size"] == 64
    ids = token_batch(source.config.vocab_size)
    pruned = logits(load(tmp_path / "out"), ids)
    source.model.layers = torch.nn.ModuleList([source.model.layers[i] for i in keep])
    source.config.num_hidden_layers = len(keep)
    torch.testing.assert_close(pruned, logits(source, ids), atol=EXACT, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_that_writes_nothing_is_the_one_removed(family, corpus, tmp_path):
    """Layer 1 with o_proj and down_proj zeroed is the identity on the residual stream: Block Influence 0, the
    least of all, so it goes, and the logits stay."""
    _, tok = corpus
    source = teacher(corpus, family, tmp_path / "unused")
    with torch.no_grad():
        source.model.layers[1].self_attn.o_proj.weight.zero_()
        source.model.layers[1].mlp.down_proj.weight.zero_()
    save(source, tok, tmp_path / "src")
    report = prune(tmp_path / "src", tmp_path / "out", options(corpus[0], layers=1))
    assert report["kept"]["layers"] == [0, 2]
    ids = token_batch(source.config.vocab_size)
    torch.testing.assert_close(logits(load(tmp_path / "out"), ids), logits(source, ids), atol=EXACT, rtol=0)
    assert report["after"]["perplexity"] == pytest.approx(report["before"]["perplexity"], rel=1e-5)


# how each family's dead MLP channels are made: zero rows of up_proj or gate_proj (act(g) * 0 = act(0) * u = 0:
# a zero activation) or zero columns of down_proj (an activation that writes nothing)
KILL_MLP = {"llama": "up", "qwen2": "down", "qwen3": "down", "gemma3_text": "gate"}


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_mlp_channels_are_the_ones_pruned_and_logits_stay(family, corpus, tmp_path):
    _, tok = corpus
    source = teacher(corpus, family, tmp_path / "unused")
    dead = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in source.model.layers:
            d = torch.randperm(64, generator=g)[:16].sort().values  # 16 of 64: mlp 0.25 removes exactly them
            dead.append(d.tolist())
            if KILL_MLP[family] == "down":
                layer.mlp.down_proj.weight[:, d] = 0
            else:
                getattr(layer.mlp, f"{KILL_MLP[family]}_proj").weight[d] = 0
    save(source, tok, tmp_path / "src")
    report = prune(tmp_path / "src", tmp_path / "out", options(corpus[0], mlp=0.25))
    assert report["kept"]["mlp"] == [sorted(set(range(64)) - set(d)) for d in dead]
    assert report["shape_after"]["intermediate_size"] == 48
    ids = token_batch(source.config.vocab_size)
    torch.testing.assert_close(logits(load(tmp_path / "out"), ids), logits(source, ids), atol=EXACT, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_silent_kv_group_is_the_one_pruned_and_logits_stay(family, corpus, tmp_path):
    """Zeroing o_proj's columns of one key/value group (its 2 query heads) silences it: heads 0.5 keeps the other
    group of each layer, its query, key and value rows (and Qwen2's biases) with it."""
    _, tok = corpus
    source = teacher(corpus, family, tmp_path / "unused")
    hd = 16 if family in ("qwen3", "gemma3_text") else 8
    silent = [i % 2 for i in range(len(source.model.layers))]  # group 0 in layer 0, group 1 in layer 1, ...
    with torch.no_grad():
        for layer, s in zip(source.model.layers, silent):
            layer.self_attn.o_proj.weight[:, s * 2 * hd:(s + 1) * 2 * hd] = 0
    save(source, tok, tmp_path / "src")
    report = prune(tmp_path / "src", tmp_path / "out", options(corpus[0], heads=0.5))
    assert report["kept"]["groups"] == [[1 - s] for s in silent]
    shape = report["shape_after"]
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]) == (2, 1, hd)
    ids = token_batch(source.config.vocab_size)
    torch.testing.assert_close(logits(load(tmp_path / "out"), ids), logits(source, ids), atol=EXACT, rtol=0)


def test_embedding_channels_no_norm_passes_are_the_ones_pruned(corpus, tmp_path):
    """Channels that every norm's weight zeroes score 0 (they reach no sublayer and not the head): --hidden 0.25
    removes exactly those 8 of 32."""
    _, tok = corpus
    source = teacher(corpus, "llama", tmp_path / "unused")
    dead = [3, 5, 11, 12, 17, 20, 28, 31]
    with torch.no_grad():
        source.model.norm.weight[dead] = 0
        for layer in source.model.layers:
            layer.input_layernorm.weight[dead] = 0
            layer.post_attention_layernorm.weight[dead] = 0
    save(source, tok, tmp_path / "src")
    report = prune(tmp_path / "src", tmp_path / "out", options(corpus[0], hidden=0.25))
    assert report["kept"]["hidden"] == sorted(set(range(32)) - set(dead))
    small = load(tmp_path / "out")
    assert small.model.embed_tokens.weight.shape == (tok.vocab_size, 24)
    torch.testing.assert_close(small.model.embed_tokens.weight,
                               source.model.embed_tokens.weight[:, report["kept"]["hidden"]], atol=0, rtol=0)


def test_gemma_refuses_hidden(corpus, tmp_path):
    teacher(corpus, "gemma3_text", tmp_path / "src")
    with pytest.raises(UserError, match="--hidden is refused for Gemma 3.*prune --mlp, --heads or --layers"):
        prune(tmp_path / "src", tmp_path / "out", options(corpus[0], hidden=0.25))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, message", [
    (dict(mlp=1.0), r"--mlp 1.0 is not a share in \[0, 1\)"),
    (dict(heads=-0.1), r"--heads -0.1 is not a share"),
    (dict(layers=-1), "--layers -1 is negative"),
    (dict(), "nothing to prune: give at least one of --mlp, --heads, --hidden, --layers"),
    (dict(layers=3), "--layers 3 would remove all 3 layers; remove fewer"),
])
def test_bad_options_refused(kw, message, corpus, tmp_path):
    teacher(corpus, "llama", tmp_path / "src")
    with pytest.raises(UserError, match=message):
        prune(tmp_path / "src", tmp_path / "out", options(corpus[0], **kw))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [
    lambda v, e: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=v, n_positions=64, bos_token_id=e,
                            eos_token_id=e),
    lambda v, e: Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=v, max_position_embeddings=64, bos_token_id=e,
                            eos_token_id=e, pad_token_id=e),
], ids=["gpt2", "phi3"])
def test_unsupported_family_refused(config, corpus, tmp_path):
    _, tok = corpus
    cfg = config(tok.vocab_size, tok.eos_id)
    save_teacher(cfg, tok, tmp_path / "src")
    with pytest.raises(UserError, match=f"pruning supports llama, mistral, qwen2, qwen3, gemma3_text; this "
                                        f"checkpoint is '{cfg.model_type}'"):
        prune(tmp_path / "src", tmp_path / "out", options(corpus[0], mlp=0.5))
    assert not (tmp_path / "out").exists()
