"""Stage `optimize`: variants/fp32 -> variants/fused (or fused-fp16): one fused attention op per layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.manifest import RunDir


@dataclass(frozen=True)
class OptimizeStageConfig:
    source: str = "fp32"  # variant to fuse
    fp16: bool = False    # float16 variant for the CUDA / TensorRT providers

    @property
    def target(self) -> str:
        return "fused-fp16" if self.fp16 else "fused"


def optimize(run: RunDir, config: OptimizeStageConfig) -> dict:
    from exporters.optimize import OptimizeConfig, optimize as fuse

    run.artifact(config.source)
    results = fuse(run.variant_path(config.source), run.variant_path(config.target), OptimizeConfig(fp16=config.fp16))
    results["size_bytes"] = sum(f.stat().st_size for f in run.variant_dir(config.target).iterdir())
    run.record("optimize", asdict(config), {config.source: str(run.variant_path(config.source))},
               {config.target: {"kind": "onnx", "path": f"variants/{config.target}/model.onnx",
                                "parent": config.source}}, results)
    return results
