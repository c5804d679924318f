"""SmoothQuant-style smoothing: move activation outliers into the weights before int8 quantization.

LLM activations have a few channels whose magnitude is 10-100x the rest; one per-tensor int8 scale for such a
tensor wastes almost all of its levels on those channels. Weights are flat and quantized per output channel, so
they can absorb a per-input-channel factor. For every MatMul input X read only by weight MatMuls:

    s_j = max|X_j|^alpha / max|W_j|^(1-alpha)       (W_j: row j of every consumer weight)
    rows of every consumer MatMul weight *= s,  and the producer of X absorbs 1/s:
      * a norm (SmoothQuant's case): its weight (and bias) /= s
      * a gated MLP product act(gate) * up (the down_proj input, where Llama-family models keep their largest
        outliers): the up_proj weight columns that produce X /= s (through a Split when gate/up are packed)

which is an exact re-parametrisation: (x * g / s) @ (diag(s) W) = (x * g) @ W. The migration strength alpha
can be chosen per activation (`best_alpha`): the grid value whose fake-quantized Q(X/s) @ Q(diag(s) W) is
closest to X @ W on sampled calibration tokens. An X that also feeds something
else (a residual, a non-weight MatMul) is left alone, because dividing it by s would change that consumer
(reading only its shape is fine). The attention output (o_proj input) is not smoothed: its producer is the
value projection, and scaling it would change the KV cache the model outputs. Works on the plain export
(RMSNorm ends in `Mul(weight, x_hat)`, GPT-2 uses LayerNormalization) and on the fused graph
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, SkipLayerNormalization).

Smoothing cannot tame a channel 1000x the rest (SmolLM2's down_proj inputs reach 3323 where the typical channel
peaks near 1): whatever alpha, either the activation range or that weight row is wasted on it. Such channels are
split off instead (`outlier_channels`, LLM.int8()'s decomposition made static): their s is a power of two large
enough that the smoothed channel sits well inside the rest's range, the int8 MatMul gets a zero weight row for
them, and a small float MatMul reads them back through a Gather and adds their exact contribution:

    X @ W = (X/s)[:, R] @ (sW)[R] + (X/s)[:, O] @ (sW)[O]       R: the other channels, O: the split ones

so the calibrated int8 range of X/s is set by the rest alone, and a held-out spike in a split channel costs
nothing (its int8 row is zero, its float path does not clip).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex, rescale, weight_array
from exporters.probe import Feeds, probe

# op type -> (input index of the scale, input index of the bias or None); output 0 is the normalized tensor
NORM_SCALE_INPUTS: dict[str, tuple[int, int | None]] = {
    "SimplifiedLayerNormalization": (1, None),
    "LayerNormalization": (1, 2),
    "SkipSimplifiedLayerNormalization": (2, None),
    "SkipLayerNormalization": (2, 3),
}

@dataclass(frozen=True)
class SmoothGroup:
    activation: str                # tensor read (as input A) by every consumer MatMul
    source: str                    # node whose parameters absorb 1/s (see `scale_inputs` / `first_column`)
    scale_inputs: tuple[int, ...]  # inputs of `source` divided by s: a norm's weight (and bias), or a MatMul's weight
    first_column: int | None       # None: divide the whole vector (norm); else the MatMul weight columns
                                   # [first_column, first_column + K) that produce the activation are divided
    matmuls: tuple[str, ...]       # consumer MatMuls whose weight rows are multiplied by s


def _norm_scale_inputs(node: onnx.NodeProto, g: GraphIndex, width: int) -> tuple[int, ...] | None:
    """Inputs of a norm (or of the Mul applying an RMSNorm weight) holding its per-channel weight and bias."""
    const = [g.constant_source(name) if name else None for name in node.input]
    if node.op_type in NORM_SCALE_INPUTS:
        scale, bias = NORM_SCALE_INPUTS[node.op_type]
        picked = [i for i in (scale, bias) if i is not None and i < len(node.input) and node.input[i]]
        return tuple(picked) if all(const[i] is not None for i in picked) else None
    if node.op_type == "Mul":
        found = [i for i, c in enumerate(const) if c is not None]
        if len(found) == 1:
            dims = list(const[found[0]].dims)
            if dims and dims[-1] == width and int(np.prod(dims)) == width:
                return tuple(found)
    return None


def _split_sizes(split: onnx.NodeProto, g: GraphIndex, total: int) -> list[int] | None:
    """Output widths of a Split along the last axis (sizes from its input, its attribute, or equal parts)."""
    attrs = {a.name: a for a in split.attribute}
    if "axis" not in attrs or attrs["axis"].i not in (-1, 2):
        return None
    if len(split.input) > 1 and split.input[1]:
        sizes = g.inits.get(split.input[1])
        return None if sizes is None else [int(v) for v in numpy_helper.to_array(sizes)]
    if "split" in attrs:
        return list(attrs["split"].ints)
    return [total // len(split.output)] * len(split.output)


def _linear_factor(mul: onnx.NodeProto, g: GraphIndex, width: int) -> tuple[onnx.NodeProto, int] | None:
    """The weight MatMul (and first column) producing one factor of `mul`, read by nothing else: in a gated MLP,
    act(gate) * up, the `up` projection. Dividing its columns by s divides the product by s, exactly."""
    for factor in mul.input:
        if not g.only_reader(factor, mul) or factor not in g.producers:
            continue
        p = g.producers[factor]
        if p.name in g.weight_names and p.output[0] == factor and g.inits[p.input[1]].dims[1] == width:
            return p, 0
        if p.op_type == "Split" and p.input[0] in g.producers:
            mm = g.producers[p.input[0]]
            if mm.name in g.weight_names and g.only_reader(mm.output[0], p):
                sizes = _split_sizes(p, g, int(g.inits[mm.input[1]].dims[1]))
                index = list(p.output).index(factor)
                if sizes and sizes[index] == width:
                    return mm, sum(sizes[:index])
    return None


def find_smooth_groups(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> list[SmoothGroup]:
    """Every MatMul input that only weight MatMuls (none in `exclude`) read, produced by a norm whose weight can
    absorb 1/s, or by a gated-MLP product whose linear factor's MatMul columns can."""
    g = GraphIndex.of(model)
    outputs = {o.name for o in model.graph.output}
    skip = set(exclude)
    groups, seen = [], set()
    for mm in g.weight_matmuls():
        act = mm.input[0]
        if act in seen or act in outputs or act not in g.producers:
            continue
        seen.add(act)
        users = g.consumers[act]
        if not all(u.name in g.weight_names and u.name not in skip and u.input[0] == act and u.input[1] != act
                   for u in users):
            continue
        node = g.producers[act]
        width = int(g.inits[mm.input[1]].dims[0])
        matmuls = tuple(u.name for u in users)
        picked = _norm_scale_inputs(node, g, width) if node.output[0] == act else None
        if picked is not None:
            groups.append(SmoothGroup(act, node.name, picked, None, matmuls))
        elif node.op_type == "Mul" and (factor := _linear_factor(node, g, width)) is not None:
            groups.append(SmoothGroup(act, factor[0].name, (1,), factor[1], matmuls))
    return groups


@dataclass
class ActivationStats:
    """What the smoothing needs of one activation: per-channel extremes over every calibration token, and a
    sample of token rows (the extreme ones always in it) to measure quantization error on."""
    abs_max: np.ndarray  # (C,)
    low: np.ndarray      # (C,) per-channel min
    high: np.ndarray     # (C,) per-channel max
    rows: np.ndarray     # (R, C)


def collect_activation_stats(model: onnx.ModelProto, tensors: list[str], feeds: Feeds,
                             workdir: Path | None = None, max_rows: int = 512, seed: int = 0,
                             weights_dir: Path | None = None) -> dict[str, ActivationStats]:
    """Per-channel extremes over all tokens of all feeds, and up to `max_rows` token rows, for each tensor.

    The rows are every feed's largest-magnitude token (LLMs put their "massive activations" on a few tokens,
    often the first, and those set the int8 range) plus a uniform sample of the rest.
    """
    rng = np.random.default_rng(seed)
    acc: dict[str, dict] = {}
    for values in probe(model, tensors, feeds, workdir, weights_dir):
        for name, x in values.items():
            x = x.reshape(-1, x.shape[-1])
            a = acc.setdefault(name, {"low": x.min(0), "high": x.max(0), "peak": [], "rest": []})
            a["low"], a["high"] = np.minimum(a["low"], x.min(0)), np.maximum(a["high"], x.max(0))
            peak = int(np.abs(x).max(1).argmax())
            a["peak"].append(x[peak])
            others = np.delete(x, peak, axis=0)
            if len(others):
                a["rest"].append(others[rng.choice(len(others), min(len(others), max_rows // 8), replace=False)])
    stats = {}
    for name, a in acc.items():
        peaks, rest = np.stack(a["peak"]), np.concatenate(a["rest"]) if a["rest"] else np.zeros((0, a["low"].size))
        if len(peaks) + len(rest) > max_rows:
            peaks = peaks[np.argsort(-np.abs(peaks).max(1))[: max_rows // 4]]
            rest = rest[rng.choice(len(rest), min(len(rest), max_rows - len(peaks)), replace=False)]
        stats[name] = ActivationStats(np.maximum(-a["low"], a["high"]), a["low"], a["high"],
                                      np.concatenate([peaks, rest]).astype(np.float32))
    return stats


def fake_quant_error(stats: ActivationStats, weights: list[np.ndarray], s: np.ndarray, weight_levels: int,
                     rotation: np.ndarray | None = None, split: np.ndarray | None = None,
                     exact_outputs: list[np.ndarray] | None = None) -> float:
    """Mean over the sampled token rows of the relative squared error of Q(X/s) @ Q(diag(s) W_m) against
    X @ W_m, summed over the readers m. Per row, so the few massive-activation tokens do not drown the rest.

    Q of the activation: one asymmetric uint8 scale over the tensor's whole smoothed range (as static minmax
    calibration sets it); Q of a weight: symmetric per output channel with `weight_levels` (127, or 63 with
    reduce_range), as the quantizer writes them.

    `rotation` (b x b): the online block rotation that will follow the smoothing (rotation.py's
    `online_hadamard`), so what is quantized is (X/s) R and R^T diag(s) W, R = I (x) rotation; the `split`
    channels leave the int8 MatMul (their weight rows zero there) and are added back exactly, as `split_channels`
    does. Without a rotation the caller passes only the channels that stay (`split` must be None).
    `exact_outputs`: X @ W_m, when the caller has them (they do not depend on s).
    """
    x = stats.rows / s
    split = np.zeros(0, np.int64) if split is None else split
    if rotation is not None:
        b = len(rotation)
        x = (x.reshape(len(x), -1, b) @ rotation).reshape(x.shape)
        low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
    else:
        low, high = min(0.0, float((stats.low / s).min())), max(0.0, float((stats.high / s).max()))
    scale = (high - low) / 255 or 1.0
    zero = np.round(-low / scale)
    xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    err = ref = np.zeros(len(stats.rows))
    for i, w in enumerate(weights):
        ws = w * s[:, None]
        ws[split] = 0.0
        if rotation is not None:  # each block of b input rows times R^T (a batched BLAS product)
            ws = np.matmul(rotation.T, ws.reshape(-1, b, ws.shape[1])).reshape(ws.shape)
        wscale = np.abs(ws).max(0) / weight_levels
        wscale[wscale == 0] = 1.0
        wq = np.round(ws / wscale) * wscale
        y = stats.rows @ w if exact_outputs is None else exact_outputs[i]
        exact = stats.rows[:, split] @ w[split] if split.size else 0.0
        err = err + ((xq @ wq + exact - y) ** 2).sum(1)
        ref = ref + (y ** 2).sum(1)
    return float(np.mean(err / np.maximum(ref, 1e-30)))


ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(4, 20))  # 0.2 .. 0.95


def best_alpha(stats: ActivationStats, weights: list[np.ndarray], weight_levels: int,
               grid: Iterable[float] = ALPHA_GRID, rotation: np.ndarray | None = None,
               split: np.ndarray | None = None) -> tuple[float, float]:
    """The migration strength with the least fake-quantized output error for this activation and its readers
    (SmoothQuant's alpha, searched per tensor as Intel Neural Compressor's auto-alpha does). Returns
    (alpha, relative error). With an online `rotation` to follow, the error is that of the rotated int8 MatMul
    plus the exact `split` channels, each alpha's s built as `smooth` builds it (see `fake_quant_error`)."""
    def scales(a: float) -> np.ndarray:
        s = smoothing_scales(stats.abs_max, weights, a)
        if rotation is not None and split is not None and split.size:
            s[split] = split_scales(stats.abs_max, s, split)
        return s

    exact = [stats.rows @ w for w in weights]
    errors = {a: fake_quant_error(stats, weights, scales(a), weight_levels, rotation,
                                  split if rotation is not None else None, exact) for a in grid}
    alpha = min(errors, key=errors.get)
    return alpha, errors[alpha]


def smoothing_scales(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), 1 where a channel is dead (zero activation or weight row)."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(act_max, alpha) / np.power(w_max, 1.0 - alpha)
    return np.where(np.isfinite(s) & (s > 0), np.maximum(s, 1e-5), 1.0).astype(np.float32)


def _private_initializer(model: onnx.ModelProto, node: onnx.NodeProto, index: int, uses: Counter) -> TensorProto:
    """The initializer feeding `node.input[index]`, first copied under a new name if anything else reads it
    (directly or through an Identity): scaling a shared tensor would silently rescale its other readers too."""
    g = GraphIndex(model)
    name = node.input[index]
    if name in g.inits and uses[name] == 1:
        return g.inits[name]
    uses[name] -= 1
    clone = TensorProto()
    clone.CopyFrom(g.constant_source(name))
    clone.name = f"{name}.smoothed.{node.name}"
    model.graph.initializer.append(clone)
    node.input[index] = clone.name
    uses[clone.name] = 1
    return model.graph.initializer[-1]


def smooth(model: onnx.ModelProto, groups: list[SmoothGroup], act_max: dict[str, np.ndarray],
           alpha: float | dict[str, float], outliers: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Fold the smoothing factors into `model` in place; returns s for each group's activation.

    `alpha`: one migration strength for all, or one per activation name. `outliers`: per activation name, the
    channels to split off into a float MatMul (see the module docstring and `split_channels`)."""
    uses = GraphIndex(model).uses
    scales = {}
    for g in groups:
        fresh = GraphIndex(model)  # an earlier group may have rescaled or cloned these weights, or split channels
        nodes, inits = fresh.nodes, fresh.inits  # (which rewrites the node list: the old NodeProtos are copies)
        mms = [nodes[m] for m in g.matmuls]
        a = alpha[g.activation] if isinstance(alpha, dict) else alpha
        s = smoothing_scales(act_max[g.activation], [weight_array(inits[m.input[1]]) for m in mms], a)
        split = np.asarray((outliers or {}).get(g.activation, ()), np.int64)
        if split.size:
            s[split] = split_scales(act_max[g.activation], s, split)
        source = nodes[g.source]
        for idx in g.scale_inputs:
            rescale(_private_initializer(model, source, idx, uses), _divider(s, g.first_column))
        side = inits.get(f"{g.source}{OUTLIER_SUFFIX}.weight") if g.first_column is not None else None
        if side is not None:  # an earlier group split channels off the source MatMul: its side rows feed the
            rescale(side, _divider(s, g.first_column))  # same columns, which must be divided alike
        for mm in mms:
            rescale(_private_initializer(model, mm, 1, uses), lambda w: w * s[:, None])
        if split.size:
            split_channels(model, g, split)
        scales[g.activation] = s
    return scales


# a split channel's calibrated peak ends up at most this fraction of the other channels' smoothed range
SPLIT_HEADROOM = 0.25
# channels whose calibrated peak exceeds this multiple of the tensor's 99th-percentile channel peak are split off
OUTLIER_RATIO = 4.0
# suffix of the float MatMul that adds back the split channels' contribution (`outlier_matmuls` finds them)
OUTLIER_SUFFIX = "/outlier_channels"


def pick_outliers(act_max: np.ndarray, limit: int, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """Up to `limit` channels, largest first, whose calibrated peak is over `ratio` x the 99th percentile of the
    channel peaks (a threshold relative to the tensor: typical channels' scale differs 6x across SmolLM2's layers)."""
    if limit <= 0 or act_max.size < 2:
        return np.zeros(0, np.int64)
    top = np.argsort(-act_max, kind="stable")[:limit]
    return np.sort(top[act_max[top] > ratio * np.percentile(act_max, 99)]).astype(np.int64)


def split_scales(act_max: np.ndarray, s: np.ndarray, split: np.ndarray) -> np.ndarray:
    """s for the split channels: powers of two (exact to divide by) putting each channel's peak within
    SPLIT_HEADROOM of the other channels' smoothed range, so the int8 range is set by those alone."""
    rest = np.setdiff1d(np.arange(act_max.size), split)
    rest_max = float((act_max[rest] / s[rest]).max()) if rest.size else 1.0
    need = act_max[split] / (SPLIT_HEADROOM * max(rest_max, 1e-30))
    return np.exp2(np.ceil(np.log2(np.maximum(need, 1.0)))).astype(np.float32)


def split_channels(model: onnx.ModelProto, group: SmoothGroup, channels: np.ndarray) -> None:
    """Move `channels` of the group's activation out of its MatMuls: their weight rows become zero, and
    Gather(X, channels) @ those rows (a float MatMul named `<reader><OUTLIER_SUFFIX>`) is added to each output."""
    inits = GraphIndex(model).inits
    readers = set(group.matmuls)
    index, picked = f"{group.activation}{OUTLIER_SUFFIX}", f"{group.activation}{OUTLIER_SUFFIX}/x"
    model.graph.initializer.append(numpy_helper.from_array(channels.astype(np.int64), index))
    gather = helper.make_node("Gather", [group.activation, index], [picked], axis=-1, name=f"{index}/gather")
    nodes = []
    for node in model.graph.node:
        if node.name not in readers:
            nodes.append(node)
            continue
        if gather is not None:
            nodes.append(gather)
            gather = None
        side, out, name = weight_array(inits[node.input[1]])[channels], node.output[0], f"{node.name}{OUTLIER_SUFFIX}"
        rescale(inits[node.input[1]], lambda w: _zero_rows(w, channels))
        model.graph.initializer.append(numpy_helper.from_array(side, f"{name}.weight"))
        node.output[0] = f"{out}/without_outliers"
        nodes += [node, helper.make_node("MatMul", [picked, f"{name}.weight"], [f"{name}/y"], name=name),
                  helper.make_node("Add", [node.output[0], f"{name}/y"], [out], name=f"{name}/add")]
    GraphIndex(model).set_nodes(nodes)


def _zero_rows(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    w = w.copy()
    w[rows] = 0.0
    return w


def outlier_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """The float MatMuls `split_channels` added, each mapped to the MatMul whose split channels it computes."""
    return {n.name: n.name.removesuffix(OUTLIER_SUFFIX) for n in model.graph.node
            if n.op_type == "MatMul" and n.name.endswith(OUTLIER_SUFFIX)}


def _divider(s: np.ndarray, first_column: int | None):
    """w -> w / s: the whole vector for a norm weight, the columns producing the activation for a MatMul."""
    if first_column is None:
        return lambda w: w / s.reshape(w.shape)

    def divide_columns(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[:, first_column:first_column + s.size] /= s
        return w
    return divide_columns
