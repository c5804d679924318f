"""runtimes/contract.py: names, axes and dtypes declared once; the contract round-trips through a model file; a
model written by an older version is refused with one line that says to re-export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from runtimes.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, METADATA_KEY, POSITION_IDS, Contract, is_past,
                               past_key, past_names, past_value, present_key, present_names, present_value,
                               read_contract, write_contract)
from runtimes.errors import RuntimeUserError
from runtimes.session import open_session

from .conftest import REPO

CONTRACT = Contract(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=128, vocab_size=300,
                    max_position_embeddings=256, attention_windows=(None, 64, None), kv_dtype="float16",
                    family="mistral", rope_theta=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}, fused_attention=True)
OLD_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "kv_dtype", "family", "max_position_embeddings",
              "rope_theta", "rope_scaling", "fused_attention")  # what the exporter wrote before the dimensions


def identity_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_names_axes_and_dtypes_come_from_one_declaration():
    c = CONTRACT
    assert c.input_names() == [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(3)]
    assert c.output_names() == [LOGITS, *present_names(3)]
    assert past_names(2) == [past_key(0), past_value(0), past_key(1), past_value(1)]
    assert present_names(1) == [present_key(0), present_value(0)]
    assert all(is_past(n) for n in past_names(3)) and not any(is_past(n) for n in present_names(3))
    axes = c.dynamic_axes()
    assert axes[past_key(2)] == {0: "batch_size", 2: "past_sequence_length"}
    assert axes[present_value(0)] == {0: "batch_size", 2: "total_sequence_length"}
    assert axes[ATTENTION_MASK] == {0: "batch_size", 1: "total_sequence_length"}
    assert set(axes) == set(c.input_names()) | set(c.output_names())
    dtypes = c.dtypes()
    assert dtypes[INPUT_IDS] == dtypes[POSITION_IDS] == "int64"
    assert dtypes[past_value(1)] == dtypes[present_key(2)] == "float16" and LOGITS not in dtypes


def test_contract_round_trips_through_a_saved_model_file(tmp_path):
    model = identity_model()
    write_contract(model, dataclasses.replace(CONTRACT, num_layers=1, attention_windows=(None,)))
    write_contract(model, CONTRACT)  # replaces, never duplicates
    assert [p.key for p in model.metadata_props] == [METADATA_KEY]
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert read_contract(onnx.load(str(tmp_path / "m.onnx"))) == CONTRACT
    meta = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    assert Contract.from_metadata(meta) == CONTRACT  # the device's way: onnxruntime's metadata map
    assert set(json.loads(meta[METADATA_KEY])) == {f.name for f in dataclasses.fields(Contract)}


def test_windows_must_cover_every_layer():
    with pytest.raises(ValueError, match="2 attention windows for 3 layers"):
        dataclasses.replace(CONTRACT, attention_windows=(None, None))


def old_model(tmp_path, tiny_model):
    """The tiny model as an older exporter wrote it: the contract without the model dimensions."""
    proto = onnx.load(str(tiny_model))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items() if k in OLD_FIELDS})
    onnx.save(proto, str(tmp_path / "old.onnx"))
    return tmp_path / "old.onnx"


def test_a_model_from_an_older_version_is_refused_with_one_line(tmp_path, tiny_model):
    path = old_model(tmp_path, tiny_model)
    with pytest.raises(RuntimeUserError) as err:
        open_session(path)
    message = str(err.value)
    assert "\n" not in message and "re-export" in message and "older" in message
    assert "num_heads" in message and "hidden_size" in message and "attention_windows" in message


def test_the_runtime_cli_prints_the_refusal_as_one_line(tmp_path, tiny_model):
    path = old_model(tmp_path, tiny_model)
    p = subprocess.run([sys.executable, "-m", "runtimes", "bench", str(path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "re-export" in lines[0] and "Traceback" not in p.stderr


def test_unreadable_or_missing_contract_is_one_line():
    model = identity_model()
    with pytest.raises(RuntimeUserError, match="carries no pipeline.contract metadata"):
        read_contract(model)
    model.metadata_props.add(key=METADATA_KEY, value="{not json")
    with pytest.raises(RuntimeUserError, match="unreadable") as err:
        read_contract(model)
    assert "\n" not in str(err.value)
