"""Tiny random-init checkpoints of each supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXT = "\n".join(
    f"def function_{i}(x, y):\n    total = x + y * {i}\n    return total if total > {i} else -total\n"
    for i in range(400))


def make_tokenizer(out_dir: Path, vocab: int = 256, bos: bool = False) -> None:
    """A byte-level BPE trained on TEXT; with `bos`, one that puts its special token (id 0) before every text, as
    Gemma's puts <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
            ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    tok.save(str(out_dir / "tokenizer.json"))


def make_hf_checkpoint(out_dir: Path, family: str = "llama", seed: int = 0, tied: bool = False, bos: bool = False,
                       **overrides) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0,
                            eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
               "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
               "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM), "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM)}[family]
        own = {"qwen3": dict(head_dim=32),  # 4 heads x 32 != hidden 64
               "gemma3_text": dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention"]),
               "mistral": dict(sliding_window=8),
               "gemma2": dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                              final_logit_softcapping=8.0, layer_types=["sliding_attention", "full_attention"]),
               # 2 heads of 32, half rotated; LongRoPE's long factors past 8 tokens
               "phi3": dict(num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5,
                            original_max_position_embeddings=8, pad_token_id=0,
                            rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 1, 1.1, 1, 1.3, 1],
                                          "long_factor": [2.0, 3.0, 4.0, 5.0, 2.5, 3.5, 6.0, 8.0]})}.get(family, {})
        cfg = cls[0](**{"intermediate_size": 128, "num_key_value_heads": 2, "tie_word_embeddings": tied, **common,
                        **own, **overrides})
        model = cls[1](cfg)
    with torch.no_grad():  # random norm weights, so a fusion that drops one shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    make_tokenizer(out_dir, bos=bos)
    return out_dir


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", "llama")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bert") / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                               "hidden_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 64,
                                               "vocab_size": 100}))
    return d


def make_built_run(root: Path, text_file: Path) -> Path:
    """A tied Llama exported by the builder (export's default) and quantized to w8a8 and w4 without the budget
    search; the run directory."""
    from tests.pipeline.test_cli import invoke

    run = root / "run"
    invoke("export", "--model", make_hf_checkpoint(root / "ckpt", "llama", tied=True), "--out", run)
    for recipe in ("w8a8", "w4"):
        invoke("quantize", run, "--recipe", recipe, "--calib-text", text_file, "--calib-windows", "2",
               "--window", "32", "--valid-windows", "0")
    return run
