"""runtimes/memory.py: the memory estimate's cache term is what the generator really allocates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtimes.contract import Contract
from runtimes.generate import Generator
from runtimes.memory import kv_bytes_per_token, memory_need, prefill_activation_bytes
from runtimes.providers import cpu
from runtimes.session import open_session

CONTRACT = Contract(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, vocab_size=49152,
                    max_position_embeddings=8192, attention_windows=(None,) * 30, fused_attention=True)


def test_cache_term_equals_the_cache_the_generator_holds(tiny_model):
    session = open_session(tiny_model, cpu(threads=1))
    generator = Generator(session, io_binding=False)
    generator.prefill([1, 2, 3], capacity=20)
    allocated = sum(int(np.prod(v.shape)) * 4 for v in generator._cache._past.values())  # 3 positions held
    assert allocated == kv_bytes_per_token(session.contract) * 3


def test_smollm2_shape_figures():
    """SmolLM2-135M: 45 KiB of fp32 cache per token, half in float16; prefill's scores grow with the context."""
    assert kv_bytes_per_token(CONTRACT) == 46080
    assert kv_bytes_per_token(dataclasses.replace(CONTRACT, kv_dtype="float16")) == 23040
    short, long = (prefill_activation_bytes(CONTRACT, n, 512, 1536) for n in (1552, 8192))
    assert short == pytest.approx(48.4 * 2 ** 20, rel=0.01) and long > 3 * short
    assert prefill_activation_bytes(CONTRACT, 2000, 512, 1536) < prefill_activation_bytes(CONTRACT, 2000, 1024, 1536)
    assert prefill_activation_bytes(CONTRACT, 100, 512, 1536) == prefill_activation_bytes(CONTRACT, 100, 1024, 1536)
    need = memory_need(CONTRACT, 540_279_116, 1552, 512, 1536)
    assert need["total_bytes"] / 2 ** 20 == pytest.approx(782, abs=1)  # measured peak: 787 MiB (module docstring)
