"""The text the demo model is trained, calibrated and checked on, split three ways that never overlap.

With no `--corpus`, the corpus is the Python standard library's own source on the running machine: it is
always there (no download), it is real code, and it is large enough to teach a small model Python syntax.
A user corpus is a text file or a directory of .txt/.md/.py files.

Files are cut into pieces of at most PIECE_CHARS at line boundaries, and each piece goes to a split chosen by
a stable hash of "relative/path#piece-index": the choice never depends on the other files or on `max_bytes`,
so "valid" text (used for validation and the accuracy check) is never trained on nor used for quantization
calibration, whatever budget each caller loads with. Cutting into pieces also lets a single text file feed all
three splits.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from pathlib import Path

from models.errors import UserError

SPLITS = {"train": 80, "valid": 10, "calib": 10}  # split -> percent of the hash space and of the byte budget
DEFAULT_MAX_BYTES = 8_000_000     # ~80% of a CPython 3.11 stdlib: more than the default training run reads
PIECE_CHARS = 16_384              # a document is at most this long: most stdlib modules stay whole
MAX_FILE_BYTES = 200_000          # bigger stdlib files are generated tables (pydoc_data, unicode data)
TEXT_SUFFIXES = {".txt", ".md", ".py"}
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# generated tables (encodings/cp*.py codec maps, token.py, stringprep.py ...) say so in their first lines; they are
# 12% of the library and so repetitive that a small model trained on them samples codec tables, not Python
GENERATED = re.compile(r"auto-generated|automatically generated|generated from|this file is generated|"
                       r"generated and used", re.IGNORECASE)


def stable_hash(key: str) -> int:
    """A hash that is the same on every machine and Python run (unlike hash(), which is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> str:
    """The split a piece belongs to, from its key alone."""
    bucket = stable_hash(key) % 100
    for name, percent in SPLITS.items():
        if bucket < percent:
            return name
        bucket -= percent
    raise AssertionError("SPLITS percentages must sum to 100")


def is_generated(path: Path) -> bool:
    """Whether the file's header says a tool wrote it."""
    with path.open(encoding="utf-8", errors="replace") as f:
        return GENERATED.search(f.read(400)) is not None


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's hand-written .py sources: no tests, installed packages or generated tables.

    os.walk prunes skipped directories before descending: site-packages alone can hold a hundred thousand files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for name in filenames:
            p = Path(dirpath, name)
            if (name.endswith(".py") and p.is_file() and p.stat().st_size <= MAX_FILE_BYTES
                    and not is_generated(p)):
                files.append(p)
    if not files:
        raise UserError(f"no Python standard library sources found under {root}; pass --corpus PATH")
    return root, files


def user_files(path: str) -> tuple[Path, list[Path]]:
    """A text file, or the .txt/.md/.py files under a directory."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.parent, [p]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file()]
        if not files:
            raise UserError(f"corpus directory {p} has no .txt, .md or .py files")
        return p, files
    raise UserError(f"corpus {p} does not exist; pass a text file or a directory of .txt/.md/.py files")


def pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut at line ends into pieces of at most `max_chars` (a longer single line is cut anywhere)."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            out.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            out.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        out.append("".join(current))
    return [piece for piece in out if piece.strip()]


def load_corpus(path: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, list[str]]:
    """Split name ("train", "valid", "calib") -> document texts, about `max_bytes` of UTF-8 in all.

    Each split gets its share of the budget (80/10/10). Files are visited in the order of their path's hash,
    so a budget below the corpus size samples the whole library rather than its alphabetically first packages;
    a split takes pieces until its share is reached (the last piece may overshoot by up to PIECE_CHARS).
    """
    root, files = stdlib_files() if path is None else user_files(path)
    rels = sorted(((p.relative_to(root).as_posix(), p) for p in files), key=lambda rp: (stable_hash(rp[0]), rp[0]))
    budget = {name: max_bytes * percent // 100 for name, percent in SPLITS.items()}
    used = dict.fromkeys(SPLITS, 0)
    docs: dict[str, list[str]] = {name: [] for name in SPLITS}
    for rel, file in rels:
        if all(used[name] >= budget[name] for name in SPLITS):
            break
        for i, piece in enumerate(pieces(file.read_text(encoding="utf-8", errors="replace"))):
            name = split_of(f"{rel}#{i}")
            if used[name] < budget[name]:
                docs[name].append(piece)
                used[name] += len(piece.encode("utf-8"))
    empty = [name for name, texts in docs.items() if not texts]
    if empty:
        source = "the standard library" if path is None else path
        raise UserError(f"corpus {source} is too small to fill the {', '.join(empty)} split(s) "
                        f"(max_bytes={max_bytes}); give more text (a few hundred KB)")
    return docs


def split_text(corpus: dict[str, list[str]], split: str, max_chars: int) -> str:
    """The first `max_chars` characters of `split`'s documents, separated by blank lines (for calibration/checks)."""
    if split not in corpus:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(corpus)}")
    return "\n\n".join(corpus[split])[:max_chars]
