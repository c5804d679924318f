"""Token windows for calibration and checking, from the run's tokenizer and a text corpus.

Calibration reads the corpus's "calib" split, checking reads "valid": the two never overlap, so accuracy is
always measured on text the quantizer did not see. A user text file replaces the corpus for either role.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import UserError


def load_tokenizer(run_root: Path):
    from tokenizers import Tokenizer

    path = run_root / "tokenizer.json"
    if not path.exists():
        raise UserError(f"{path} not found: the model has no tokenizer (export it from a checkpoint that has one)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a valid tokenizer.json ({e})") from e


def read_text(split: str, text_path: str | None, max_chars: int) -> str:
    """`text_path`'s contents (a file), else the default corpus's `split` ("calib" or "valid")."""
    if text_path:
        p = Path(text_path)
        if not p.is_file():
            raise UserError(f"text file not found: {p}")
        return p.read_text(errors="replace")[:max_chars]
    from models.corpus import load_corpus, split_text

    return split_text(load_corpus(), split, max_chars)


def token_windows(run_root: Path, split: str, text_path: str | None, n_windows: int, window: int) -> list[list[int]]:
    """`n_windows` consecutive, non-overlapping windows of `window` tokens."""
    tok = load_tokenizer(run_root)
    text = read_text(split, text_path, max_chars=n_windows * window * 8)
    ids = tok.encode(text).ids
    windows = [ids[i * window:(i + 1) * window] for i in range(min(n_windows, len(ids) // window))]
    if not windows:
        raise UserError(f"text for {split!r} is shorter than one window of {window} tokens")
    return windows
