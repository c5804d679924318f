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
from runtimes.contract import read_contract

# float-model copies alive at the peak, by recipe: the graph in memory, a calibration or judging session, the
# writer's copy and the search's switch model (stand-in weights beside the originals). From SmolLM2-135M's
# measured peak RSS (w8a8 7.75 GB, w4 6.74 GB, from a 654 MB float model with 0.81 GB of Hessians), less the
# base and the Hessians, over the model's size, rounded up; static runs a subset of w8a8's passes.
MODEL_COPIES = {"static": 10.0, "w8a8": 10.0, "w4": 8.5}
SEARCHED = ("w8a8", "w4")  # the recipes with a budget search (--no-search: written, then measured)
# weight-only recipes written and measured without a search: the float graph while it is written (dropped once
# written), then the measuring sessions, the float model's and the written one's. Measured on SmolLM2-135M (0.65 GB
# counted): w4 and w8 nearest 1.72 and 1.80 GB, gguf 1.72 GB, w4 GPTQ 3.23 GB of which 0.81 GB Hessians (its rounded
# stand-ins and the calibration session: one copy more); on a Llama-3.2-1B shape (6.0 GB counted): w4 8.9 GB, w8
# 9.3 GB, gguf 10.7 GB, all under the estimate.
MEASURED_ONLY_COPIES = {"w8": 2.0, "w4": 2.0, "gguf": 2.0}
GPTQ_STAND_IN_COPIES = 1.0
GPTQ_RECIPES = ("w8a8", "w8", "w4")
BASE_BYTES = 600 << 20  # the Python process with onnxruntime, onnx and numpy loaded


# (window, vocab) float32 arrays alive at once while a candidate is judged: onnxruntime's logits, the reference's
# and the candidate's log-probabilities, and the float64 blocks (exporters/quantization/evaluate.py)
LOGITS_ROWS = 3


@dataclass(frozen=True)
class MemoryEstimate:
    model_bytes: int     # the float model's files, a tied table counted twice (quantizing splits it)
    copies: float        # float-model copies alive at the peak
    hessian_bytes: int   # GPTQ's input Hessians, all kept until written
    logits_bytes: int = 0  # vocabulary-wide rows: the search's cached reference and a judged window's logits

    @property
    def total(self) -> int:
        return int(BASE_BYTES + self.copies * self.model_bytes + self.hessian_bytes + self.logits_bytes)

    def describe(self) -> str:
        gib = 1 << 30
        return (f"about {self.total / gib:.1f} GiB: {self.copies:g} copies of the {self.model_bytes / gib:.1f} GiB "
                f"float model" + (f", {self.hessian_bytes / gib:.1f} GiB of GPTQ input Hessians"
                                  if self.hessian_bytes else "")
                + (f" and {self.logits_bytes / gib:.1f} GiB of vocabulary-wide logits" if self.logits_bytes else ""))

    def to_dict(self) -> dict:
        return {"estimate_bytes": self.total, "model_bytes": self.model_bytes, "model_copies": self.copies,
                "hessian_bytes": self.hessian_bytes, "logits_bytes": self.logits_bytes}


def hessian_bytes(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> int:
    """float64 K x K per distinct input of the weight MatMuls GPTQ rounds."""
    g = GraphIndex(model)
    widths = {n.input[0]: g.inits[n.input[1]].dims[0] for n in g.weight_matmuls() if n.name not in exclude}
    return sum(8 * k * k for k in widths.values())


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


def model_copies(recipe: str, search: bool = True, gptq: bool = False) -> float:
    """Float-model copies alive at the peak: a searched recipe's (MODEL_COPIES), or a written-then-measured one's
    (w8a8 and static calibrate, smooth and write QDQ copies whether searched or not: MODEL_COPIES too)."""
    if (search and recipe in SEARCHED) or recipe not in MEASURED_ONLY_COPIES:
        return MODEL_COPIES[recipe]
    return MEASURED_ONLY_COPIES[recipe] + (GPTQ_STAND_IN_COPIES if gptq else 0.0)


def estimate(path: str | Path, recipe: str, weight_rounding: str = "gptq", window: int = 128,
             sensitivity_tokens: int = 256, search: bool = True) -> MemoryEstimate:
    """The peak memory of quantizing the model at `path` with `recipe` (and its search, if it has one and
    `search`), from its graph (weights not loaded)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    gptq = recipe in GPTQ_RECIPES and weight_rounding == "gptq"
    vocab = read_contract(model, path).vocab_size
    searched = search and recipe in SEARCHED
    return MemoryEstimate(files_size(path) + tied_table_bytes(model), model_copies(recipe, search, gptq),
                          hessian_bytes(model) if gptq else 0,
                          logits_bytes(vocab, window, sensitivity_tokens if searched else 0))
