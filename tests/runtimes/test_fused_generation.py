"""Generation over a fused (GroupQueryAttention) graph: same tokens as the unfused export, on every cache mode."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from runtimes.errors import RuntimeUserError
from runtimes.caches import GRAPH_ID, HostCache, SharedCache, StaticCache
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


def test_fused_graph_on_the_cpu_updates_one_cache_buffer_in_place(fused_pair):
    """The default CPU cache of a fused graph: past and present are one buffer per tensor, which
    GroupQueryAttention fills position by position; the logits equal those of the copying HostCache."""
    fused = open_session(fused_pair[1], cpu(threads=1))
    shared, host = Generator(fused), Generator(fused, io_binding=False)
    assert isinstance(shared._cache, SharedCache) and isinstance(host._cache, HostCache)
    prompt = [5, 17, 3, 99, 42]
    a, b = shared.prefill(prompt, capacity=16), host.prefill(prompt, capacity=16)
    buffers = shared._cache._buffers
    assert len(buffers) == 4 and all(x.shape == (1, 2, 16, 16) for x in buffers)
    assert all(np.abs(x[:, :, :5]).min() > 0 and not x[:, :, 5:].any() for x in buffers)
    for token in (7, 8, 9):
        a, b = shared.step(token), host.step(token)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert shared._cache._buffers is buffers  # no new cache was allocated
    assert all(np.abs(x[:, :, :8]).min() > 0 and not x[:, :, 8:].any() for x in buffers)


def test_shared_cache_grows_past_its_capacity_hint(fused_pair):
    """Generation beyond the prefill's capacity hint doubles the buffers and keeps the cache."""
    fused = open_session(fused_pair[1], cpu(threads=1))
    shared, host = Generator(fused), Generator(fused, io_binding=False)
    prompt = [5, 17, 3]
    shared.prefill(prompt, capacity=4), host.prefill(prompt, capacity=4)
    for token in range(10, 20):
        np.testing.assert_allclose(shared.step(token), host.step(token), rtol=1e-5, atol=1e-5)
    assert shared._cache._buffers[0].shape[2] >= 13


def test_static_cache_steps_on_fixed_buffers_with_the_logits_of_the_shared_cache(fused_pair):
    """The cache CUDA graphs need, on the CPU: every decode step feeds the same token, full-capacity mask and
    logits buffers (the mask zero past the positions so far), and the logits are the in-place cache's bit for
    bit, past the capacity hint too (the buffers double and the next step is a new graph)."""
    fused = open_session(fused_pair[1], cpu(threads=1))
    static, shared = Generator(fused, static=True), Generator(fused)
    assert isinstance(static._cache, StaticCache)
    prompt = [5, 17, 3, 99, 42]
    np.testing.assert_array_equal(static.prefill(prompt, capacity=8), shared.prefill(prompt, capacity=8))
    cache = static._cache
    np.testing.assert_array_equal(static.step(7), shared.step(7))
    buffers = {name: value.data_ptr() for name, (_, value) in cache._step.items()}
    mask = cache._step["attention_mask"][0]
    assert mask.shape == (1, 8) and mask.tolist() == [[1] * 6 + [0] * 2]
    for token in (8, 9):
        np.testing.assert_array_equal(static.step(token), shared.step(token))
        assert {name: value.data_ptr() for name, (_, value) in cache._step.items()} == buffers
    assert cache.capacity == 8 and cache._graph_id == 1
    for token in range(10, 16):  # 14 positions > 8: one doubling
        np.testing.assert_array_equal(static.step(token), shared.step(token))
    assert cache.capacity >= 14 and cache._graph_id == 2


def test_static_cache_runs_prefill_off_the_graph_and_steps_on_it():
    """With graph capture asked for, a prefill runs with gpu_graph_id -1 (no capture, its own shapes) and
    each decode step with the graph of the current buffers."""
    from runtimes.providers import cuda

    cache = object.__new__(StaticCache)
    cache._graphs, cache._options = True, {}
    assert cache._run_options(-1).get_run_config_entry(GRAPH_ID) == "-1"
    assert cache._run_options(3).get_run_config_entry(GRAPH_ID) == "3"
    assert cuda(graph=True).graph_capture


def test_static_cache_refuses_an_unfused_graph(fused_pair):
    with pytest.raises(RuntimeUserError, match="fused graph"):
        Generator(open_session(fused_pair[0], cpu(threads=1)), static=True)


@pytest.fixture(scope="module")
def built_windowed(tmp_path_factory):
    """A built graph (it takes logits_to_keep) of a Mistral with a 4-token sliding window."""
    pytest.importorskip("torch")
    from transformers import MistralConfig

    from exporters.builder import build_graph
    from models.weights import open_weights
    from tests.models.test_hf import tiny_hf

    d = tmp_path_factory.mktemp("built")
    tiny_hf(MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=160, max_position_embeddings=64,
                          sliding_window=4)).save_pretrained(d / "ckpt")
    build_graph(open_weights(d / "ckpt"), d / "model.onnx")
    return d / "model.onnx"


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64])
def test_chunked_prefill_gives_the_logits_and_cache_of_one_prefill(built_windowed, chunk):
    """A prompt taken in chunks through the in-place cache (chunks shorter and longer than the window, one that
    does not divide the prompt) leaves the same cache and the same logits, then and at every step after, as the
    copying cache's single prefill; only the last position's logits come back."""
    session = open_session(built_windowed, cpu(threads=1))
    chunked, host = Generator(session, prefill_chunk=chunk), Generator(session, io_binding=False)
    assert isinstance(chunked._cache, SharedCache)
    prompt = np.random.default_rng(3).integers(0, 160, 11)
    a, b = chunked.prefill(prompt, capacity=16), host.prefill(prompt, capacity=16)
    assert a.shape == b.shape == (1, 160)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for buffer, present in zip(chunked._cache._buffers, host._cache._past.values()):
        assert buffer.shape[2] == 16 and not buffer[:, :, 11:].any()
        np.testing.assert_allclose(buffer[:, :, :11], present, rtol=1e-5, atol=1e-6)
    for token in (7, 8, 9, 10, 11):
        np.testing.assert_allclose(chunked.step(token), host.step(token), rtol=1e-5, atol=1e-5)


def test_static_cache_on_a_built_graph_keeps_the_last_logits_and_the_window(built_windowed):
    """A built graph takes logits_to_keep: the static cache's prefill gets one row; steps past the sliding
    window through the full-capacity mask equal the copying cache's."""
    session = open_session(built_windowed, cpu(threads=1))
    static, host = Generator(session, static=True), Generator(session, io_binding=False)
    prompt = np.random.default_rng(4).integers(0, 160, 9)
    a, b = static.prefill(prompt, capacity=20), host.prefill(prompt, capacity=20)
    assert a.shape == (1, 160)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for token in range(20, 30):
        np.testing.assert_allclose(static.step(token), host.step(token), rtol=1e-5, atol=1e-5)


def test_a_prefill_chunk_below_one_is_refused(built_windowed):
    with pytest.raises(RuntimeUserError, match="prefill chunk of 0 tokens"):
        Generator(open_session(built_windowed, cpu(threads=1)), prefill_chunk=0)


def test_a_batch_of_prompts_in_chunks_gives_each_sequences_own_logits(built_windowed):
    """Two prompts prefilled and stepped together on the in-place cache with a 3-token chunk asked for: a batch
    prefills whole (GroupQueryAttention takes several new tokens over a past only at batch 1), and each row
    equals its sequence run alone."""
    session = open_session(built_windowed, cpu(threads=1))
    prompts = np.random.default_rng(5).integers(0, 160, (2, 10))
    together = Generator(session, prefill_chunk=3)
    logits = together.prefill(prompts, capacity=14)
    alone = [Generator(session, io_binding=False) for _ in prompts]
    expected = np.concatenate([g.prefill(p, capacity=14) for g, p in zip(alone, prompts)])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    for _ in range(3):
        tokens = logits.argmax(-1)
        logits = together.step(tokens)
        expected = np.concatenate([g.step(int(t)) for g, t in zip(alone, tokens)])
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
