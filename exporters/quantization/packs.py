"""Weight-only recipes' weights, packed once: GPTQ streamed over bounded groups of input Hessians, and a store of
MatMulNBits blocks that the writer and the search's switch both read, so the float weights are read once.

At 1B parameters the input Hessians of every MatMul (K x K, float64) are 9.5 GiB and the float graph is 5 GB: held
together, with a calibration session and the rounded stand-ins, they were four times what a 24 GB machine has.
Here the Hessians are gathered a group at a time, within `budget` bytes, one calibration pass per group (the
passes share one session, which also supplies the decode steps' past); each weight of the group is rounded,
packed at every width the recipe may write it, and its Hessian dropped. The packed store is what stays: 0.5 or
1 byte a weight, plus a float scale per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from exporters import progress
from exporters.calibration import CalibrationPlan, window_feeds
from exporters.gptq import fits, gptq_blockwise
from exporters.graph import GraphIndex
from exporters.onnx_io import tensor_array
from exporters.probe import input_hessians
from exporters.quantization.nbits import Packed, asymmetric_grid, pack, pack_asymmetric
from runtimes.contract import read_contract

# float64 Hessian bytes one calibration pass gathers: a Llama-3.2-1B's 9.5 GiB then take 5 passes, SmolLM2-135M's
# 0.8 GiB one
HESSIAN_BUDGET = 2 << 30


class PackedWeights:
    """MatMulNBits blocks by (MatMul, bits): put there by GPTQ, or packed from the float weight on first use
    (nearest rounding) and kept when `keep` (a search will ask for them again)."""

    def __init__(self, model: onnx.ModelProto, weights_dir: Path, block_size: int, keep: bool,
                 zero_points: bool = False):
        g = GraphIndex(model)
        self.weights = {n.name: g.inits[n.input[1]] for n in g.weight_matmuls()}
        self.weights_dir, self.block_size, self.keep = weights_dir, block_size, keep
        self.zero_points = zero_points  # 4-bit blocks with a zero point each (nbits.py `pack_asymmetric`)
        self._packs: dict[tuple[str, int], Packed] = {}

    def put(self, name: str, bits: int, packed: Packed) -> None:
        self._packs[name, bits] = packed

    def __call__(self, name: str, bits: int) -> Packed:
        """The weight of MatMul `name` packed at `bits`."""
        got = self._packs.get((name, bits)) if self.keep else self._packs.pop((name, bits), None)
        if got is None:
            got = pack(tensor_array(self.weights[name], self.weights_dir), bits, self.block_size, self.zero_points)
            if self.keep:
                self._packs[name, bits] = got
        return got


def rounded_pack(w: np.ndarray, hessian: np.ndarray, bits: int, store: PackedWeights) -> Packed:
    """`w` GPTQ-rounded on the store's grid at `bits` and packed."""
    if store.zero_points and bits == 4:
        grid = asymmetric_grid(w, bits, store.block_size)
        return pack_asymmetric(gptq_blockwise(w, hessian, bits, store.block_size, grid=grid), bits,
                               store.block_size, grid)
    return pack(gptq_blockwise(w, hessian, bits, store.block_size), bits, store.block_size)


def hessian_groups(widths: dict[str, int], budget: int) -> list[list[str]]:
    """`widths` (activation -> K, in graph order) cut into consecutive groups whose float64 K x K Hessians fit
    `budget` bytes together (a single one larger than it is a group of its own)."""
    groups, size = [[]], 0
    for name, k in widths.items():
        if groups[-1] and size + 8 * k * k > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += 8 * k * k
    return [g for g in groups if g]


@dataclass(frozen=True)
class StreamedGptq:
    """What streamed GPTQ did, for the report."""
    tokens: int                # calibration tokens each Hessian sums over
    passes: int                # calibration passes (Hessian groups)
    budget: int                # float64 Hessian bytes a pass may gather
    nearest: list[str]         # targets that kept nearest rounding (shared weight, or wider than tokens)

    def to_dict(self) -> dict:
        return {"calibration_tokens": self.tokens, "nearest_too_few_tokens": self.nearest,
                "hessian_passes": self.passes, "hessian_budget_bytes": self.budget}


def streamed_gptq(model: onnx.ModelProto, weights_dir: Path, bits_of: dict[str, tuple[int, ...]],
                  calib_ids: list[list[int]], plan: CalibrationPlan, store: PackedWeights, workdir: Path,
                  budget: int = HESSIAN_BUDGET) -> StreamedGptq:
    """GPTQ on MatMulNBits' grid (exporters/gptq.py) for each MatMul of `bits_of`, at each of its widths, packed
    into `store`; the input Hessians gathered over the calibration windows a bounded group at a time."""
    g = GraphIndex(model)
    nodes, contract = g.nodes, read_contract(model)
    windows = plan.windows(calib_ids, contract.vocab_size)
    tokens = len(windows) * plan.cut_len
    acts, widths, nearest = gptq_groups(g, list(bits_of), tokens)  # bits_of follows the graph's MatMuls

    def feeds(session: ort.InferenceSession, label: str) -> Iterator[dict[str, np.ndarray]]:
        for window in progress.each(windows, label, unit="window"):
            yield from window_feeds(session, contract, window, plan)

    passes = 0
    for passes, group, hessians in gathered_hessians(model, weights_dir, widths, feeds, workdir, budget):
        rounding = [(a, name) for a in group for name in acts[a]]
        for a, name in progress.each(rounding, f"GPTQ rounding {passes}", unit="MatMul"):
            w = tensor_array(g.inits[nodes[name].input[1]], weights_dir)
            for bits in bits_of[name]:
                store.put(name, bits, rounded_pack(w, hessians[a], bits, store))
            if name == acts[a][-1]:
                del hessians[a]
    return StreamedGptq(tokens, passes, budget, sorted(nearest))


def gptq_groups(g: GraphIndex, names: list[str], tokens: int, shared: bool = False
                ) -> tuple[dict[str, list[str]], dict[str, int], list[str]]:
    """The weight MatMuls `names` (in graph order) that GPTQ rounds on `tokens` calibration tokens, by input
    activation; each activation's width; and the rest, which keep nearest rounding: wider than the tokens
    (`fits`) or, unless `shared`, with a weight something else reads too."""
    acts: dict[str, list[str]] = {}
    nearest = []
    for name in names:
        node = g.nodes[name]
        if (not shared and g.uses[node.input[1]] != 1) or not fits(g.inits[node.input[1]].dims[0], tokens):
            nearest.append(name)
        else:
            acts.setdefault(node.input[0], []).append(name)
    widths = {a: g.inits[g.nodes[names[0]].input[1]].dims[0] for a, names in acts.items()}
    return acts, widths, nearest


def gathered_hessians(model: onnx.ModelProto, weights_dir: Path, widths: dict[str, int],
                      feeds: Callable[[ort.InferenceSession, str], Iterable[dict[str, np.ndarray]]], workdir: Path,
                      budget: int = HESSIAN_BUDGET) -> Iterator[tuple[int, list[str], dict[str, np.ndarray]]]:
    """The input Hessians (X^T X, float64) of the activations `widths` (name -> K, in graph order), a group
    within `budget` bytes at a time: (pass number from 1, the group, its Hessians), one pass of
    `feeds(session, label)` per group through one probe session of `model` (whose presents give the feeds'
    past). The caller drops each Hessian when it is done with it, before the next group is gathered; the
    session is closed while it rounds (a pass opens its own: without prepacking, that costs little)."""
    groups = hessian_groups(widths, budget)
    for i, group in enumerate(groups, 1):
        # gathered by a call that returns, not in this generator's body: a session bound to a name here would
        # stay open (its map of the float weights resident) while the caller rounds
        label = f"GPTQ Hessians {i}/{len(groups)}"
        hessians, _ = input_hessians(model, group, lambda session: feeds(session, label), workdir, weights_dir)
        yield i, group, hessians
        del hessians
