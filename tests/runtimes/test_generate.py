"""The generation loop: KV cache == full recompute, dummy-past prefill, IO binding, sampling, text."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

from runtimes.contract import is_past
from runtimes.errors import RuntimeUserError
from runtimes.generate import Generator, Sampling, TextStream, choose, default_eos, greedy_tokens, text_generate
from runtimes.providers import CUDA_EP, available, cpu, cuda
from runtimes.session import DecoderSession, open_session

PROMPT = [5, 17, 99, 3, 42]


@pytest.fixture(scope="module")
def session(tiny_model) -> DecoderSession:
    return open_session(tiny_model, cpu(), threads=1)


def with_dummy_past(session: DecoderSession) -> DecoderSession:
    """The same CPU session, driven the way TensorRT needs it (one masked past slot at prefill)."""
    return dataclasses.replace(session, spec=dataclasses.replace(session.spec, needs_nonempty_past=True))


def recompute_greedy(model_path, prompt: list[int], n: int) -> list[int]:
    """Reference without a cache: the whole sequence from an empty past at every step, argmax of the last."""
    raw = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 2, 0, 8), np.float32)
    seq = list(prompt)
    for _ in range(n):
        ids = np.array([seq], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None],
                 **{i.name: empty for i in raw.get_inputs() if is_past(i.name)}}
        seq.append(int(raw.run(["logits"], feeds)[0][0, -1].argmax()))
    return seq[len(prompt):]


def test_kv_cache_generation_equals_full_recompute(session, tiny_model):
    expected = recompute_greedy(tiny_model, PROMPT, 12)
    assert len(set(expected)) > 1, "degenerate test model: every greedy token is the same"
    assert greedy_tokens(session, PROMPT, 12) == expected


def test_dummy_past_prefill_gives_the_same_tokens(session):
    expected = greedy_tokens(session, PROMPT, 12)
    assert greedy_tokens(with_dummy_past(session), PROMPT, 12) == expected
    assert list(Generator(with_dummy_past(session), io_binding=True).generate(PROMPT, 12)) == expected


def test_io_binding_on_the_cpu_device_gives_the_same_tokens(session):
    """BoundCache is the CUDA path; on the CPU device it runs the same binding code."""
    assert list(Generator(session, io_binding=True).generate(PROMPT, 12)) == greedy_tokens(session, PROMPT, 12)


def test_batched_prefill_and_step_match_a_single_sequence_on_both_caches(session):
    single = Generator(session)
    single.prefill(PROMPT)
    expected = single.step(7)[0]
    for g in (Generator(session), Generator(session, io_binding=True)):
        g.prefill(np.array([PROMPT, PROMPT]))
        logits = g.step([7, 7])
        assert logits.shape == (2, 128)
        np.testing.assert_allclose(logits, np.stack([expected, expected]), atol=1e-5)


def test_steps_beyond_the_capacity_hint_grow_the_mask(session):
    g = Generator(session)
    g.prefill(PROMPT, capacity=len(PROMPT))
    tokens = []
    logits = g.step(1)
    for _ in range(4):
        tokens.append(int(logits[0].argmax()))
        logits = g.step(tokens[-1])
    tokens.append(int(logits[0].argmax()))
    assert tokens == recompute_greedy(session.path, PROMPT + [1], 5)


def test_sampling_is_reproducible_with_a_seed(session):
    def draw(seed):
        return list(Generator(session).generate(PROMPT, 16, temperature=1.5, top_p=0.95, seed=seed))

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_one_and_tiny_top_p_are_greedy(session):
    greedy = greedy_tokens(session, PROMPT, 10)
    assert list(Generator(session).generate(PROMPT, 10, temperature=2.0, top_k=1, seed=0)) == greedy
    assert list(Generator(session).generate(PROMPT, 10, temperature=2.0, top_p=1e-6, seed=0)) == greedy


def test_choose_keeps_to_the_top_k_and_top_p_sets():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert {choose(logits, Sampling(1.0, top_k=2), rng) for _ in range(300)} == {0, 1}
    assert {choose(logits, Sampling(1.0, top_p=0.7), rng) for _ in range(300)} == {0, 1}
    assert {choose(logits, Sampling(1.0), rng) for _ in range(2000)} == {0, 1, 2, 3}
    draws = [choose(logits, Sampling(1.0), rng) for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - 0.5) < 0.05


@pytest.mark.parametrize("kwargs, message", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                             ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 60}, "context of 64"),
                                             ({"max_new_tokens": -1}, "negative")])
def test_bad_requests_fail_before_any_work(session, kwargs, message):
    with pytest.raises(RuntimeUserError, match=message):
        Generator(session).generate(PROMPT, **{"max_new_tokens": 4, **kwargs})


def test_empty_prompt_is_a_user_error(session):
    with pytest.raises(RuntimeUserError, match="prompt is empty"):
        Generator(session).generate([], 3)


def test_eos_stops_and_on_token_streams(session):
    greedy = greedy_tokens(session, PROMPT, 8)
    seen = []
    out = list(Generator(session).generate(PROMPT, 8, eos_token_id=greedy[3], on_token=seen.append))
    assert out == seen == greedy[:greedy.index(greedy[3])]
    assert list(Generator(session).generate(PROMPT, 0)) == []


def test_text_generate_streams_words_from_the_bundle(bundle):
    pieces = []
    text = text_generate(bundle, None, "w5 w17 w99", max_new_tokens=6, on_text=pieces.append)
    assert text == "".join(pieces) and len(text.split()) == 6
    assert all(w.startswith("w") or w == "[UNK]" for w in text.split())


def test_text_stream_holds_back_incomplete_characters():
    class Bytes:  # a byte-level decoder: each token is one UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_default_eos_reads_generation_config(tmp_path):
    assert default_eos(tmp_path) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert default_eos(tmp_path) == [2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not available(CUDA_EP), reason="CUDAExecutionProvider does not load here")
def test_cuda_io_binding_keeps_the_cache_on_device_and_matches_cpu(tiny_model, session):
    gpu = open_session(tiny_model, cuda())
    assert gpu.provider == CUDA_EP
    assert list(Generator(gpu).generate(PROMPT, 12)) == greedy_tokens(session, PROMPT, 12)
