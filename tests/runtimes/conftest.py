"""Fixtures for runtimes/: one tiny exported decoder (and a word-level tokenizer) shared by the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128
WORDS = [f"w{i}" for i in range(1, VOCAB)]  # id 0 is [UNK]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDAExecutionProvider that really loads (skipped otherwise)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer decoder exported through exporters/; weights scaled up so greedy argmaxes are not
    near-ties (std 0.02 makes every logit almost equal, and tokens would flip on rounding noise)."""
    torch = pytest.importorskip("torch")
    from exporters.export import export_onnx
    from models.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("tiny") / "model.onnx"
    export_onnx(model, out)
    return out


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, tiny_model) -> Path:
    """A bundle directory: model.onnx and a word-level tokenizer.json over the same 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("bundle")
    (out / "model.onnx").write_bytes(tiny_model.read_bytes())
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i for i, w in enumerate(WORDS, 1)}}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out / "tokenizer.json"))
    return out
