"""How far a quantized model is from the float one on validation ids: perplexity, and check's top-1 agreement and
KL (exporters/acceptance.py), each from teacher-forced prefill log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from exporters.acceptance import Thresholds
from exporters.calibration import cpu_session, declared, empty_past, session_contract, step_feed
from models.errors import UserError
from runtimes.contract import LOGITS, Contract

LogProbs = Callable[[np.ndarray], np.ndarray]  # ids (S,) -> log-softmax of the logits predicting ids[1:], (S-1, V)
# Rows per float64 block: log-probabilities are stored in float32 and every sum over the vocabulary runs in float64
# on blocks of rows, so memory holds a few (S, vocab) float32 arrays, not float64 ones and their temporaries (a
# 262k vocabulary makes each row 1 MB in float32: Gemma 3's quantize spent gigabytes on them).
ROWS = 16


def sequences(ids_list: list[list[int]], contract: Contract) -> list[np.ndarray]:
    """Each sequence cut into chunks the model can hold (positions < max_position_embeddings); chunks under
    2 tokens dropped. Ids outside the vocabulary are a user error, not an onnxruntime Gather failure."""
    limit = contract.max_position_embeddings
    chunks = [np.asarray(ids[i:i + limit], np.int64) for ids in ids_list for i in range(0, len(ids), limit)]
    if any(c.size and (c.min() < 0 or c.max() >= contract.vocab_size) for c in chunks):
        raise UserError(f"validation token ids must lie in [0, {contract.vocab_size}) (the model's vocabulary): "
                        f"was the text tokenized with another tokenizer?")
    return [c for c in chunks if c.size >= 2]


def log_probs(session: ort.InferenceSession, contract: Contract, ids: np.ndarray,
              extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Teacher-forced prefill of `ids`: log-softmax of the logits, (len - 1, vocab), predicting ids[1:]."""
    feed = declared(step_feed(ids, 0, empty_past(contract)), {i.name for i in session.get_inputs()})
    logits = session.run([LOGITS], {**feed, **(extra or {})})[0][0, :-1]
    out = np.empty(logits.shape, np.float32)
    for start in range(0, logits.shape[0], ROWS):
        block = logits[start:start + ROWS].astype(np.float64)
        block -= block.max(axis=-1, keepdims=True)
        out[start:start + ROWS] = block - np.log(np.exp(block).sum(axis=-1, keepdims=True))
    return out


def _normalized(rows: np.ndarray) -> np.ndarray:
    """float32 log-probability rows in float64, renormalized (stored in float32 they sum to 1 only to rounding)."""
    z = rows.astype(np.float64)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_sum(ref: np.ndarray, got: np.ndarray) -> float:
    """Sum over rows of KL(ref || got) for log-probability rows, in float64 a block of rows at a time (never
    below 0: identical rows give exactly 0)."""
    total = 0.0
    for start in range(0, ref.shape[0], ROWS):
        r, g = _normalized(ref[start:start + ROWS]), _normalized(got[start:start + ROWS])
        total += float(np.sum(np.exp(r) * (r - g)))
    return max(total, 0.0)


def perplexity_of(model: LogProbs, seqs: list[np.ndarray]) -> float:
    nll, count = 0.0, 0
    for ids in seqs:
        nll -= float(model(ids)[np.arange(ids.size - 1), ids[1:]].astype(np.float64).sum())
        count += ids.size - 1
    if count == 0:
        raise UserError("perplexity needs at least one validation sequence of 2 or more tokens")
    return float(np.exp(nll / count))


def session_log_probs(model_path: str | Path) -> tuple[LogProbs, Contract]:
    session = cpu_session(model_path)
    contract = session_contract(session)
    return (lambda ids: log_probs(session, contract, ids)), contract


def perplexity(model_path: str | Path, ids_list: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all `ids_list` tokens, each sequence run as one prefill (chunked to the
    model's max_position_embeddings)."""
    model, contract = session_log_probs(model_path)
    return perplexity_of(model, sequences(ids_list, contract))


@dataclass(frozen=True)
class Agreement:
    """A candidate against the float reference, measured as `check` measures a variant against PyTorch."""
    ppl_ref: float   # perplexity of the reference
    ppl: float       # perplexity of the candidate
    top1: float      # mean over sequences of the share of positions whose argmax agrees with the reference's
    kl: float        # mean over sequences of the mean per-token KL(reference || candidate), nats
    tokens: int = 0  # positions compared (0: top-1 and KL not measured)

    @property
    def ppl_increase(self) -> float:
        return self.ppl / self.ppl_ref - 1.0

    def top1_bound(self, z: float) -> float:
        """A lower confidence bound on top-1: `z` binomial standard errors below the estimate. Another text
        (check's) draws other positions, so a model that clears the threshold only by its own sampling error
        would fail there about half the time."""
        if not self.tokens:
            return self.top1
        return self.top1 - z * (self.top1 * (1.0 - self.top1) / self.tokens) ** 0.5

    def meets(self, t: Thresholds, z: float = 0.0) -> bool:
        return ((t.max_ppl_increase is None or self.ppl_increase <= t.max_ppl_increase)
                and self.top1_bound(z) >= t.min_top1 and (t.max_kl is None or self.kl <= t.max_kl))

    def to_dict(self) -> dict:
        return {"ppl_increase": self.ppl_increase, "top1": self.top1, "kl": self.kl, "tokens": self.tokens}


def agreement(reference: LogProbs, candidate: LogProbs, seqs: list[np.ndarray]) -> Agreement:
    """Perplexities (pooled over tokens, as `perplexity`), top-1 and KL of `candidate` against `reference`."""
    nll_ref = nll = 0.0
    count, top1, kl = 0, [], []
    for ids in seqs:
        ref, got = reference(ids), candidate(ids)
        idx = (np.arange(ids.size - 1), ids[1:])
        nll_ref, nll = nll_ref - float(ref[idx].astype(np.float64).sum()), nll - float(got[idx].astype(np.float64).sum())
        count += ids.size - 1
        top1.append(float(np.mean(ref.argmax(-1) == got.argmax(-1))))
        kl.append(kl_sum(ref, got) / ref.shape[0])
    if count == 0:
        raise UserError("perplexity needs at least one validation sequence of 2 or more tokens")
    return Agreement(float(np.exp(nll_ref / count)), float(np.exp(nll / count)), float(np.mean(top1)),
                     float(np.mean(kl)), count)
