"""A byte-level BPE tokenizer trained on the corpus, saved as a Hugging Face tokenizer.json.

Byte-level (GPT-2 style) means every string round-trips exactly, whatever its characters: the 256 byte symbols
are always in the vocabulary. One special token, <|endoftext|>, separates documents during training and serves
as both BOS and EOS, as in GPT-2. No post-processor is attached: callers add the separator themselves, so
encoding a calibration text never inserts tokens the caller did not ask for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096  # small: fewer embedding parameters and a cheaper softmax for a CPU-sized model


@dataclass(frozen=True)
class TrainedTokenizer:
    tokenizer: Tokenizer  # the trained tokenizer, ready to encode
    path: Path        # the saved tokenizer.json
    vocab_size: int   # actual size: below the requested one when the corpus has too few distinct merges
    eos_id: int       # <|endoftext|>: document separator, also used as BOS


def build_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on `texts` in memory.

    The trainer has no randomness and byte-level BPE sorts its alphabet, so the same texts give the same merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def train_tokenizer(texts: list[str], out_path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> TrainedTokenizer:
    """Train on `texts`, save to `out_path` (a tokenizer.json) and return it with its path and special id."""
    tok = build_tokenizer(texts, vocab_size)
    path = Path(out_path)
    tok.save(str(path))
    return TrainedTokenizer(tokenizer=tok, path=path, vocab_size=tok.get_vocab_size(),
                            eos_id=tok.token_to_id(EOS_TOKEN))
