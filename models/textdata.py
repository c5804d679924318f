"""Token windows of a local corpus under a checkpoint's own tokenizer: what pruning calibrates on and what
distillation trains and evaluates on.

The corpus is models/corpus.py's (the Python standard library's sources by default, or a file or directory of
the user's), split by a stable hash of each piece: "train" is trained on, "calib" scores importance, "valid" is
held out from both and measures perplexity.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from models.corpus import DEFAULT_MAX_BYTES, load_corpus
from models.errors import UserError
from models.tokenizer import TrainedTokenizer
from models.train import token_stream, windows


def source_tokenizer(path: str | Path, workdir: Path, separator: int | None) -> TrainedTokenizer:
    """The checkpoint's tokenizer (its tokenizer.json, or one built from a GGUF's vocabulary) and the id that
    separates documents (its eos, else its bos)."""
    from models.hf import export_tokenizer

    # every process of a torchrun job writes workdir/tokenizer.json at the same moment: each exports into a
    # private folder and renames the file into place (atomic), so none reads a file another is still writing
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=workdir) as private:
        exported = export_tokenizer(path, private)
        if exported is None:
            raise UserError(f"{path} has no tokenizer; add a tokenizer.json to the checkpoint")
        tok = Tokenizer.from_file(str(exported))
        tok_path = workdir / "tokenizer.json"
        os.replace(exported, tok_path)
    if separator is None:
        raise UserError(f"{path} names no eos or bos token to separate documents; add eos_token_id to its config")
    return TrainedTokenizer(tokenizer=tok, path=tok_path, vocab_size=tok.get_vocab_size(), eos_id=separator)


def corpus_windows(tok: TrainedTokenizer, corpus: str | None, seq_len: int,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, torch.Tensor]:
    """Split name -> (n, seq_len + 1) windows of token ids."""
    docs = load_corpus(corpus, max_bytes)
    return {name: windows(token_stream(tok, texts), seq_len) for name, texts in docs.items()}


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch_size: int = 4, cl=None) -> float:
    """exp(mean next-token loss) of a transformers causal LM over `data`'s windows; with a cluster `cl`, each
    process scores every world-th window and the sums are combined: the same windows, so the same perplexity, as
    one process."""
    was_training = model.training
    model.eval()
    rows = list(range(len(data)))
    counted = len(rows)
    if cl is not None and cl.parallel:
        # the same number of forward calls of the same shapes on every process (FSDP gathers in each): one with a
        # window fewer than the others runs window 0 once more and leaves it out of the sums
        per = -(-len(rows) // cl.world)
        rows = rows[cl.rank::cl.world]
        counted = len(rows)
        rows += [0] * (per - len(rows))
    total = count = 0.0
    for i in range(0, len(rows), batch_size):
        batch = data[rows[i:i + batch_size]]
        keep = max(0, min(batch_size, counted - i))
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()[:keep]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:keep, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:keep, 1:].numel()
    if cl is not None and cl.parallel:
        total, count = cl.sum(total, count)
    model.train(was_training)
    return math.exp(total / max(count, 1))
