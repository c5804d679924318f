"""What quantizing a model will hold in memory, estimated from its graph before any work starts.

The passes keep the float graph in memory and rewrite copies of it; onnxruntime sessions hold the float model
for calibration and for judging the result; GPTQ keeps every target's input Hessian (K x K, float64) until the
writer has used it. The estimate counts those from the model file's size and the graph's MatMul shapes, so the
stage can refuse with one line, before calibrating, what this machine cannot hold (instead of the kernel's
out-of-memory killer ending it without a word). The copies were measured on SmolLM2-135M (docs/benchmarks.md,
"1B-class checkpoints").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporters.graph import GraphIndex
from exporters.onnx_io import files_size
from exporters.quantization.packs import HESSIAN_BUDGET, hessian_groups
from runtimes.contract import read_contract

# float-model copies alive at the peak, by recipe. static (onnxruntime's quantize_static): the graph in memory,
# its calibration session, the augmented and quantized copies it makes; from SmolLM2-135M's measured peak RSS
# (7.75 GB from a 654 MB float model with 0.81 GB of Hessians), less the base and the Hessians, over the
# model's size, rounded up. w8a8 streams its float passes through files and writes its QDQ graph itself
# (exporters/quantization/static.py): a probe or search session of the float graph, the float64 copies of the
# table and head while they are rotated, the int8 model being written. Measured without the search (docs/
# benchmarks.md): Llama-3.2-1B 9.9 GB against 13.2 estimated.
MODEL_COPIES = {"static": 10.0, "w8a8": 1.5}
SEARCHED = ("w8a8", "w4")  # the recipes with a budget search (--no-search: written, then measured)
# the weight-only recipes read each float weight from the model's file when they pack it, so one float copy is
# alive at a time: the calibration session's (GPTQ), then the judge's. Beside it: the packed store, which the
# search's switch session holds again as onnxruntime's prepacked copy (it lets go of an initializer once it has
# prepacked it), and the largest group of Hessians GPTQ gathers in one pass (exporters/quantization/packs.py).
# Measured with GPTQ and the search (docs/benchmarks.md): SmolLM2-135M 1.9 GiB against 2.5 estimated,
# Llama-3.2-1B 10.4 GiB against 12.4, Qwen2.5-1.5B 11.7 GiB against 14.5.
WEIGHT_ONLY = ("w4", "w8")
WEIGHT_ONLY_COPIES = 1.0
PACKED_COPIES = 2.0
# gguf writes its blocks beside the float graph, drops it, then measures: the float model's session and the
# written one's. Measured on SmolLM2-135M (0.65 GB counted) 1.72 GB; on a Llama-3.2-1B shape (6.0 GB) 10.7 GB.
GGUF_COPIES = 2.0
GPTQ_RECIPES = ("w8a8", "w8", "w4")
BASE_BYTES = 600 << 20  # the Python process with onnxruntime, onnx and numpy loaded


# (window, vocab) float32 arrays alive at once while a candidate is judged: onnxruntime's logits, the reference's
# and the candidate's log-probabilities, and the float64 blocks (exporters/quantization/evaluate.py)
LOGITS_ROWS = 3


@dataclass(frozen=True)
class MemoryEstimate:
    model_bytes: int     # the float model's files, a tied table counted twice (quantizing splits it)
    copies: float        # float-model copies alive at the peak
    hessian_bytes: int   # GPTQ's input Hessians alive at once
    logits_bytes: int = 0  # vocabulary-wide rows: the search's cached reference and a judged window's logits
    packed_bytes: int = 0  # weight-only recipes: the MatMulNBits blocks packed once, held PACKED_COPIES times
    rotation_bytes: int = 0  # w4 --rotate: float64 temporaries of the largest weight while it is rotated

    @property
    def total(self) -> int:
        return int(BASE_BYTES + self.copies * self.model_bytes + self.hessian_bytes + self.logits_bytes
                   + PACKED_COPIES * self.packed_bytes + self.rotation_bytes)

    def describe(self) -> str:
        gib = 1 << 30
        parts = [f"{self.copies:g} {'copy' if self.copies == 1 else 'copies'} of the {self.model_bytes / gib:.1f} "
                 f"GiB float model"]
        if self.packed_bytes:
            parts.append(f"{PACKED_COPIES:g} of its {self.packed_bytes / gib:.1f} GiB of packed weights")
        if self.hessian_bytes:
            parts.append(f"{self.hessian_bytes / gib:.1f} GiB of GPTQ input Hessians")
        if self.logits_bytes:
            parts.append(f"{self.logits_bytes / gib:.1f} GiB of vocabulary-wide logits")
        if self.rotation_bytes:
            parts.append(f"{self.rotation_bytes / gib:.1f} GiB of float64 copies while rotating")
        return f"about {self.total / gib:.1f} GiB: " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") \
            + parts[-1]

    def to_dict(self) -> dict:
        return {"estimate_bytes": self.total, "model_bytes": self.model_bytes, "model_copies": self.copies,
                "hessian_bytes": self.hessian_bytes, "logits_bytes": self.logits_bytes,
                "packed_bytes": self.packed_bytes, "rotation_bytes": self.rotation_bytes}


def hessian_bytes(model: onnx.ModelProto, exclude: tuple[str, ...] = (), budget: int | None = None) -> int:
    """float64 K x K per distinct input of the weight MatMuls GPTQ rounds: all of them, or the largest group
    streamed GPTQ gathers at once within `budget` (exporters/quantization/packs.py)."""
    g = GraphIndex(model)
    widths = {n.input[0]: g.inits[n.input[1]].dims[0] for n in g.weight_matmuls() if n.name not in exclude}
    if budget is None:
        return sum(8 * k * k for k in widths.values())
    return max((sum(8 * widths[a] ** 2 for a in group) for group in hessian_groups(widths, budget)), default=0)


def packed_bytes(model: onnx.ModelProto, widths: tuple[int, ...], block_size: int) -> int:
    """MatMulNBits blocks of every weight MatMul at each of `widths`: codes and a float scale per block."""
    total = 0
    for k, n in GraphIndex(model).weight_shapes().values():
        blocks = -(-k // block_size) * n
        total += sum(blocks * (block_size * bits // 8 + 4) for bits in widths)
    return total


def tied_table_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a table stored once for a tied head, which quantizing splits into two (embedding.untie_embeddings)."""
    g = GraphIndex(model)
    total = 0
    for n in model.graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and axis == 1 and n.input[0] in g.inits:
            total += 4 * int(np.prod(g.inits[n.input[0]].dims))
    return total


def logits_bytes(vocab_size: int, window: int, sensitivity_tokens: int) -> int:
    """float32 rows of the vocabulary's width: the sensitivity ranking's cached reference log-probabilities and
    the arrays of one judged window."""
    return 4 * vocab_size * (sensitivity_tokens + LOGITS_ROWS * window)


def model_copies(recipe: str) -> float:
    """Float-model copies alive at the peak (w8a8 and static calibrate, smooth and write QDQ copies whether
    searched or not)."""
    return WEIGHT_ONLY_COPIES if recipe in WEIGHT_ONLY else GGUF_COPIES if recipe == "gguf" else MODEL_COPIES[recipe]


def rotation_bytes(model: onnx.ModelProto) -> int:
    """w4's rotations stream the weights through a new data file (exporters/onnx_io.py `ExternalRewriter`), one
    at a time, each in float64 while it is rotated: two float64 copies of the largest (the token table or the
    head)."""
    return 2 * 8 * max((int(np.prod(t.dims)) for t in model.graph.initializer), default=0)


def estimate(path: str | Path, recipe: str, weight_rounding: str = "gptq", window: int = 128,
             sensitivity_tokens: int = 256, search: bool = True, block_size: int = 32,
             rotate: bool = False) -> MemoryEstimate:
    """The peak memory of quantizing the model at `path` with `recipe` (and its search, if it has one and
    `search`; w4 with its rotations when `rotate`), from its graph (weights not loaded)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    gptq = recipe in GPTQ_RECIPES and weight_rounding == "gptq"
    vocab = read_contract(model, path).vocab_size
    searched = search and recipe in SEARCHED
    hessians, packed = 0, 0
    if recipe in WEIGHT_ONLY:
        packed = packed_bytes(model, (4, 8) if searched else (8,) if recipe == "w8" else (4,), block_size)
        hessians = hessian_bytes(model, budget=HESSIAN_BUDGET) if gptq else 0
    elif gptq and recipe == "w8a8":  # Hessians in bounded groups; GPTQ's int8 codes (a byte a weight) kept,
        hessians = hessian_bytes(model, budget=HESSIAN_BUDGET)  # and for the search the w8 fallback's blocks:
        packed = packed_bytes(model, (8,), block_size) // (1 if searched else 2)  # the two, or the codes alone
    elif gptq:
        hessians = hessian_bytes(model)
    return MemoryEstimate(files_size(path) + tied_table_bytes(model), model_copies(recipe), hessians,
                          logits_bytes(vocab, window, sensitivity_tokens if searched else 0), packed,
                          rotation_bytes(model) if rotate and recipe == "w4" else 0)
