"""exporters/kv16.py and `pipeline optimize --kv-fp16`: a fused graph's KV cache in float16, everything else as it was."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from exporters.builder import build_graph
from exporters.kv16 import kv_to_fp16, write_kv16
from models.errors import UserError
from models.weights import open_weights
from runtimes.contract import LOGITS, past_names, present_names, read_contract
from runtimes.caches import SharedCache
from runtimes.generate import Generator
from runtimes.providers import cpu
from runtimes.session import open_session
from tests.exporters.test_builder import NEW_FAMILIES, save
from tests.models.test_hf import tiny_hf


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])  # windows and two rope bases; partial rotary, LongRoPE
def test_float16_cache_keeps_the_logits_to_half_precision_and_halves_the_cache(family, tmp_path):
    source = tmp_path / "fused.onnx"
    build_graph(open_weights(save(tiny_hf(NEW_FAMILIES[family]()), tmp_path / "ckpt")), source)
    target = tmp_path / "kv16" / "model.onnx"
    target.parent.mkdir()
    assert write_kv16(source, target) == {"kv_dtype": "float16", "attention_ops": 3}

    model = onnx.load(str(target), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    c = read_contract(model)
    assert c.kv_dtype == "float16" and c.fused_attention
    assert {types[n] for n in [*past_names(c.num_layers), *present_names(c.num_layers)]} == {onnx.TensorProto.FLOAT16}
    assert types[LOGITS] == onnx.TensorProto.FLOAT  # only the cache changes

    ref, half = (Generator(open_session(p, cpu(threads=1)), prefill_chunk=4) for p in (source, target))
    assert isinstance(half._cache, SharedCache) and half._cache._buffers == []
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, 11)  # past the windows, across prefill chunks
    a, b = ref.prefill(prompt, capacity=16), half.prefill(prompt, capacity=16)
    assert {x.dtype for x in half._cache._buffers} == {np.dtype(np.float16)} and b.dtype == np.float32
    assert sum(x.nbytes for x in half._cache._buffers) * 2 == sum(x.nbytes for x in ref._cache._buffers)
    scale = np.abs(a).max()
    worst = float(np.abs(a - b).max())
    for _ in range(5):
        token = int(a.argmax())
        assert int(b.argmax()) == token
        a, b = ref.step(token), half.step(token)
        worst = max(worst, float(np.abs(a - b).max()))
    assert 0 < worst < 5e-3 * scale  # rounded to float16, and no more than that


def test_a_float16_cache_is_not_converted_twice(tmp_path):
    source = tmp_path / "fused.onnx"
    build_graph(open_weights(save(tiny_hf(NEW_FAMILIES["qwen3"]()), tmp_path / "ckpt")), source)
    model = onnx.load(str(source))
    kv_to_fp16(model)
    with pytest.raises(UserError, match="already"):
        kv_to_fp16(model)
