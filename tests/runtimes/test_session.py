"""open_session: contract from metadata, bundle directories, and one-line errors for bad files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from runtimes.contract import past_key, past_value, present_value
from runtimes.errors import RuntimeUserError
from runtimes.generate import greedy_tokens
from runtimes.providers import CPU_EP, cpu, tensorrt
from runtimes.session import model_shape, open_session, resolve_model_path

from .conftest import REPO


def test_session_exposes_contract_names_dtype_and_provider(tiny_model):
    s = open_session(tiny_model, cpu(), threads=1)
    c = s.contract
    assert (c.num_layers, c.num_kv_heads, c.head_dim, c.vocab_size, c.max_position_embeddings) == (2, 2, 8, 128, 64)
    assert s.input_names[:3] == ("input_ids", "attention_mask", "position_ids")
    assert past_value(1) in s.input_names and present_value(1) in s.output_names
    assert s.kv_dtype == np.float32 and s.provider == CPU_EP
    empty = np.zeros((1, 2, 0, 8), np.float32)
    feeds = {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64),
             "position_ids": np.array([[0, 1]]), **{n: empty for n in s.input_names if n.startswith("past")}}
    logits = s.run(feeds, ["logits"])[0]
    assert logits.shape == (1, 2, 128)


def test_bundle_directory_resolves_to_its_model(bundle):
    assert resolve_model_path(bundle) == bundle / "model.onnx"
    assert open_session(bundle).path == bundle / "model.onnx"


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(RuntimeUserError, match="does not exist"):
        open_session(tmp_path / "nope.onnx")


def test_directory_without_a_single_model_is_a_user_error(tmp_path):
    with pytest.raises(RuntimeUserError, match="holds 0 .onnx files"):
        open_session(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_model_is_a_one_line_user_error(tmp_path, tiny_model, damage):
    data = tiny_model.read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 50 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(RuntimeUserError) as err:
        open_session(bad)
    assert "\n" not in str(err.value) and "export it again" in str(err.value)


def test_model_without_contract_metadata_is_a_user_error(tmp_path, tiny_model):
    proto = onnx.load(str(tiny_model))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(RuntimeUserError, match="carries no pipeline.contract metadata"):
        open_session(tmp_path / "bare.onnx")


def test_contract_that_does_not_match_the_graph_is_a_user_error(tmp_path, tiny_model):
    proto = onnx.load(str(tiny_model))
    entry = next(p for p in proto.metadata_props if p.key == "pipeline.contract")
    entry.value = json.dumps({**json.loads(entry.value), "num_layers": 3, "attention_windows": [None] * 3})
    onnx.save(proto, str(tmp_path / "lying.onnx"))
    with pytest.raises(RuntimeUserError, match=re.escape(past_key(2))):
        open_session(tmp_path / "lying.onnx")


@pytest.mark.parametrize("bits, saturates, native, refused", [
    ("8", True, False, True), ("8", False, False, False), ("7", True, False, False),
    ("8", True, True, False),  # every int8 MatMul on the native kernel, exact for 8-bit weights on every build
])
def test_full_range_int8_weights_are_refused_where_the_cpu_kernels_saturate(tmp_path, tiny_model, monkeypatch,
                                                                            bits, saturates, native, refused):
    """Full 8-bit weights on an x86 CPU without VNNI would run and give garbage: one clear error instead."""
    import runtimes.session as session_module
    from exporters.cpu_kernels import INT8_GEMM_KEY

    assert session_module.INT8_GEMM_KEY == INT8_GEMM_KEY
    proto = onnx.load(str(tiny_model))
    proto.metadata_props.add(key="pipeline.int8_weight_bits", value=bits)
    if native:
        proto.metadata_props.add(key=INT8_GEMM_KEY, value="native")
    onnx.save(proto, str(tmp_path / "q.onnx"))
    monkeypatch.setattr(session_module, "int8_gemm_saturates", lambda: saturates)
    if refused:
        with pytest.raises(RuntimeUserError, match="--reduce-range"):
            open_session(tmp_path / "q.onnx")
    else:
        assert open_session(tmp_path / "q.onnx").contract.num_layers == 2


def test_weight_bits_key_mirrors_the_exporters():
    from exporters.quantize import WEIGHT_BITS_KEY as written
    from runtimes.session import WEIGHT_BITS_KEY as read

    assert read == written


def test_profiling_writes_a_trace(tmp_path, tiny_model):
    s = open_session(tiny_model, profile_prefix=str(tmp_path / "trace"))
    greedy_tokens(s, [1, 2], 2)
    trace = Path(s.end_profiling())
    assert trace.parent == tmp_path and trace.stat().st_size > 0


def test_runtimes_imports_nothing_outside_the_device_allowlist():
    """The package ships alone to the device: onnxruntime, numpy, tokenizers and the standard library only."""
    code = ("import sys, runtimes.providers, runtimes.session, runtimes.generate, runtimes.bench, runtimes.__main__\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers', 'onnx', 'click', 'models', 'exporters', 'pipeline'})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_model_shape_feeds_tensorrt_profiles_for_every_real_input(tiny_model, tmp_path):
    """The path open_session takes for TensorRT (minus TensorRT itself): read the model, then build profiles."""
    shape = model_shape(tiny_model)
    c = shape.contract
    assert (c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (2, 8, 64)
    (_, options), _ = tensorrt(cache_dir=tmp_path).session_providers(shape)
    named = {entry.split(":")[0] for entry in options["trt_profile_min_shapes"].split(",")}
    assert named == set(shape.input_names) and len(named) == 7


def test_runtime_and_exporters_share_one_contract():
    """runtimes/ owns the contract; exporters have no copy of it, and the session reads that class."""
    import importlib.util

    from runtimes import contract as owned
    from runtimes import session

    assert importlib.util.find_spec("exporters.contract") is None
    assert owned.Contract is session.Contract
