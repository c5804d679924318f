"""Generation over a fused (GroupQueryAttention) graph: same tokens as the unfused export, on every cache mode."""

from __future__ import annotations

from dataclasses import replace

import pytest

from runtimes.generate import Generator, greedy_tokens
from runtimes.providers import cpu
from runtimes.session import open_session


@pytest.fixture(scope="module")
def fused_pair(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from exporters.export import export_onnx
    from exporters.optimize import optimize
    from models.decoder import Decoder, DecoderConfig

    torch.manual_seed(1)
    model = Decoder(DecoderConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                                  intermediate_size=96, vocab_size=128, max_position_embeddings=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    d = tmp_path_factory.mktemp("fused")
    export_onnx(model, d / "plain.onnx")
    optimize(d / "plain.onnx", d / "fused.onnx")
    return d / "plain.onnx", d / "fused.onnx"


def test_fused_graph_reports_fused_attention_and_drops_position_ids(fused_pair):
    plain, fused = (open_session(p, cpu(threads=1)) for p in fused_pair)
    assert not plain.contract.fused_attention and fused.contract.fused_attention
    assert "position_ids" in plain.input_names and "position_ids" not in fused.input_names


def test_fused_greedy_tokens_equal_unfused(fused_pair):
    prompt = [5, 17, 3, 99, 42]
    plain, fused = (open_session(p, cpu(threads=1)) for p in fused_pair)
    expected = greedy_tokens(plain, prompt, 12)
    assert len(set(expected)) > 1
    assert greedy_tokens(fused, prompt, 12) == expected
    assert list(Generator(fused, io_binding=True).generate(prompt, 12)) == expected


def test_tensorrt_style_spec_adds_no_dummy_slot_to_a_fused_graph(fused_pair):
    """GroupQueryAttention reads lengths from the mask sum: a masked dummy slot would shift positions."""
    plain, fused = fused_pair
    trt_like = replace(cpu(threads=1), needs_nonempty_past=True)
    expected = greedy_tokens(open_session(plain, cpu(threads=1)), [7, 8, 9], 8)
    assert greedy_tokens(open_session(fused, trt_like), [7, 8, 9], 8) == expected
    assert greedy_tokens(open_session(plain, trt_like), [7, 8, 9], 8) == expected
