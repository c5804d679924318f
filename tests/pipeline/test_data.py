"""Token windows for check and quantize: spread over the text, non-overlapping; calibration and validation
interleaved but disjoint."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from models.errors import UserError
from pipeline.data import token_windows
from pipeline.stages.quantize import split_windows


@pytest.fixture
def run_root(tmp_path):
    """A run directory whose tokenizer maps each word w<n> to id n: windows can be read back as positions."""
    vocab = {f"w{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_windows_are_spread_over_the_whole_text(run_root, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(1000)))
    windows = token_windows(run_root, "valid", str(text), n_windows=4, window=10)
    assert [w[0] for w in windows] == [0, 250, 500, 750]
    assert all(w == list(range(w[0], w[0] + 10)) for w in windows)


def test_short_text_gives_as_many_windows_as_fit_and_too_short_is_an_error(run_root, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(25)))
    windows = token_windows(run_root, "valid", str(text), n_windows=8, window=10)
    assert [w[0] for w in windows] == [0, 12]
    with pytest.raises(UserError, match="shorter than one window"):
        token_windows(run_root, "valid", str(text), n_windows=1, window=30)


@pytest.mark.parametrize("template", ["<bos> $A", "<bos> $A <eos>"])
def test_every_window_opens_with_the_tokenizers_bos_as_a_prompt_does(tmp_path, template):
    """Gemma's tokenizer puts <bos> before a text: each window gets it (not only the first one cut from the text),
    and a template's closing <eos> is no part of any window."""
    vocab = {**{f"w{i}": i for i in range(1000)}, "<bos>": 1000, "<eos>": 1001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 1000),
                                                                                         ("<eos>", 1001)])
    tok.save(str(tmp_path / "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(1000)))
    windows = token_windows(tmp_path, "valid", str(text), n_windows=4, window=10)
    assert windows == [[1000, *range(s, s + 9)] for s in (0, 250, 500, 750)]
    with pytest.raises(UserError, match="shorter than one window"):
        token_windows(tmp_path, "valid", str(text), n_windows=1, window=1)


def test_calibration_and_validation_interleave_without_overlap():
    windows = [[i] for i in range(24)]
    calib, valid = split_windows(windows, 8)
    assert len(calib) == 8 and len(valid) == 16
    assert sorted(calib + valid) == windows
    assert calib[0][0] < 4 and calib[-1][0] > 16  # both sample the start and the end of the text
    assert split_windows(windows[:5], 8) == (windows[:5], None)
