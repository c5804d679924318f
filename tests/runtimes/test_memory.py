"""runtimes/memory.py: the memory estimate's cache term is what the generator really allocates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtimes.contract import Contract
from runtimes.generate import Generator
from runtimes.memory import kv_bytes_per_token, memory_need, prefill_activation_bytes, rotary_table_bytes
from runtimes.providers import cpu
from runtimes.session import open_session

CONTRACT = Contract(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, vocab_size=49152,
                    max_position_embeddings=8192, attention_windows=(None,) * 30, fused_attention=True,
                    rope_theta=100000.0)


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


def test_rotary_tables_count_every_position_the_graph_serves():
    """SmolLM2: one cos/sin pair of 8192 x 32 floats (2 MiB); Gemma 3 270M: two rotary bases, 32,768 x 128 each
    (64 MiB), a sixteenth at 2,048 positions (`package --context`); LongRoPE stacks two pairs; a traced graph holds
    its tables among the weights."""
    assert rotary_table_bytes(CONTRACT) == 2 * 8192 * 32 * 4
    gemma = Contract(num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256, hidden_size=640, vocab_size=262144,
                     max_position_embeddings=32768, attention_windows=(512, None) * 9, fused_attention=True,
                     rope_theta=1e6, rope_local_theta=1e4)
    assert rotary_table_bytes(gemma) == 64 << 20
    assert rotary_table_bytes(dataclasses.replace(gemma, max_position_embeddings=2048)) == 4 << 20
    assert memory_need(gemma, 0, 2048, 256, 2048)["rotary_tables_bytes"] == 64 << 20
    phi = dataclasses.replace(gemma, rope_local_theta=None, rotary_dim=96, rope_scaling={"rope_type": "longrope"})
    assert rotary_table_bytes(phi) == 2 * 2 * 32768 * 48 * 4
    assert rotary_table_bytes(dataclasses.replace(gemma, fused_attention=False)) == 0
