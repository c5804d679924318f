"""models/corpus.py and models/tokenizer.py: the splits never overlap and never move, the tokenizer round-trips.

Budgets are small (a few hundred KB of the standard library) so each test takes well under a second.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from models.corpus import MAX_FILE_BYTES, PIECE_CHARS, SPLITS, load_corpus, pieces, split_text, stdlib_files
from models.errors import UserError
from models.tokenizer import EOS_TOKEN, build_tokenizer, train_tokenizer

SMALL = 300_000


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    return load_corpus(max_bytes=SMALL)


def test_default_corpus_is_stdlib_python_split_three_ways(corpus):
    assert set(corpus) == set(SPLITS)
    assert all(corpus[name] for name in SPLITS), "every split must have documents"
    assert any("def " in doc for doc in corpus["train"])
    total = sum(len(doc.encode()) for docs in corpus.values() for doc in docs)
    assert SMALL * 0.9 <= total <= SMALL + len(SPLITS) * PIECE_CHARS * 4  # a UTF-8 char is at most 4 bytes


def test_splits_are_disjoint(corpus):
    sets = {name: set(docs) for name, docs in corpus.items()}
    assert not sets["train"] & sets["valid"]
    assert not sets["train"] & sets["calib"]
    assert not sets["valid"] & sets["calib"]


def test_corpus_is_deterministic(corpus):
    assert load_corpus(max_bytes=SMALL) == corpus


def test_split_of_a_document_does_not_depend_on_the_budget(corpus):
    """Validation text loaded with one budget is never training or calibration text under another."""
    bigger = load_corpus(max_bytes=4 * SMALL)
    for name, docs in corpus.items():
        others = {doc for other, other_docs in bigger.items() if other != name for doc in other_docs}
        assert not others.intersection(docs), f"a {name} document moved to another split"


def test_stdlib_selection_skips_tests_packages_and_big_files():
    root, files = stdlib_files()
    rels = [f.relative_to(root).parts for f in files]
    assert ("os.py",) in rels and ("json", "decoder.py") in rels
    assert ("encodings", "cp1252.py") not in rels and ("token.py",) not in rels  # generated tables
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(parts) for parts in rels)
    assert all(f.stat().st_size <= MAX_FILE_BYTES for f in files)


def test_user_text_file_feeds_every_split(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"line {i}: some words about item {i}\n" for i in range(40_000)))
    corpus = load_corpus(str(path), max_bytes=1_000_000)
    assert all(corpus[name] for name in SPLITS)
    assert all(len(doc) <= PIECE_CHARS for docs in corpus.values() for doc in docs)


def test_user_directory_reads_text_files_only(tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i:02d}.md").write_text(f"# Document {i}\n" + "text line\n" * 2000)
    (tmp_path / "image.png").write_bytes(b"\x89PNG not text" * 1000)
    corpus = load_corpus(str(tmp_path))
    assert all(corpus[name] for name in SPLITS)
    assert not any("PNG" in doc for docs in corpus.values() for doc in docs)


@pytest.mark.parametrize("make", ["missing", "empty_file", "empty_dir"])
def test_bad_corpus_path_is_a_user_error(tmp_path, make):
    path = tmp_path / "nothing-here"
    if make == "empty_file":
        path.write_text("")
    elif make == "empty_dir":
        path.mkdir()
    with pytest.raises(UserError) as info:
        load_corpus(str(path))
    assert "\n" not in str(info.value)


def test_pieces_cut_at_line_ends():
    text = "".join(f"{i:05d}\n" for i in range(10_000))
    out = pieces(text, max_chars=1000)
    assert "".join(out) == text
    assert all(len(p) <= 1000 and p.endswith("\n") for p in out)
    assert pieces("x" * 2500, max_chars=1000) == ["x" * 1000, "x" * 1000, "x" * 500]


def test_split_text(corpus):
    text = split_text(corpus, "calib", 5000)
    assert len(text) == 5000 and text.startswith(corpus["calib"][0][:100])
    with pytest.raises(ValueError):
        split_text(corpus, "test", 10)


def test_tokenizer_round_trips_and_is_deterministic(corpus, tmp_path):
    trained = train_tokenizer(corpus["train"], tmp_path / "tokenizer.json", vocab_size=512)
    tok = Tokenizer.from_file(str(trained.path))
    assert trained.vocab_size == tok.get_vocab_size() == 512
    assert tok.id_to_token(trained.eos_id) == EOS_TOKEN
    for text in [corpus["valid"][0], "def f(x):\n\treturn x  # café → ünïcödé 🐍\n", "   \n\n  trailing  "]:
        ids = tok.encode(text).ids
        assert trained.eos_id not in ids
        assert tok.decode(ids) == text
    assert json.loads(build_tokenizer(corpus["train"], 512).to_str()) == json.loads(trained.path.read_text())
