"""Stage `optimize`: ONNX -> ONNX rewrites of a variant.

- fusion (default): variants/fp32 -> variants/fused (or fused-fp16): one fused attention op per layer;
- `native_int8`: a static-int8 variant (w8a8) -> variants/<source>-native, its MatMuls on pipeline's native
  CPU kernel; or a weight-only one (w4, w8, gguf) whose tied head's 8-bit blocks the embedding also reads, the
  head on the kernel that reads them as stored (exporters/block_kernels.py); checked against the source on this
  machine's onnxruntime, or, where the arithmetic changes (the head moved onto the table's blocks, packed layers'
  per-block activations, the fused MLPs of `fuse_mlp`, the attention of `native_attention`), against the float
  model it was quantized from;
- `kv_fp16`: any fused variant -> variants/<source>-kv16, its KV cache in float16 (exporters/kv16.py), checked
  against the source within KV16_TOLERANCE, or, where the source rounds its activations to int8 as it runs (w4,
  w8: MatMulNBits' accuracy level 4), against their float ancestor (`kv16_drift`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.errors import UserError
from pipeline import progress
from pipeline.manifest import RunDir
from pipeline.options import check_options, option
from runtimes.bench import model_bytes


NATIVE_TOLERANCE = 1e-3  # max |logit difference| of a -native variant: float rounding of the same integer sums
# max |logit difference| of a -kv16 variant on check's short random prompt: float16 keys and values are rounded
# to 11 significant bits; a wrong cast or layout moves logits by whole units (`check` measures the accuracy)
KV16_TOLERANCE = 0.25
# A variant that rounds its activations to int8 as it runs re-rolls that rounding under any perturbation: on
# SmolLM2's w4, q/k/v merely rounded to float16 (attention still float32) move the logits by KL 0.008, as much
# as the float16 cache does, and with MatMulNBits computing in float32 the cache moves them by 3e-6. So such a
# -kv16 variant is judged by its distance from the float model it was quantized from: kept when its mean KL from
# it is at most KV16_DRIFT times the source's own (plus KV16_DRIFT_FLOOR). Measured over 2048 tokens of the
# evaluation text: w4 0.0490 -> 0.0485 with the float16 cache, w8 0.0059 -> 0.0057; a wrong cast or layout is
# garbage (KL of order 1). The same rule judges a w8a8-native whose head moved onto the table's int8 blocks
# (exporters/cpu_kernels.py `head_on_table_blocks`), another arithmetic for the head.
KV16_DRIFT = 2.0
KV16_DRIFT_FLOOR = 1e-3


@dataclass(frozen=True)
class OptimizeStageConfig:
    source: str = option(str, "", "Variant to rewrite (default: fp32, or the built fused variant when export "
                         "built it, or w8a8 with --native-int8).")
    fp16: bool = option(bool, False, "Also convert to float16 (for the CUDA / TensorRT providers).")
    native_int8: bool = option(bool, False, "Instead of fusing: put a static int8 variant's MatMuls on pipeline's "
                               "native CPU kernel (x86-64 with AVX2 or AVX512-VNNI, AArch64 with the dot product; build it with "
                               "`python -m runtimes.kernels build`): same logits, faster decode; a static head that "
                               "did not share the tied table moves onto the table's int8 blocks (stored once, judged "
                               "against the float model; see --static-head). With --source w4, w8 or gguf: their "
                               "tied 8-bit head, read as stored, so the table the embedding shares is in memory once. "
                               "Writes <source>-native; see --fuse-mlp and --native-attention.")
    fuse_mlp: bool = option(bool, True, "With --native-int8: each gated MLP's act(gate) * up (SiLU or GELU-tanh) "
                            "and online rotation as one native op (faster decode; float rounding then moves some activation codes, so "
                            "the variant is judged by its distance from the float model, and is not fused where the "
                            "run has none). --no-fuse-mlp keeps the source's logits exactly.", off="--no-fuse-mlp")
    native_attention: bool = option(bool, True, "With --native-int8: each packed-QKV GroupQueryAttention on "
                                    "pipeline's own kernel (CacheAttention; measured on SmolLM2: attention in a "
                                    "1536-token prefill 1.5x faster, decode unchanged). Its sums round otherwise, so "
                                    "the variant is judged by its distance from the float model, and is not moved "
                                    "where the run has none.", off="--no-native-attention")
    static_head: bool = option(bool, False, "With --native-int8: keep a static int8 head that did not share the "
                               "tied table with the embedding on the static kernel (faster decode, the table in "
                               "memory twice) instead of moving it onto the table's int8 blocks.")
    kv_fp16: bool = option(bool, False, "Instead of fusing: store a fused variant's KV cache in float16 (half the "
                           "cache memory; attention runs in float16). Writes <source>-kv16; default source: fused.")

    def __post_init__(self):
        check_options(self)
        if sum((self.fp16, self.native_int8, self.kv_fp16)) > 1:
            raise UserError("--fp16, --native-int8 and --kv-fp16 are separate rewrites: give one of them")
        if self.static_head and not self.native_int8:
            raise UserError("--static-head is a choice of --native-int8: give both")
        if not self.fuse_mlp and not self.native_int8:
            raise UserError("--no-fuse-mlp is a choice of --native-int8: give both")
        if not self.native_attention and not self.native_int8:
            raise UserError("--no-native-attention is a choice of --native-int8: give both")

    def source_in(self, run: RunDir) -> str:
        """The variant rewritten: --source, else w8a8 for --native-int8, fp32 from a traced export, or fused
        when export built it (fused already: only --fp16 has work to do)."""
        if self.source or self.native_int8 or self.kv_fp16:
            return self.source_variant
        return "fused" if "fp32" not in run.variants() and "fused" in run.variants() else "fp32"

    @property
    def source_variant(self) -> str:
        return self.source or ("w8a8" if self.native_int8 else "fused" if self.kv_fp16 else "fp32")

    @property
    def target(self) -> str:
        if self.native_int8:
            return f"{self.source_variant}-native"
        if self.kv_fp16:
            return f"{self.source_variant}-kv16"
        return "fused-fp16" if self.fp16 else "fused"


def parity_logits(paths, steps: int = 4, prompt_len: int = 8) -> list[list[np.ndarray]]:
    """The logits of each model over one prefill of a random prompt and `steps` decode steps, all fed the first
    model's greedy tokens. Full 8-bit static weights on a CPU whose int8 GEMM saturates on them are computed as
    their QDQ graph says, in float (a -native rewrite of them is checked here, on the CPU it is made for)."""
    from runtimes.generate import Generator
    from runtimes.session import open_session

    gens = [Generator(open_session(p, threads=1, exact_int8=True)) for p in paths]
    prompt = np.random.default_rng(0).integers(0, gens[0].session.contract.vocab_size, prompt_len)
    rows = [[g.prefill(prompt, prompt_len + steps)] for g in gens]
    for _ in range(steps):
        token = int(rows[0][-1].argmax())
        for g, r in zip(gens, rows):
            r.append(g.step(token))
    return rows


def saturated_source(path) -> bool:
    """Whether `path` has full 8-bit static int8 weights and this CPU's int8 GEMM saturates on them, so that
    parity_logits computes it in float."""
    import onnx

    from runtimes.session import int8_weights_saturate

    return int8_weights_saturate({p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                                  .metadata_props})


def logit_parity(source, target, steps: int = 4, prompt_len: int = 8) -> float:
    """Max |logit difference| between the two graphs over one prefill and `steps` greedy decode steps."""
    a, b = parity_logits([source, target], steps, prompt_len)
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def mean_kl(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean over steps of KL(softmax(ref) || softmax(got)), in float64."""
    from pipeline.stages.check import log_softmax

    total = 0.0
    for r, g in zip(ref, got):
        lr, lg = log_softmax(r.ravel()), log_softmax(g.ravel())
        total += float(np.sum(np.exp(lr) * (lr - lg)))
    return max(total / len(ref), 0.0)


def float_drift(reference, source, target, steps: int = 16, prompt_len: int = 32) -> dict:
    """How far `source` and its rewrite `target` each are from their float `reference` (mean KL over a prefill
    and `steps` greedy steps), and whether the target is within KV16_DRIFT of the source's own distance."""
    ref, src, tgt = parity_logits([reference, source, target], steps, prompt_len)
    before, after = mean_kl(ref, src), mean_kl(ref, tgt)
    return {"source_kl": before, "target_kl": after, "kept": after <= KV16_DRIFT * before + KV16_DRIFT_FLOOR}


def float_ancestor(run: RunDir, name: str) -> str | None:
    """The float variant `name` was quantized from (fused, or fp32 from a traced export), if the run records one."""
    seen = set()
    while name and name not in seen:
        seen.add(name)
        art = run.artifact(name)
        if art.get("stage") == "export" or (art.get("stage") == "optimize" and name in ("fused", "fused-fp16")):
            return name
        name = art.get("parent")
    return None


def optimize(run: RunDir, config: OptimizeStageConfig) -> dict:
    source, target = config.source_in(run), config.target
    if source == "fused" == target and not config.source:  # export built it fused: nothing left to do
        return {"nothing_to_do": "variants/fused was built fused by `pipeline export`; --fp16 makes a float16 "
                                 "copy", "fused_ops": {}, "parity_max_abs_logit_diff": None}
    if source == target:
        raise UserError(f"--source {source} would be replaced by its own rewrite: give the variant it was made from")
    with progress.phases(f"optimize {target}", ["rewrite", "publish"]) as phase, run.transaction() as tx:
        phase("rewrite")
        source_path = tx.read(source)
        out = tx.variant_path(target)
        if config.native_int8:
            from exporters.cpu_kernels import specialize
            from runtimes import kernels

            why = kernels.unavailable_reason()
            if why:  # before writing anything: the variant is only kept once checked
                raise UserError(f"{target} could not be checked against {source} here: {why}")
            # a rewrite that rounds otherwise than the source is judged by its distance from the float model, so
            # made only where the run has one: a head moved onto the table's blocks, ...
            reference = float_ancestor(run, source)
            judged = reference not in (None, source)
            move_head = judged and not config.static_head
            # full 8-bit weights on a CPU whose int8 GEMM saturates: the source ran in float, whose rounding
            # differs from the integer sums by ~1e-6 and flips later layers' activation codes, so the rewrite is
            # judged by its distance from the float model, as a moved head is
            in_float = saturated_source(source_path)
            if in_float and not judged:
                raise UserError(f"{target} could not be checked against {source} here: its full 8-bit weights run "
                                "only in float on this CPU (x86 without VNNI) and the run has no float model to "
                                "judge it by")
            # ... the fused MLPs and attention (their floats round otherwise than onnxruntime's nodes), and 4-bit
            # MatMulNBits moved onto the kernel (rounded otherwise than MatMulNBits: `packed` below)
            fuse_mlp, attention = config.fuse_mlp and judged, config.native_attention and judged
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                portable = Path(tmp) / "model.onnx"
                results = specialize(source_path, out, portable if move_head else None, move_head=move_head,
                                     fuse_mlp=fuse_mlp, attention=attention, four_bit=judged)
                moved = "head_on_table_blocks" in results
                worst = logit_parity(portable if moved else source_path, out)
            gated = results["gated_mlps"] > 0 or results["native_attention"] > 0  # other rounding: judged alike
            # layers moved onto BlockInt8MatMul quantize their activations per block as they run: each product is
            # MatMulNBits' to float rounding, but a rounding that flips an activation code feeds the next layers,
            # so across layers the logits part as in_float's do (Gemma 3: by 3), judged against the float model
            packed = bool(results["packed_matmuls"])
            if packed and not judged:
                raise UserError(f"{target} could not be checked against {source} here: its layers on the block "
                                "kernel are judged by their distance from the float model, which the run lacks")
            if not (in_float or packed or gated) and not worst <= NATIVE_TOLERANCE:  # the same arithmetic: a bug
                raise UserError(f"{target} differs from {source} by {worst:.3g} in the logits (more than "
                                f"{NATIVE_TOLERANCE}): not kept; please report it with the run's manifest.json")
            results["parity_max_abs_logit_diff"] = {"prefill+decode": worst}
            if moved or in_float or packed or gated:
                drift = float_drift(tx.read(reference), source_path, out)
                if not drift["kept"]:
                    what = f"{target}'s head on the table's int8 blocks" if moved else target
                    raise UserError(f"{what} is {drift['target_kl']:.3g} in mean KL from {reference} against "
                                    f"{source}'s {drift['source_kl']:.3g}: not kept; "
                                    f"please report it with the run's manifest.json")
                results["drift_from_float"] = {"reference": reference, **drift}
        elif config.kv_fp16:
            from exporters.kv16 import write_kv16

            results = write_kv16(source_path, out)
            worst = logit_parity(source_path, out)
            results["parity_max_abs_logit_diff"] = {"prefill+decode": worst}
            if not worst <= KV16_TOLERANCE:
                reference = float_ancestor(run, source)
                drift = float_drift(tx.read(reference), source_path, out) if reference not in (None, source) \
                    else None
                if drift is None or not drift["kept"]:
                    how = "" if drift is None else (f", and is {drift['target_kl']:.3g} in mean KL from {reference} "
                                                    f"against {source}'s {drift['source_kl']:.3g}")
                    raise UserError(f"{target} differs from {source} by {worst:.3g} in the logits (more than "
                                    f"{KV16_TOLERANCE}){how}: not kept; please report it with the run's "
                                    f"manifest.json")
                results["drift_from_float"] = {"reference": reference, **drift}
        else:
            from exporters.optimize import OptimizeConfig, optimize as fuse

            results = fuse(source_path, out, OptimizeConfig(fp16=config.fp16))
        results["size_bytes"] = model_bytes(out)
        tx.record("optimize", asdict(config), {source: str(source_path)},
                  {target: {"kind": "onnx", "path": f"variants/{target}/model.onnx", "parent": source}}, results)
        phase("publish")
    return results
