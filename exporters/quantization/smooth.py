"""Pass `smooth`: SmoothQuant smoothing with a per-activation alpha, and the outlier-channel split
(exporters/smoothing.py), configured for the static int8 and online rotation that follow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporters.calibration import KVCacheCalibrationReader
from exporters.graph import GraphIndex, weight_array
from exporters.rotation import online_matrix
from exporters.smoothing import ActivationStats, best_alpha, collect_activation_stats, find_smooth_groups, \
    pick_outliers, smooth
from runtimes.contract import LOGITS


SMOOTH_GROUPS = ("auto", "all", "gated", "none")  # SmoothConfig.groups


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float | None            # migration strength; None: per activation, the least fake-quantized error
    outlier_channels: int          # most channels per smoothed activation split off into a float MatMul
    weight_levels: int             # static int8 weight levels the error model rounds to (127, or 64: 7 bits)
    online_block: int              # block of the online Hadamard that will follow (alpha is chosen for it); 0: none
    exclude: tuple[str, ...] = ()  # MatMuls left float: their inputs are not smoothed
    groups: str = "auto"           # which activations: "all", "gated" (the down_proj inputs only) or "none";
                                   # "auto": "gated" once the residual stream is rotated, else "all"

    def __post_init__(self):
        if self.groups not in SMOOTH_GROUPS:
            raise ValueError(f"groups must be one of {SMOOTH_GROUPS}, got {self.groups!r}")


def fused_graph(model: onnx.ModelProto) -> bool:
    """Whether the graph is the fused one (its attention GroupQueryAttention): where `online_targets` goes past
    the down_proj inputs. An unfused export's q, k and v (gate and up) would each take a rotation of one input."""
    return any(n.op_type == "GroupQueryAttention" for n in model.graph.node)


def head_matmul(model: onnx.ModelProto) -> str | None:
    """The MatMul that computes the logits, followed back from them through ops with one computed input (Gemma
    2's soft-capping: Div, Tanh, Mul by constants); None if there is none."""
    g = GraphIndex.of(model)
    name = LOGITS
    for _ in range(8):
        node = g.producers.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node.name
        computed = [i for i in node.input if i and i not in g.inits]
        if len(computed) != 1:
            return None
        name = computed[0]
    return None


def online_targets(model: onnx.ModelProto, exclude: tuple[str, ...], rotated: bool,
                   values: bool = True) -> list[str]:
    """The MatMuls the online Hadamard rotates, named before smoothing splits channels off, so that every static
    int8 input is rotated one way or the other: each gated-MLP product's readers (down_proj: no folded rotation
    reaches past the nonlinearity); on a fused graph where R1 did not rotate the residual stream (Gemma 3's norms
    after attention and MLP stop it), each norm output's readers too; and where R2 rotated no attention values
    (`values` false: Gemma 3's q and k pass their norms, apart from v), each output projection reading a
    GroupQueryAttention (which no smoothing reaches). The head is not: rotated, its weight would no longer be the
    tied table's, which the embedding then could not share (Gemma 3's table, exact Q8_0 blocks, would be stored
    twice: w4 256.8 -> 435.7 MB)."""
    fused, head = fused_graph(model), head_matmul(model)
    targets = [m for g in find_smooth_groups(model, exclude)
               if (g.first_column is not None or fused and not rotated) and head not in g.matmuls for m in g.matmuls]
    if fused and not values:
        g = GraphIndex.of(model)
        targets += [r.name for n in model.graph.node if n.op_type == "GroupQueryAttention"
                    for r in g.consumers.get(n.output[0], []) if r.name in g.weight_names
                    and r.input[0] == n.output[0] and r.name not in exclude]
    return targets


def smooth_model(model: onnx.ModelProto, reader: KVCacheCalibrationReader, config: SmoothConfig,
                 workdir: Path, rotated: bool = False, weights_dir: Path | None = None) -> dict:
    """Smooth in place; reports the alphas and the largest activation magnitude before and after.

    `rotated`: the residual stream was rotated, so the norm outputs have no outlier channels left to migrate;
    with `groups="auto"` only the gated-MLP products (down_proj inputs, which no rotation reaches) are smoothed
    (smoothing the rotated norm outputs too measured worse: benchmarks/rotation_ablation.py, which sets `groups`
    to compare)."""
    which = config.groups if config.groups != "auto" else "gated" if rotated else "all"
    groups = [g for g in find_smooth_groups(model, config.exclude)
              if which == "all" or which == "gated" and g.first_column is not None]
    if not groups:
        return {"groups": 0}
    stats = collect_activation_stats(model, [g.activation for g in groups], reader.through, workdir, weights_dir=weights_dir)
    act_max = {name: st.abs_max for name, st in stats.items()}
    outliers = {name: pick_outliers(a, config.outlier_channels) for name, a in act_max.items()}
    report: dict = {"groups": len(groups)}
    if config.alpha is None:
        index = GraphIndex(model)
        inits, nodes, levels = index.inits, index.nodes, config.weight_levels
        # the activations `online_targets` names get the online Hadamard after this (pass `online_hadamard`):
        # choose alpha for what is then quantized, the rotated input and weights with the split channels added
        # back exactly
        rotation = online_matrix(config.online_block) if config.online_block else None
        online = set(online_targets(model, config.exclude, rotated))
        chosen = {}
        for g in groups:
            weights = [weight_array(inits[nodes[m].input[1]]) for m in g.matmuls]
            st, split = stats[g.activation], outliers[g.activation]
            if rotation is not None and g.matmuls[0] in online and weights[0].shape[0] % len(rotation) == 0:
                chosen[g.activation] = best_alpha(st, weights, levels, rotation=rotation, split=split)
                continue
            rest = np.setdiff1d(np.arange(act_max[g.activation].size), split)
            if rest.size < st.abs_max.size:  # the split channels leave the int8 MatMul: choose alpha for the rest
                st = ActivationStats(st.abs_max[rest], st.low[rest], st.high[rest], st.rows[:, rest])
                weights = [w[rest] for w in weights]
            chosen[g.activation] = best_alpha(st, weights, levels)
        alpha = {name: a for name, (a, _) in chosen.items()}
        report["alpha"] = {"auto": {name: {"alpha": a, "relative_error": e} for name, (a, e) in chosen.items()}}
    else:
        alpha = report["alpha"] = config.alpha
    scales = smooth(model, groups, act_max, alpha, outliers)

    def rest_max(name: str, s: np.ndarray) -> float:
        return float(np.delete(act_max[name] / s, outliers[name]).max(initial=0.0))
    report.update(max_abs_activation_before=float(max(a.max() for a in act_max.values())),
                  max_abs_activation_after=max(rest_max(k, s) for k, s in scales.items()),
                  outlier_channels={name: [int(c) for c in o] for name, o in outliers.items() if o.size})
    return report
