"""ONNX fp32 -> int8/int4: static QDQ (optionally smoothed, with a measured accuracy budget) or weight-only.

Recipes (lists of passes: exporters/quantization/recipes.py; the passes: exporters/quantization/passes.py):
  static  onnxruntime quantize_static: QDQ, int8 symmetric weights (7-bit range by default, see below), uint8
          activations, calibrated on prefill and decode feeds (exporters/calibration.py). Only MatMuls whose
          weight is an initializer; embeddings (Gather) stay float.
  w8a8    static's QDQ graph, written by the recipe itself from the float graph (exporters/quantization/
          static.py: the same nodes and codes, without quantize_static's copies of the float model; the float
          passes and GPTQ stream the weights, so a 1B model fits) + rotations folded into the weights
          (exporters/rotation.py) + SmoothQuant smoothing
          (exporters/smoothing.py), whose largest outlier channels are split off into small float MatMuls, + an
          online Hadamard rotation before each down_proj (rotation.py's `online_hadamard`) + mixed precision:
          the quantized model is measured on validation ids and, over budget (perplexity, and check's top-1 and
          KL thresholds: exporters/acceptance.py), MatMuls are ranked
          by the KL on the logits with only that MatMul in int8 (`QuantSwitch` makes that one session, not
          one model per MatMul), and the most sensitive ones leave static int8 until the model is accepted
          (verified on the real model). They fall back (`fallback`) to int8 weight-only MatMulNBits (default:
          on the CPU its accuracy level 4 quantizes the activation per block at run time, so they still compute
          in int8 and stream int8 weights), or to float (`fallback="float"`: a graph that is all static QDQ or
          float, as NPU execution providers require).
  w8, w4  weight-only MatMulNBits (blockwise symmetric): the int8/int4 weights are unpacked per block inside the
          kernel, activations stay float (or int8 per block with accuracy_level 4). Calibration text only serves
          the GPTQ rounding, streamed over bounded groups of Hessians into one packed store that the writer and
          the search share (exporters/quantization/packs.py); w4 moves its most damaging MatMuls to 8 bits
          (or 5-7: `w4_high_bits`) within a budget, judged on an exact switch between the two widths. The
          float weights are read lazily, one at a time.

  gguf    a graph built from a quantized GGUF file with that file's own blocks as MatMulNBits, exactly
          (exporters/quantization/grid.py, models/gguf_grid.py); only measured, never searched.

Choices read from onnxruntime's source (1.32), for both QDQ recipes:
  * activations are uint8: on x86 the CPU QDQ fusion only accepts int8 activations on ARM
    (`QDQIsInt8Allowed()`), so int8 activations would leave DQ -> float MatMul in the graph, slower than fp32;
    uint8 x int8 (U8S8) is MLAS's fast path on x86 and fine on ARM.
  * MatMul outputs are not quantized (`OpTypesToExcludeOutputQuantization`): every consumer (GQA, SiLU, norms)
    is float, so Q/DQ there only adds error; DQ -> MatMul (no Q) fuses to MatMulIntegerToFloat.
  * per-channel weight scales are on axis 1, the output channel of a (K, N) MatMul weight. That is already
    ORT's QDQ default for MatMul; it is set explicitly (`QDQOpTypePerChannelSupportToAxis`) and tested.
  * weights are 7-bit where they must be (`reduce_range`): on x86 without VNNI (AVX2), MLAS's U8S8 kernel adds
    pairs of u8*s8 products in saturating int16 (255*127*2 > 32767). Per-channel scales put every column at
    the full +-127, so it saturates everywhere: a real model's perplexity explodes with 8-bit
    per-channel weights (fine with 7-bit). This, not the axis, is why per-channel came out worse than
    per-tensor. With VNNI (and on ARM) 8-bit weights are exact and halve the weight rounding step (lower
    held-out KL; docs/ has the figures). `pipeline quantize` picks
    7 bits exactly where its machine saturates; the written model records which (WEIGHT_BITS_KEY), and the
    runtime refuses 8-bit weights on a saturating CPU.
  * calibration memory is bounded with `CalibStridedMinMax` = 1: the calibrator folds each sample into its
    ranges / histograms before the next. It works for every method (`CalibMaxIntermediateOutputs` in 1.32 clears
    the collected outputs without folding them in, so it would silently calibrate on the last partial batch),
    and the histogram calibrators need it anyway: they stack one stride's tensors with np.asarray, which fails
    when prefill (S tokens) and decode (1 token) samples share a stride.
  * a MatMul left float must read the float activation: quantize_static shares one Q/DQ pair among all
    readers of a tensor, so `restore_float_readers` undoes that for the readers that are not int8.
  * the fused graph's contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization) are unknown to ONNX
    shape inference; without types ORT skips every activation after them and silently produces weight-only
    DQ. ORT's symbolic shape inference, run first, knows them.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from exporters import progress
from exporters.graph import GraphIndex
from exporters.onnx_io import files_size, load_lazily, load_onnx, move_model
from exporters.quantization.config import WEIGHT_BITS_KEY, QuantConfig  # noqa: F401 (imported from here)
from exporters.quantization.embedding import untie_embeddings
from exporters.quantization.evaluate import perplexity  # noqa: F401
from exporters.quantization.nbits import fake_nbits  # noqa: F401
from exporters.quantization.passes import Quantizing, targets
from exporters.quantization.qdq import mark_weight_bits, qdq_quantized  # noqa: F401
from exporters.quantization.recipes import steps
from exporters.quantization.report import read_report
from models.errors import UserError
from models.files import staging_dir
from runtimes.contract import read_contract


def _load_checked(model_path: Path, lazy: bool = False) -> onnx.ModelProto:
    """The model, if it is one `pipeline export` wrote (it carries the contract) and is float32. `lazy`: the
    weights only MatMuls read stay in the model's external data, read one at a time when they are quantized
    (a 1B model's 5 GB of them are never all in memory)."""
    model = load_lazily(model_path, matmul_only_weights) if lazy else load_onnx(model_path)
    contract = read_contract(model, model_path)  # one-line RuntimeUserError when it carries none
    if contract.kv_dtype != "float32" or any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise UserError(f"{model_path} is a float16 model: quantize the float32 export (or its fused graph "
                        f"without --fp16)")
    return model


# weight-only: each float weight is read once to be packed (w4's rotations stream them through a new file);
# w8a8: its float passes stream the weights they change through new files (passes.py `rewriting`), its writer
# reads each once (exporters/quantization/static.py)
LAZY_RECIPES = ("w4", "w8", "w8a8")


def matmul_only_weights(model: onnx.ModelProto) -> set[str]:
    """Initializers read by weight MatMuls alone (a tied table, also gathered, is not)."""
    g = GraphIndex(model)
    weights = {n.input[1] for n in g.weight_matmuls()}
    return {w for w in weights if all(r.op_type == "MatMul" and r.input[1] == w for r in g.consumers.get(w, []))}


def quantize(model_path: str | Path, out_path: str | Path, calib_ids: list[list[int]],
             config: QuantConfig = QuantConfig(), valid_ids: list[list[int]] | None = None) -> dict:
    """Quantize `model_path` into `out_path` (written atomically, external data when over 2 GB) by running the
    recipe's passes (exporters/quantization/recipes.py) in order.

    `calib_ids` / `valid_ids`: token id sequences (tokenized by the caller) for calibration and for the
    measurement against the float model. Returns the report (`QuantReport.to_dict()`): recipe, sizes, quantized
    MatMuls, float MatMuls with the reason, share of weight-MatMul FLOPs (K*N per token) that runs quantized,
    perplexity before/after when `valid_ids`.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    model = _load_checked(model_path, lazy=config.recipe in LAZY_RECIPES)
    untie_embeddings(model)  # a tied table stored once gets its two readers' own copies back
    index = GraphIndex(model)
    shapes = index.weight_shapes()
    activation_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in shapes]
    with staging_dir(out_path) as workdir:
        q = Quantizing(model, model_path, workdir / out_path.name, workdir, calib_ids, valid_ids, config.exclude,
                       reasons={name: "excluded by config" for name in config.exclude},
                       weights_dir=model_path.parent)
        q.targets = targets(model, config.exclude)  # validates the excluded names
        del model, index  # the passes own the float graph now (a writer may let it go, see write_nbits)
        for step, step_config in progress.each(steps(config), f"quantize {config.recipe}", unit="pass",
                                               label=lambda s: s[0].name):
            q = step.run(q, step_config)
        q.details.setdefault("weight_rounding", "nearest")
        if config.weight_only_bits is None:
            mark_weight_bits(q.staged, 7 if config.reduce_range else 8)
        report = read_report({**shapes, **q.added_shapes}, activation_matmuls, q.staged, config, q.details,
                             q.reasons)
        report.size_before, report.size_after = files_size(model_path), files_size(q.staged)
        move_model(q.staged, out_path)
    return report.to_dict()
