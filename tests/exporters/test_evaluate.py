"""exporters/quantization/evaluate.py: log-probabilities kept in float32, every vocabulary sum in float64 blocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporters.quantization.evaluate import ROWS, agreement, kl_sum, log_probs
from runtimes.contract import Contract, write_contract

VOCAB = 5000


def logits_model(table: np.ndarray) -> ort.InferenceSession:
    """input_ids -> logits = table[input_ids]: the logits of each position are a row of the table."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def exact(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    z = table[ids[:-1]].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


CONTRACT = Contract(num_layers=0, num_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1, vocab_size=VOCAB,
                    max_position_embeddings=64, attention_windows=())


def test_log_probs_in_float32_blocks_match_float64_and_kl_sums_match():
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((VOCAB, VOCAB)) * 8).astype(np.float32)  # logits of +-40: a peaked softmax
    ids = rng.integers(0, VOCAB, 2 * ROWS + 7)  # blocks that do not divide the rows
    got = log_probs(logits_model(table), CONTRACT, ids)
    assert got.dtype == np.float32 and got.shape == (ids.size - 1, VOCAB)
    want = exact(table, ids)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-6)
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)

    other = exact(table + (rng.standard_normal(table.shape) * 0.3).astype(np.float32), ids)
    want_kl = float(np.sum(np.exp(want) * (want - other)))
    assert want_kl > 0.1
    assert abs(kl_sum(got, other.astype(np.float32)) - want_kl) < 1e-4 * want_kl

    a = agreement(lambda x: exact(table, x).astype(np.float32), lambda x: other.astype(np.float32), [ids])
    assert a.tokens == ids.size - 1 and abs(a.kl - want_kl / a.tokens) < 1e-4 * a.kl
    assert a.top1 == np.mean(want.argmax(-1) == other.argmax(-1))
