"""The quantization passes, in Olive's shape: a frozen config and `run(state, config) -> state`.

`Quantizing` is the handle they hand each other: the float graph the float passes rewrite in place, the files,
and what each pass learned for the report. The writer passes (`write_qdq`, `write_nbits`) leave behind how to
write any mix of low-precision and fallback MatMuls, which `search` uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import onnx

from exporters.acceptance import Thresholds
from exporters.calibration import CalibrationPlan, KVCacheCalibrationReader
from exporters.gptq import gptq
from exporters.graph import GraphIndex, rescaling_external
from exporters.onnx_io import ExternalRewriter, copy_of, load_lazily, save_model, save_model_auto, tensor_array, \
    without_weights
from exporters.quantization.embedding import (quantize_embeddings, share_tied_table, tied_head,
                                               tied_through_map)
from exporters.quantization.evaluate import Agreement
from exporters.quantization.nbits import NBitsConfig, output_projection, write_nbits
from exporters.quantization.packs import HESSIAN_BUDGET, PackedWeights, StreamedGptq, gathered_hessians, \
    gptq_groups, rounded_pack, streamed_gptq
from exporters.quantization.prefix import first_token_values, pin_first_token, pinned_tensors, why_not_pinnable
from exporters.quantization.scales import half_scales
from exporters.quantization.qdq import QdqConfig, QdqJob, quantize_qdq, with_value_info
from exporters.quantization.search import Judge, take_out_until_budget
from exporters.quantization.smooth import SmoothConfig, fused_graph, online_targets, smooth_model
from exporters.quantization.static import StaticWriter, activation_ranges
from exporters.quantization.switch import NBitsSwitch, QuantSwitch
from exporters.rotation import ONLINE_SUFFIX, RotationReport, online_hadamard, rotate, why_not_rotatable
from exporters.smoothing import outlier_matmuls
from models.errors import UserError
from models.files import remove_tree


@dataclass
class Quantizing:
    """The model handle: one float graph on its way to a quantized file, and the report being gathered."""
    model: onnx.ModelProto                  # the float graph; float passes rewrite it in place
    source: Path                            # the float model file as given (calibration feeds, reference)
    staged: Path                            # where the writer passes write the quantized model
    workdir: Path                           # scratch, removed by the caller
    calib_ids: list[list[int]]              # calibration token ids
    valid_ids: list[list[int]] | None       # validation token ids (perplexity, search); None: not measured
    exclude: tuple[str, ...]                # MatMuls always left float
    reader: KVCacheCalibrationReader | None = None  # calibration feeds, once a pass needs them
    details: dict = field(default_factory=dict)     # report sections, by name
    reasons: dict[str, str] = field(default_factory=dict)  # MatMul -> why it is not in the recipe's form
    added_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # float MatMuls the passes added
    rotated: bool = False                   # the residual stream was rotated (R1)
    online: list[str] = field(default_factory=list)  # MatMuls the online Hadamard rotates (named before smoothing)
    targets: list[str] = field(default_factory=list)  # MatMuls the writer puts in the recipe's form
    rounded: dict = field(default_factory=dict)      # static int8 GPTQ: MatMul -> (q, scale)
    write: Callable[[list[str]], None] | None = None  # the writer: the model with these MatMuls taken out
    switch: Callable[[], QuantSwitch] | None = None  # one-session simulation of any mix (for the search)
    agreement: Agreement | None = None      # the written model against the source, when valid_ids
    weights_dir: Path = Path()              # where initializers the graph left in external data are read from
    packs: PackedWeights | None = None      # MatMulNBits blocks, packed once (w8a8: its w8 fallback's)
    ranges: dict = field(default_factory=dict)  # w8a8: activation -> calibrated (low, high)
    tie_map: tuple | None = None            # weight-only, rotated: (Gather, lm_head, X) with E = W^T X

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        return GraphIndex(self.model).weight_shapes()


def targets(model: onnx.ModelProto, exclude: tuple[str, ...]) -> list[str]:
    """Weight MatMuls to quantize; an excluded name that is not a weight MatMul is a user error (typo)."""
    shapes = GraphIndex(model).weight_shapes()
    unknown = sorted(set(exclude) - set(shapes))
    if unknown:
        raise UserError(f"cannot exclude {unknown}: not weight MatMul nodes of this model "
                        f"(e.g. {next(iter(shapes), 'none')!r})")
    return [n for n in shapes if n not in exclude]


def flops(shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Multiply-adds per token of each weight MatMul: K*N."""
    return {name: k * n for name, (k, n) in shapes.items()}


# ----------------------------------------------------------------------------------------------- calibrate


@dataclass(frozen=True)
class CalibrateConfig:
    recipe: str                      # named in the error when there is no calibration text
    plan: CalibrationPlan            # prefill windows, their length, decode steps after each
    calibrate_method: str            # activation ranges: "minmax" | "percentile" | "entropy"
    per_channel: bool                # one weight scale per output channel
    reduce_range: bool               # 7-bit static int8 weights
    fallback: str | None             # what the search's taken-out MatMuls become (None: no search)


def calibrate(q: Quantizing, config: CalibrateConfig) -> Quantizing:
    """Open the calibration feeds (static int8 needs them: an empty calibration set is a user error)."""
    if not q.calib_ids or not any(len(ids) for ids in q.calib_ids):
        raise UserError(f"recipe {config.recipe!r} needs calibration text: the calibration set is empty")
    plan = config.plan  # its prefix is run before each window only where the pin pass will pin it
    if plan.prefix and why_not_pinnable(q.model):
        plan = replace(plan, prefix=())
    q.reader = KVCacheCalibrationReader(q.source, q.calib_ids, plan)
    q.details.update(calibration_samples=len(q.reader), calibrate_method=config.calibrate_method,
                     per_channel=config.per_channel, reduce_range=config.reduce_range, fallback=config.fallback)
    return q


# -------------------------------------------------------------------------------------------- float passes


@dataclass(frozen=True)
class RotateConfig:
    seed: int = 0  # R1's random signs; R2's are seed + 1 (exporters/rotation.py)


@contextmanager
def rewriting(q: Quantizing, name: str, always: bool = False) -> Iterator[None]:
    """Around a float pass that changes weights. A graph whose weights still lie in external data (a large
    model, loaded lazily), or any graph when `always`, has each weight the pass changes read, changed and written
    to a new data file under `name` in the work directory (exporters/onnx_io.py `ExternalRewriter`), the rest
    copied there; the graph is then loaded lazily from it and the previous work-directory copy removed: one
    weight in memory at a time. Otherwise a graph held in memory is changed in place."""
    if not always and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in q.model.graph.initializer):
        yield
        return
    from exporters.quantize import matmul_only_weights  # (exporters.quantize imports this module)

    path = q.workdir / name / "model.onnx"
    path.parent.mkdir()
    with rescaling_external(ExternalRewriter(q.weights_dir, path)) as rewriter:
        yield
        rewriter.finish(q.model)
    model, q.model = q.model, None
    save_model(model, path, external=True)  # the tensors in memory (the table, what the pass added) join it
    del model  # before the graph is loaded again
    previous, q.weights_dir = q.weights_dir, path.parent
    q.model = load_lazily(path, matmul_only_weights)
    if previous.resolve().is_relative_to(q.workdir.resolve()):
        remove_tree(previous)


def run_rotate(q: Quantizing, config: RotateConfig) -> Quantizing:
    """QuaRot's R1 and R2 folded into the weights (exporters/rotation.py)."""
    with rewriting(q, "rotated"):
        rotation = rotate(q.model, config.seed)
    q.details["rotation"], q.rotated = rotation.as_dict(), rotation.residual
    return q


def run_smooth(q: Quantizing, config: SmoothConfig) -> Quantizing:
    """SmoothQuant smoothing and outlier-channel splitting (exporters/smoothing.py); first names the MatMuls the
    online Hadamard rotates after the split (`online_targets`)."""
    values = q.details.get("rotation", {}).get("value_heads", 0) > 0  # R2 rotated the o_proj inputs
    q.online = online_targets(q.model, q.exclude, q.rotated, values)
    with rewriting(q, "smoothed"):
        q.details["smoothing"] = smooth_model(q.model, q.reader, config, q.workdir, q.rotated, q.weights_dir)
    return q


@dataclass(frozen=True)
class RotateWeightsConfig:
    online_block: int  # the online Hadamard's block before each down_proj; 0: none
    seed: int = 0      # R1's random signs (R2's seed + 1, the online one's 2, as w8a8's)


def run_rotate_weights(q: Quantizing, config: RotateWeightsConfig) -> Quantizing:
    """Weight-only recipes: QuaRot's R1 and R2 and the online Hadamard (`online_targets`: before each down_proj,
    and where R1 and R2 cannot reach, before qkv, gate_up and o_proj, as on Gemma 3) folded into the
    float weights before GPTQ (exporters/rotation.py), as w8a8 does before its static int8. Rotated weights have
    no outlier rows for a 4-bit block to spend its levels on.

    The weights stay out of memory: those the rotations change are read, rotated and written to a new data file
    in the work directory one at a time (exporters/onnx_io.py `ExternalRewriter`), and the graph is loaded
    lazily again from there; only the token table, which the embedding reads, is rotated in memory. A tied table
    is a tied table no more (the final norm is folded into the head): `tie_map` keeps the map X with which the
    table is the head's weight, E = W^T X, so the writer can still store it once."""
    reason = why_not_rotatable(q.model)
    if reason is not None and not fused_graph(q.model):  # an unfused export: nothing read or rotated
        q.details["rotation"] = RotationReport(False, 0, reason).as_dict()
        return q
    with rewriting(q, "rotated", always=True):
        rotation = rotate(q.model, config.seed)
        q.details["rotation"], q.rotated = rotation.as_dict(), rotation.residual
        if config.online_block:
            targets = online_targets(q.model, q.exclude, q.rotated, rotation.value_heads > 0)
            q.details["online_hadamard"] = online_hadamard(q.model, targets, config.online_block, config.seed + 2)
            q.details["added_float_matmuls"] = {"online_hadamard": online_rotations_in_float(
                q, GraphIndex(q.model).weight_shapes())}
    q.tie_map = tied_through_map(q.model, q.weights_dir)
    return q


@dataclass(frozen=True)
class OnlineHadamardConfig:
    block: int  # block size of the rotation before each down_proj (a Hadamard order 2^a * 12^b)


def run_online_hadamard(q: Quantizing, config: OnlineHadamardConfig) -> Quantizing:
    """QuaRot's online rotation (exporters/rotation.py's `online_hadamard`) of the inputs `run_smooth` named."""
    with rewriting(q, "online"):
        q.details["online_hadamard"] = online_hadamard(q.model, q.online, config.block)
    return q


@dataclass(frozen=True)
class PinConfig:
    token: int  # the token every prompt opens with (the tokenizer's BOS)


def run_pin_first_token(q: Quantizing, config: PinConfig) -> Quantizing:
    """The keys, values and final norm input of `token` at position 0 as float constants
    (exporters/quantization/prefix.py), computed from the float graph as the passes before left it (exact in
    float)."""
    why = why_not_pinnable(q.model)
    if why:
        q.details["pinned_first_token"] = {"token": None, "why_not": why}
        return q
    tensors = pinned_tensors(q.model)
    pin_first_token(q.model, config.token, first_token_values(q.model, tensors, config.token, q.workdir,
                                                               q.weights_dir))
    q.details["pinned_first_token"] = {"token": config.token, "tensors": len(tensors)}
    return q


@dataclass(frozen=True)
class GptqConfig:
    levels: int                  # static int8 weight levels: 127, or 64 with reduce_range
    fallback_block_size: int | None  # also round on MatMulNBits' grid, of this block size, for the w8 fallback
    hessian_budget: int = HESSIAN_BUDGET  # float64 Hessian bytes one calibration pass gathers


def run_gptq(q: Quantizing, config: GptqConfig) -> Quantizing:
    """GPTQ rounding of the static int8 targets, per output channel (exporters/gptq.py), and of their w8
    fallback on MatMulNBits' grid, packed (exporters/quantization/packs.py), from the input Hessians over the
    calibration feeds, gathered a bounded group at a time, each dropped once its MatMuls are rounded. A MatMul
    wider than the calibration tokens keeps nearest rounding.

    A tied head keeps GPTQ although the embedding then reads its codes as its table: measured on SmolLM2
    (held-out text), nearest rounding of the head costs more (top-1 0.948, KL 0.0088) than the shared table
    does (0.951, 0.0079; the table of its own with a GPTQ head: 0.959, 0.0082)."""
    g = GraphIndex(q.model)
    nodes, inits = g.nodes, g.inits
    tokens = len(q.reader.windows) * q.reader.plan.cut_len  # every token of a window is one activation row
    acts, widths, nearest = gptq_groups(g, q.targets, tokens, shared=True)
    store = None if config.fallback_block_size is None else \
        PackedWeights(q.model, q.weights_dir, config.fallback_block_size, keep=True)
    passes = 0
    feeds = lambda session, label: q.reader.feeds(session=session)  # noqa: E731
    for passes, group, hessians in gathered_hessians(q.model, q.weights_dir, widths, feeds, q.workdir,
                                                     config.hessian_budget):
        for a in group:
            for t in acts[a]:
                w = tensor_array(inits[nodes[t].input[1]], q.weights_dir)
                q.rounded[t] = gptq(w, hessians[a], config.levels)
                if store is not None and g.uses[nodes[t].input[1]] == 1:
                    store.put(t, 8, rounded_pack(w, hessians[a], 8, store))
            del hessians[a]
    q.packs = store
    q.details["weight_rounding"] = "gptq"
    q.details["gptq"] = StreamedGptq(tokens, passes, config.hessian_budget, sorted(nearest)).to_dict()
    return q


@dataclass(frozen=True)
class BlockwiseGptqConfig:
    plan: CalibrationPlan  # calibration feeds
    block_size: int        # MatMulNBits' block size, the grid GPTQ rounds on
    bits: int              # the recipe's width (8 or 4)
    head_bits: int         # the output projection's width in a 4-bit model (4: searched like the rest)
    search: bool           # a search may move 4-bit MatMuls to `high_bits`: round them at both widths
    zero_points: bool = False  # 4-bit blocks with a zero point each (the grid GPTQ rounds on)
    high_bits: int = 8     # the width a searched 4-bit MatMul moves to (5-7: narrow codes in 8-bit blocks)
    hessian_budget: int = HESSIAN_BUDGET  # float64 Hessian bytes one calibration pass gathers


def run_blockwise_gptq(q: Quantizing, config: BlockwiseGptqConfig) -> Quantizing:
    """GPTQ on MatMulNBits' grid, streamed over bounded groups of Hessians into the packed store
    (exporters/quantization/packs.py); nearest rounding (nothing to do) when there is no calibration text."""
    q.details["weight_rounding"] = "gptq" if any(len(ids) for ids in q.calib_ids) else "nearest"
    if q.details["weight_rounding"] == "gptq":
        q.packs = PackedWeights(q.model, q.weights_dir, config.block_size, keep=config.search,
                                zero_points=config.zero_points)
        head = output_projection(q.model) if config.bits == 4 and config.head_bits > 4 else None
        tie = tied_head(q.model, q.weights_dir) or (q.tie_map[:2] if q.tie_map else None)
        # a shared head keeps nearest rounding: GPTQ moves weights by more than a step to fix the head's
        # products, and the embedding reads the same weights as a table
        widths = {n: (8,) if config.bits == 8 else (config.head_bits,) if n == head
                  else (4, config.high_bits) if config.search else (4,)
                  for n in q.targets if tie is None or n != tie[1]}
        done = streamed_gptq(q.model, q.weights_dir, widths, q.calib_ids, config.plan, q.packs, q.workdir,
                             config.hessian_budget)
        q.details["gptq"] = done.to_dict()
    return q


# ------------------------------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class TargetsConfig:
    """No options: which MatMuls static int8 takes follows from the graph the float passes left."""


def choose_static_targets(q: Quantizing, config: TargetsConfig) -> Quantizing:
    """The weight MatMuls static int8 quantizes: all but the excluded and the split-off outlier MatMuls; the
    float MatMuls the float passes added are reported with why."""
    split_off = outlier_matmuls(q.model)
    q.targets = [t for t in targets(q.model, q.exclude) if t not in split_off]
    q.details.setdefault("weight_rounding", "nearest")
    now = q.weight_shapes()
    q.added_shapes.update({name: now[name] for name in split_off})
    q.reasons.update({name: f"outlier channels of {main}: {now[name][0]} of its {now[main][0]} inputs, in float"
                      for name, main in split_off.items()})
    q.details["added_float_matmuls"] = {"outlier_split": sorted(split_off),
                                        "online_hadamard": online_rotations_in_float(q, now)}
    return q


def online_rotations_in_float(q: Quantizing, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """The online Hadamard's MatMuls, reported as float MatMuls of K x b (K*b multiply-adds per token)."""
    online = q.details.get("online_hadamard", {})
    rotations = [f"{name}{ONLINE_SUFFIX}/matmul" for name in online.get("matmuls", [])]
    for name, rotation in zip(online.get("matmuls", []), rotations):
        q.added_shapes[rotation] = (shapes[name][0], online["block"])
        q.reasons[rotation] = f"online Hadamard rotation of {name}'s input, in float"
    return rotations


def run_write_qdq(q: Quantizing, config: QdqConfig) -> Quantizing:
    """static: every target as QDQ int8 by onnxruntime's quantize_static (exporters/quantization/qdq.py), as
    the stock tool writes it; measured, not searched."""
    job = QdqJob(q.workdir / "fp32.onnx", q.workdir / "calibration.json", q.reader, config)
    save_model_auto(with_value_info(q.model), job.fp32_path)
    quantize_qdq(job, q.targets, q.staged)
    return q


@dataclass(frozen=True)
class RangesConfig:
    calibrate_method: str  # "minmax" | "percentile" | "entropy", as onnxruntime's calibrators compute them


def run_ranges(q: Quantizing, config: RangesConfig) -> Quantizing:
    """The static int8 targets' activation ranges on the float graph the float passes left, as onnxruntime's
    calibrator computes them (exporters/quantization/static.py); before GPTQ, whose codes are then not yet
    held beside the calibration session."""
    nodes = GraphIndex(q.model).nodes
    activations = list(dict.fromkeys(nodes[t].input[0] for t in q.targets))
    q.ranges = activation_ranges(q.model, activations, q.reader.through, config.calibrate_method, q.workdir,
                                 q.weights_dir)
    return q


def run_write_static(q: Quantizing, config: QdqConfig) -> Quantizing:
    """w8a8: every target as static QDQ int8, written from the float graph with the calibrated ranges
    (exporters/quantization/static.py: no quantize_static and its copies of the float model); the taken-out
    ones, when the search asks, as the configured fallback. Without a search, GPTQ's codes go once written."""
    writer = StaticWriter(q.model, q.ranges, config, q.rounded, q.packs,
                          tied_through_map(q.model, q.weights_dir) if config.quantizes_embeddings else None,
                          q.weights_dir)
    q.details["scales"] = writer.write(q.targets, [], q.staged)
    if not config.searched:
        q.rounded, q.packs = {}, None
        return q
    q.write = lambda taken_out: writer.write([t for t in q.targets if t not in taken_out], taken_out, q.staged)
    q.switch = lambda: QuantSwitch(copy_of(q.model), onnx.load(str(q.staged)), q.targets, q.workdir,
                                   q.weights_dir)
    return q


@dataclass(frozen=True)
class WriteNBitsConfig:
    bits: int                      # 8 or 4
    nbits: NBitsConfig             # block size, accuracy level, excluded MatMuls
    head_bits: int                 # the output projection's bits in a 4-bit model: 5-8 written at that width
                                   # (5-7 narrow codes in 8-bit blocks), 4 searched like the rest
    embedding_block: int | None    # the embedding table as int8 blocks of this size; None: float
    keep_float: bool = True        # the search may rewrite the model; False: the float weights are dropped once
                                   # it is written (no search follows), so measuring it holds no float copy
    high_bits: int = 8             # the width the search moves a 4-bit MatMul to (5-7: narrow codes in 8-bit
                                   # blocks, nbits.py `pack_narrow`)


def run_write_nbits(q: Quantizing, config: WriteNBitsConfig) -> Quantizing:
    """Weight-only MatMulNBits for every target, from the packed store (GPTQ-rounded when `blockwise_gptq` ran);
    taken-out MatMuls (the search's) at `high_bits`, the head at `head_bits`."""
    bits, model = config.bits, q.model
    head = output_projection(model) if bits == 4 and config.head_bits > 4 else None
    wide_head = [head] if head is not None and head not in q.exclude else []
    # tied: the embedding then reads the head's 8-bit blocks (stored once); rotated: the same, through the map X
    tie = tied_head(model, q.weights_dir)
    pair, x = (tie, None) if tie is not None or q.tie_map is None else (q.tie_map[:2], q.tie_map[2])
    store = q.packs or PackedWeights(model, q.weights_dir, config.nbits.block_size, keep=config.keep_float,
                                     zero_points=config.nbits.zero_points)
    q.details.update(bits=bits, block_size=config.nbits.block_size, accuracy_level=config.nbits.accuracy_level,
                     zero_points=config.nbits.zero_points and bits == 4)
    if bits == 4:
        q.reasons.update({n: f"output projection (head_bits {config.head_bits})" for n in wide_head})
    names = [n.name for n in GraphIndex(model).weight_matmuls() if n.name not in config.nbits.exclude]

    def finish(m: onnx.ModelProto) -> dict:  # after the MatMuls: the table gathers the head's blocks, or its own,
        shared = pair is not None and config.embedding_block is not None and share_tied_table(m, *pair, x)
        q.details["tied_table_shared"] = shared
        if config.embedding_block is not None:
            quantize_embeddings(m, config.embedding_block)
        return half_scales(m)  # and every block scale is stored as float16

    def write(taken_out: list[str]) -> None:
        bits_of = {t: config.head_bits if t in wide_head else config.high_bits if t in taken_out else bits
                   for t in names}
        m = write_nbits(model, bits_of, config.nbits, packed_of=store, weights_dir=q.weights_dir)
        q.details["scales"] = finish(m)
        save_model_auto(m, q.staged, shipped=True)

    def switch() -> NBitsSwitch:
        gated = [n for n in names if n not in wide_head and n not in q.exclude]
        return NBitsSwitch(model, gated, dict.fromkeys(wide_head, config.head_bits), store, config.nbits, q.workdir,
                           q.weights_dir, high=config.high_bits, finish=finish)

    q.write, q.switch = write, switch
    write([])
    if not config.keep_float:
        q.write = q.switch = q.packs = None
        q.model = without_weights(q.model)  # the float graph's memory goes with the last reference to it
    return q


# ------------------------------------------------------------------------------------------------- measure


@dataclass(frozen=True)
class SearchConfig:
    accept: Thresholds        # what the written model must meet against the source (ppl increase, top-1, KL)
    top1_z: float             # top-1 must clear its threshold by this many standard errors of its estimate
    sensitivity_tokens: int   # validation tokens each MatMul's one-at-a-time KL is measured on
    ppl_key: str              # report key of the perplexity before the search ("all_int8" / "ppl_all_4bit")
    report_key: str           # report key of the search ("sensitivity" / "w4_search")
    taken_out_as: str         # what a taken-out MatMul becomes, for the reasons ("int8 weight-only fallback", ...)
    low_precision: str        # the form it leaves, for the reasons ("int8", "4 bits")


def run_search(q: Quantizing, config: SearchConfig) -> Quantizing:
    """Measure the written model; when it misses `accept`, take MatMuls out of the low-precision form, most
    damaging per FLOP first, until it meets it (exporters/quantization/search.py)."""
    if not q.valid_ids:
        q.details["ppl"] = None
        return q
    judge = Judge(q.source, q.valid_ids, config.accept, config.top1_z)
    a = q.agreement = judge.model(q.staged)
    q.details["ppl"] = {"fp32": a.ppl_ref, "quantized": a.ppl, "increase": a.ppl_increase}
    if config.ppl_key == "ppl_all_4bit":
        q.details["ppl_all_4bit"] = a.ppl
    if judge.accepts(a) or not q.targets or q.switch is None:
        _record_acceptance(q, config, judge)
        return q

    def measure(taken_out: list[str]) -> Agreement:
        q.write(taken_out)
        return judge.model(q.staged)

    shapes = q.weight_shapes()
    switch = q.switch()
    taken, kl, search, q.agreement = take_out_until_budget(switch, list(switch.gates), judge,
                                                           config.sensitivity_tokens, measure, flops(shapes))
    q.reasons.update({name: f"sensitive: KL {kl[name]:.3g} with only this MatMul in {config.low_precision} -> "
                            f"{config.taken_out_as}" for name in taken})
    q.details[config.report_key] = search.to_dict()
    final = q.agreement
    if config.ppl_key == "all_int8":
        q.details["ppl"] = {**q.details["ppl"], "all_int8": a.ppl, "quantized": final.ppl,
                            "increase": final.ppl_increase}
    else:
        q.details["ppl"] = {"fp32": a.ppl_ref, "quantized": final.ppl, "increase": final.ppl_increase}
    _record_acceptance(q, config, judge)
    return q


def _record_acceptance(q: Quantizing, config: SearchConfig, judge: Judge) -> None:
    """The written model's top-1 and KL against the source, the thresholds it was judged by, and whether it met
    them (not when even every MatMul taken out does not: the model is written all the same, `check` will say)."""
    if not judge.ppl_only and config.report_key:
        q.details["acceptance"] = {**q.agreement.to_dict(), "top1_bound": q.agreement.top1_bound(config.top1_z),
                                   "accepted": judge.accepts(q.agreement), "thresholds": asdict(config.accept)}
