"""Pass `search`: mixed precision by measured sensitivity. MatMuls leave the recipe's low-precision form (w8a8: static
int8 -> int8 weight-only or float; w4: 4 -> 8 bits), most damaging per FLOP first, until the model meets the
acceptance thresholds: the perplexity budget and, as `check` will judge it, top-1 agreement and KL."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from exporters import progress
from exporters.acceptance import Thresholds
from exporters.onnx_io import files_size
from exporters.quantization.evaluate import Agreement, LogProbs, agreement, kl_sum, perplexity_of, sequences, \
    session_log_probs
from exporters.quantization.switch import QuantSwitch


class Judge:
    """Measures candidates against the float source model on the validation ids, and says if they are accepted."""

    def __init__(self, source: Path, valid_ids: list[list[int]], accept: Thresholds, z: float = 0.0):
        reference, contract = session_log_probs(source)
        self.seqs = sequences(valid_ids, contract)
        self.valid_ids, self.accept, self.z = valid_ids, accept, z
        self.ppl_only = accept.min_top1 <= 0 and accept.max_kl is None  # no second forward pass needed
        # the float model's session is closed before any candidate's opens when nothing needs it after the
        # reference perplexity, or when its log-probabilities take less memory than it (1B: 1 GB against 5)
        rows = sum(ids.size - 1 for ids in self.seqs)
        if not self.ppl_only and 4 * rows * contract.vocab_size < files_size(source):
            kept = {ids.tobytes(): reference(ids) for ids in self.seqs}
            reference = lambda ids: kept[ids.tobytes()]  # noqa: E731
        self.ppl_ref = perplexity_of(reference, self.seqs)
        self.reference: LogProbs | None = None if self.ppl_only else reference
        del reference

    def __call__(self, candidate: LogProbs) -> Agreement:
        if self.ppl_only:
            return Agreement(self.ppl_ref, perplexity_of(candidate, self.seqs), 1.0, 0.0)
        return agreement(self.reference, candidate, self.seqs)

    def model(self, path: Path) -> Agreement:
        return self(session_log_probs(path)[0])

    def accepts(self, a: Agreement) -> bool:
        return a.meets(self.accept, self.z)


@dataclass
class SearchReport:
    kl_one_at_a_time: dict[str, float]             # KL with only that MatMul low-precision, in ranking order
    simulated_ppl_by_count: dict[int, float]        # perplexity on the switch, by how many were taken out
    ppl_by_count: dict[int, float] = field(default_factory=dict)  # perplexity of the written model, likewise
    agreement_by_count: dict[int, dict] = field(default_factory=dict)  # its top-1 and KL, when they are judged

    def to_dict(self) -> dict:
        out = {"kl_one_at_a_time": self.kl_one_at_a_time,
               "simulated_ppl_by_count": dict(sorted(self.simulated_ppl_by_count.items())),
               "ppl_by_count": self.ppl_by_count}
        if self.agreement_by_count:
            out["agreement_by_count"] = self.agreement_by_count
        return out


def _first_tokens(ids_list: list[list[int]], count: int) -> list[list[int]]:
    """The first `count` tokens of `ids_list`, keeping the sequence boundaries."""
    out = []
    for ids in ids_list:
        if count <= 0:
            break
        out.append(list(ids[:count]))
        count -= len(out[-1])
    return out


def one_at_a_time_kl(switch: QuantSwitch, targets: list[str], ids_list: list[list[int]]) -> dict[str, float]:
    """Mean per-token KL(float || only this MatMul int8) of the next-token distributions, for each target.

    End to end, not per layer: the output error of a MatMul says little about its effect (a q/k projection
    with a tiny relative error can move a peaked softmax a lot, a down_proj with a larger one may not matter).
    """
    seqs = sequences(ids_list, switch.contract)
    reference = [switch.log_probs(ids, ()) for ids in seqs]
    tokens = sum(ids.size - 1 for ids in seqs)
    kl = {}
    for name in progress.each(targets, "sensitivity", unit="MatMul"):
        total = sum(kl_sum(ref, switch.log_probs(ids, {name})) for ids, ref in zip(seqs, reference))
        kl[name] = total / max(tokens, 1)
    return kl


def smallest_prefix(n: int, meets: Callable[[int], bool]) -> int:
    """Smallest k in 1..n with meets(k) (meets(0) is known to fail), by doubling then bisection: 2*log2(n)
    evaluations instead of n, assuming more MatMuls in float never costs perplexity. n if nothing meets."""
    lo, hi = 0, 1  # invariant: lo fails; hi meets, or hi == n
    while hi < n and not meets(hi):
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi


def take_out_until_budget(switch: QuantSwitch, candidates: list[str], judge: Judge, sensitivity_tokens: int,
                          measure: Callable[[list[str]], Agreement],
                          flops: dict[str, int]) -> tuple[list[str], dict[str, float], SearchReport, Agreement]:
    """The least FLOPs of `candidates` to take out of the low-precision form so that the model meets `judge`.

    Ranks by one-at-a-time KL on `switch` (gate on = the low-precision form, off = float, or w4's 8 bits) per
    FLOP (`flops`: K*N of each weight), the greedy answer to this knapsack: an output projection can cause less
    KL than the worst down_proj but hold a fifth of the FLOPs, so taking it out first buys little accuracy for
    much low-precision share. Searches the prefix length on the simulation, closes it, then `measure`s the real
    model (it writes it, the prefix in the recipe's fallback form, and judges it); if the real model is not
    accepted (its kernels disagree with the simulation, e.g. int16 saturation without reduce_range, or the
    fallback's own error), more come out, 25% more at a time, until it is. The last model measured is the one chosen.
    Returns (taken out, one-at-a-time KL of every candidate, the search report, the chosen model's agreement).
    """
    kl = one_at_a_time_kl(switch, candidates, _first_tokens(judge.valid_ids, sensitivity_tokens))
    ranking = sorted(candidates, key=lambda name: kl[name] / flops[name], reverse=True)
    report = SearchReport({name: kl[name] for name in ranking}, {})

    def simulated_meets(k: int) -> bool:
        a = judge(lambda ids: switch.log_probs(ids, set(ranking[k:])))
        report.simulated_ppl_by_count[k] = a.ppl
        return judge.accepts(a)

    k, n = smallest_prefix(len(ranking), simulated_meets), len(ranking)
    switch.close()  # its session would sit beside the written models' while they are measured
    while True:
        a = measure(ranking[:k])
        report.ppl_by_count[k] = a.ppl
        if not judge.ppl_only:
            report.agreement_by_count[k] = a.to_dict()
        if judge.accepts(a) or k == n:
            break
        k = min(n, k + max(1, k // 4))  # small steps: each one taken out costs low-precision share
    return ranking[:k], kl, report, a
