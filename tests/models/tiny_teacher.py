"""Tiny teachers for the prune, distill and distributed tests: a made-up text corpus written as a directory of
.txt files, a byte-level BPE trained on it, and random-init Hugging Face checkpoints that carry that tokenizer.

Everything is built from seeds, so every run sees the same corpus, the same splits and the same weights, and
nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from models.corpus import load_corpus
from models.tokenizer import TrainedTokenizer, train_tokenizer

WORDS = ("the a of to and in is it that for on with as was at by be this from or an are which but not have had "
         "def return class import self value list dict none true false if else while for yield lambda with try "
         "except raise print model layer token window batch step loss train valid calib prune distill teacher "
         "student hidden head group channel norm weight bias embed logits cache resume shard rank world").split()


def write_corpus(folder: Path, files: int = 80, words: int = 250, seed: int = 0) -> Path:
    """`files` text files of `words` words each (short lines): each file is one corpus piece, and its name's hash
    sends it to train, calib or valid."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        ws = [rng.choice(WORDS) for _ in range(words)]
        lines = [" ".join(ws[j:j + 10]) + ("." if rng.random() < 0.5 else ":") for j in range(0, words, 10)]
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def corpus_tokenizer(corpus: Path, out: Path, vocab_size: int = 320) -> TrainedTokenizer:
    return train_tokenizer(load_corpus(str(corpus))["train"], out, vocab_size)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Replace the init (zero biases, unit norms) by noise, as tests/models/test_hf.py does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def family_config(family: str, vocab: int, eos: int, hidden: int = 32, intermediate: int = 64, layers: int = 3,
                  tied: bool = False):
    """A tiny config of `family`: 4 query heads in 2 key/value groups; Qwen3 and Gemma 3 with heads of width 16
    whatever the hidden size (head_dim != hidden / heads once hidden is not 64)."""
    base = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                bos_token_id=eos, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=tied)
    if family == "llama":
        return LlamaConfig(**base)
    if family == "qwen2":  # biases on q, k and v
        return Qwen2Config(**base)
    if family == "qwen3":  # q/k norms, a head width of its own
        return Qwen3Config(**base, head_dim=16)
    if family == "gemma3_text":  # sandwich norms, q/k norms, local and global layers, scaled embeddings
        types = ["sliding_attention", "full_attention"] * layers
        return Gemma3TextConfig(**base, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                layer_types=types[:layers])
    raise ValueError(family)


def save_teacher(config, tok: TrainedTokenizer, out: Path, seed: int = 0, scale: float | None = 0.3):
    """A random-init model of `config` (noise of `scale` on every weight; None keeps transformers' init), saved
    with the tokenizer as a checkpoint directory; returns the model (float32, eval)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if scale is not None:
        randomize(model, seed, scale)
    model = model.float().eval()
    save(model, tok, out)
    return model


def save(model, tok: TrainedTokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(Path(tok.path).read_bytes())
    return out
