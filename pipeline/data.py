"""Token windows for calibration and checking, from the run's tokenizer and a text corpus.

Calibration reads the corpus's "calib" split, checking reads "valid": the two never overlap, so accuracy is
always measured on text the quantizer did not see. A user text file replaces the corpus for either role.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import UserError


def load_tokenizer(run_root: Path):
    """The run's tokenizer.json, read as the device reads it (runtimes.generate.load_tokenizer)."""
    from runtimes.generate import load_tokenizer as read_tokenizer

    path = run_root / "tokenizer.json"
    if not path.exists():
        raise UserError(f"{path} not found: the model has no tokenizer (export it from a checkpoint that has one)")
    return read_tokenizer(path)


def read_text(split: str, text_path: str | None, max_chars: int) -> str:
    """`text_path`'s contents (a file), else the default corpus's `split` ("calib" or "valid")."""
    if text_path:
        p = Path(text_path)
        if not p.is_file():
            raise UserError(f"text file not found: {p}")
        return p.read_text(errors="replace")[:max_chars]
    from models.corpus import load_corpus, split_text

    return split_text(load_corpus(), split, max_chars)


MAX_TEXT_CHARS = 4_000_000  # the most text read for one role: a few MB tokenizes in about a second


def leading_special(tok) -> list[int]:
    """The ids the tokenizer puts before any text (Gemma's <bos>; none for SmolLM2), as every prompt gets them."""
    with_special, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
    starts = [k for k in range(len(with_special) - len(plain) + 1) if with_special[k:k + len(plain)] == plain]
    return with_special[:starts[0]] if starts else []


def token_windows(run_root: Path, split: str, text_path: str | None, n_windows: int, window: int) -> list[list[int]]:
    """`n_windows` non-overlapping windows of `window` tokens, spread evenly over the whole text, each opening
    with the tokens the tokenizer puts before a text (its BOS), as a prompt does.

    Spread, not the first N: a corpus split is a series of documents, and its first few can be unlike the rest
    (the stdlib's valid split opens with a file of Tk constants), which would make a perplexity unrepresentative.
    Each with its BOS, not cut from one stream: a model that has only seen text after a BOS (Gemma) is far from
    its use without one (fp32 perplexity on 128-token windows of a held-out text measured 8x higher), so windows
    without it would calibrate the quantizer and judge the model on inputs no prompt gives it.
    """
    tok = load_tokenizer(run_root)
    prefix = leading_special(tok)
    ids = tok.encode(read_text(split, text_path, MAX_TEXT_CHARS), add_special_tokens=False).ids
    body = window - len(prefix)
    count = min(n_windows, len(ids) // body) if body > 0 else 0
    if count == 0:
        raise UserError(f"text for {split!r} is shorter than one window of {window} tokens")
    stride = len(ids) // count  # >= body
    return [prefix + ids[i * stride:i * stride + body] for i in range(count)]
