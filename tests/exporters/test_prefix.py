"""exporters/quantization/prefix.py: the first token's attention inputs pinned to float constants, and the
calibration that runs that token first and samples only what follows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.builder import build_graph
from exporters.calibration import CalibrationPlan, KVCacheCalibrationReader, cpu_session, declared, empty_past, \
    session_contract, step_feed
from exporters.quantization.prefix import MASK, attention_inputs, first_token_values, pin_first_token, \
    pinned_tensors
from exporters.quantize import QuantConfig, quantize
from models.weights import open_weights
from runtimes.contract import past_key, past_value, present_key, present_value
from tests.exporters.test_builder import NEW_FAMILIES, save, tiny_hf

TOKEN = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Gemma 3 (query, key and value each an input of the attention, after the q/k norms: keys and values are
    pinned) and Phi-3 (one packed input), as the builder writes them."""
    root = tmp_path_factory.mktemp("prefix")
    paths = {}
    for family in ("gemma3_text", "phi3"):
        paths[family] = root / f"{family}.onnx"
        build_graph(open_weights(save(tiny_hf(NEW_FAMILIES[family]()), root / family)), paths[family])
    return paths


def run(path: Path, ids: list[int], past_len: int = 0, past: dict | None = None) -> dict[str, np.ndarray]:
    session = cpu_session(path)
    contract = session_contract(session)
    feed = declared(step_feed(np.array(ids), past_len, past or empty_past(contract)),
                    {i.name for i in session.get_inputs()})
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's presents as the next step's past."""
    layers = sum(name.startswith("present") for name in outputs) // 2
    return {past: outputs[present] for i in range(layers)
            for past, present in ((past_key(i), present_key(i)), (past_value(i), present_value(i)))}


def pinned_copy(path: Path, out: Path, shift: float = 0.0) -> Path:
    """`path` with TOKEN pinned to its float values (+ `shift`, to see where the constants are read)."""
    model = onnx.load(str(path))
    values = first_token_values(model, pinned_tensors(model), TOKEN)
    pin_first_token(model, TOKEN, {name: v + shift for name, v in values.items()})
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("family, inputs", [("gemma3_text", 6), ("phi3", 3)])  # and the stream's two parts
def test_pinning_is_exact_in_float_and_applies_only_to_the_token_at_position_0(built, family, inputs, tmp_path):
    path = built[family]
    model = onnx.load(str(path))
    assert len(attention_inputs(model)) == inputs and len(pinned_tensors(model)) == inputs + 2
    exact, shifted = pinned_copy(path, tmp_path / "exact.onnx"), pinned_copy(path, tmp_path / "shift.onnx", 1.0)
    opening = [TOKEN, 7, 9, 11, 3, TOKEN, 2]
    for ids in (opening, [6, 7, 9, 11, 3, TOKEN, 2], [TOKEN]):
        ref = run(path, ids)["logits"]
        np.testing.assert_allclose(run(exact, ids)["logits"], ref, atol=2e-5)
        moved = np.abs(run(shifted, ids)["logits"] - ref).max()
        assert (moved > 0.1) if ids[0] == TOKEN else (moved == 0), (ids, moved)  # TOKEN elsewhere is not pinned
    # a decode step of TOKEN after a past is at position 2, not 0: untouched
    step = [run(p, [TOKEN], 2, as_past(run(p, [6, 7])))["logits"] for p in (path, shifted)]
    np.testing.assert_array_equal(step[0], step[1])
    model = onnx.load(str(shifted))
    assert sum(n.op_type == "Where" and n.input[0] == MASK for n in model.graph.node) == inputs + 2


def test_a_prefix_is_run_first_and_never_sampled(built):
    path = built["gemma3_text"]
    texts = [[TOKEN] + list(range(10, 40)), [TOKEN] + list(range(40, 70))]
    plan = CalibrationPlan(2, 8, 2, prefix=(TOKEN,))
    reader = KVCacheCalibrationReader(path, texts, plan)
    assert plan.cut_len == 9 and reader.windows.shape == (2, 9)
    assert TOKEN not in reader.windows  # each text's opening token left out of the stream
    feeds = list(reader.feeds())
    assert len(feeds) == len(reader) == 2 * 3
    assert [f["input_ids"].shape[1] for f in feeds] == [7, 1, 1] * 2
    assert [f["attention_mask"].shape[1] for f in feeds] == [8, 9, 10] * 2  # position 0 holds the prefix
    assert [f[past_key(0)].shape[2] for f in feeds] == [1, 8, 9] * 2
    np.testing.assert_allclose(feeds[0][past_key(0)], run(path, [TOKEN])[present_key(0)], atol=1e-6)
    # the prefill sample is the window's tokens as they follow the prefix in one prompt
    whole = run(path, [TOKEN] + reader.windows[0][:7].tolist())["logits"]
    session = cpu_session(path)
    np.testing.assert_allclose(session.run(["logits"], feeds[0])[0][0], whole[0, 1:], atol=2e-5)


def test_w8a8_pins_the_float_first_token_and_calibrates_on_what_follows(built, tmp_path):
    path = built["gemma3_text"]
    rng = np.random.default_rng(0)
    texts = [[TOKEN] + rng.integers(6, 160, 40).tolist() for _ in range(8)]
    config = dict(recipe="w8a8", num_prefill=4, seq_len=16, num_decode_steps=2, max_ppl_increase=1e9,
                  judge_like_check=False)
    report = quantize(path, tmp_path / "pinned.onnx", texts[:6], QuantConfig(**config, first_token=TOKEN), texts[6:])
    assert report["pinned_first_token"] == {"token": TOKEN, "tensors": 6 + 2}
    assert report["calibration_samples"] == 4 * 3
    model = onnx.load(str(tmp_path / "pinned.onnx"))
    pinned = {n.input[2]: n.input[1] for n in model.graph.node if n.op_type == "Where" and n.input[0] == MASK}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    keys = [name for name in pinned if "k_norm" in name]  # the keys' basis no float pass rotates
    float_keys = first_token_values(onnx.load(str(path)), keys, TOKEN)
    assert len(keys) == 3
    for name in keys:
        np.testing.assert_allclose(inits[pinned[name]], float_keys[name], atol=1e-4)
    # the quantized model's cache at position 0 is the float model's
    np.testing.assert_allclose(run(tmp_path / "pinned.onnx", [TOKEN, 9, 10])[present_key(0)][:, :, :1],
                               run(path, [TOKEN])[present_key(0)], atol=1e-4)
    plain = quantize(path, tmp_path / "plain.onnx", texts[:6], QuantConfig(**config), texts[6:])
    assert "pinned_first_token" not in plain and plain["calibration_samples"] == 4 * 3
    plain_model = onnx.load(str(tmp_path / "plain.onnx"))
    assert not any(n.op_type == "Where" and n.input[0] == MASK for n in plain_model.graph.node)
