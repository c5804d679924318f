"""Stage `optimize`: ONNX -> ONNX rewrites of a variant.

- fusion (default): variants/fp32 -> variants/fused (or fused-fp16): one fused attention op per layer;
- `native_int8`: a static-int8 variant (w8a8) -> variants/<source>-native, its MatMuls on pipeline's native
  CPU kernel (exporters/cpu_kernels.py), checked against the source on this machine's onnxruntime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from models.errors import UserError
from pipeline.manifest import RunDir
from pipeline.validation import flag, text


NATIVE_TOLERANCE = 1e-3  # max |logit difference| of a -native variant: float rounding of the same integer sums


@dataclass(frozen=True)
class OptimizeStageConfig:
    source: str = ""           # variant to rewrite (default: fp32 for fusion, w8a8 for native_int8)
    fp16: bool = False         # float16 variant for the CUDA / TensorRT providers
    native_int8: bool = False  # static int8 MatMuls -> com.pipeline.StaticInt8MatMul (x86-64, AVX512-VNNI)

    def __post_init__(self):
        text("source", self.source)
        flag("fp16", self.fp16)
        flag("native_int8", self.native_int8)
        if self.fp16 and self.native_int8:
            raise UserError("--native-int8 rewrites a static int8 variant; --fp16 is for fusion")

    @property
    def source_variant(self) -> str:
        return self.source or ("w8a8" if self.native_int8 else "fp32")

    @property
    def target(self) -> str:
        if self.native_int8:
            return f"{self.source_variant}-native"
        return "fused-fp16" if self.fp16 else "fused"


def native_parity(source, target, steps: int = 4, prompt_len: int = 8) -> float:
    """Max |logit difference| between the two graphs over one prefill and `steps` greedy decode steps."""
    from runtimes.generate import Generator
    from runtimes.session import open_session

    ref, new = Generator(open_session(source, threads=1)), Generator(open_session(target, threads=1))
    prompt = np.random.default_rng(0).integers(0, ref.session.contract.vocab_size, prompt_len)
    a, b = ref.prefill(prompt, prompt_len + steps), new.prefill(prompt, prompt_len + steps)
    worst = float(np.abs(a - b).max())
    for _ in range(steps):
        token = int(a.argmax())
        a, b = ref.step(token), new.step(token)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def optimize(run: RunDir, config: OptimizeStageConfig) -> dict:
    source, target = config.source_variant, config.target
    if source == target:
        raise UserError(f"--source {source} would be replaced by its own rewrite: give the variant it was made from")
    with run.transaction() as tx:
        source_path = tx.read(source)
        out = tx.variant_path(target)
        if config.native_int8:
            from exporters.cpu_kernels import specialize
            from runtimes import kernels

            why = kernels.unavailable_reason()
            if why:  # before writing anything: the variant is only kept once checked
                raise UserError(f"{target} could not be checked against {source} here: {why}")
            results = specialize(source_path, out)
            worst = native_parity(source_path, out)
            if not worst <= NATIVE_TOLERANCE:  # the same arithmetic: more than rounding means a kernel bug
                raise UserError(f"{target} differs from {source} by {worst:.3g} in the logits (more than "
                                f"{NATIVE_TOLERANCE}): not kept; please report it with the run's manifest.json")
            results["parity_max_abs_logit_diff"] = {"prefill+decode": worst}
        else:
            from exporters.optimize import OptimizeConfig, optimize as fuse

            results = fuse(source_path, out, OptimizeConfig(fp16=config.fp16))
        results["size_bytes"] = sum(f.stat().st_size for f in out.parent.iterdir())
        tx.record("optimize", asdict(config), {source: str(source_path)},
                  {target: {"kind": "onnx", "path": f"variants/{target}/model.onnx", "parent": source}}, results)
    return results
