"""`pipeline run [CONFIG.toml]`: every stage in order from one config file; no file = the built-in demo.

    out = "runs/smol"                 # run directory
    [export]
    model = "models/SmolLM2.gguf"     # or a [train] table to train the built-in decoder first,
                                      # or [prune] / [distill] tables: export then takes their checkpoint
    [optimize]
    [quantize]
    recipe = "w8a8"
    [check]
    [bench]
    threads = 2
    [package]
    out = "bundles/smol"
    archive = "tar.gz"

A table present means the stage runs, with its keys as the stage's options; a stage left out is skipped.
A key is the CLI flag's name with underscores (`--calib-windows` -> `calib_windows`); every table is checked
before the first stage starts. docs/config.md lists them all (`python -m pipeline.stages.run --markdown`
writes its tables). The demo is train -> export -> optimize -> quantize -> check -> bench into runs/demo.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Callable

from models.errors import UserError
from pipeline.manifest import RunDir
from pipeline.options import options_of
from pipeline.stages import bench, check, distill, export, optimize, package, prune, quantize, train

ORDER = ("train", "prune", "distill", "export", "optimize", "quantize", "check", "bench", "package")
DEMO = {"out": "runs/demo", "train": {}, "export": {}, "optimize": {}, "quantize": {"recipe": "w8a8"},
        "check": {}, "bench": {}}
STAGES = {
    "train": (train.TrainStageConfig, train.train),
    "prune": (prune.PruneStageConfig, prune.prune_stage),
    "distill": (distill.DistillStageConfig, distill.distill_stage),
    "export": (export.ExportConfig, export.export),
    "optimize": (optimize.OptimizeStageConfig, optimize.optimize),
    "quantize": (quantize.QuantizeStageConfig, quantize.quantize),
    "check": (check.CheckConfig, check.check),
    "bench": (bench.BenchConfig, bench.bench),
    "package": (package.PackageConfig, package.package),
}


def load_config(path: str | None) -> dict:
    if path is None:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in DEMO.items()}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        cfg = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p} is not valid TOML: {e}") from e
    unknown = set(cfg) - set(ORDER) - {"out"}
    if unknown:
        raise UserError(f"{p}: unknown table(s) {sorted(unknown)}; known: out, {', '.join(ORDER)}")
    if not isinstance(cfg.get("out", ""), str):
        raise UserError(f"{p}: out is {cfg['out']!r}: give the run directory as a string")
    for stage in ORDER:
        if stage in cfg and not isinstance(cfg[stage], dict):
            raise UserError(f"{p}: {stage} is {cfg[stage]!r}: give a [{stage}] table")
    return cfg


def markdown() -> str:
    """docs/config.md's option tables, from the stage configs themselves."""
    from pipeline.options import markdown as tables

    return tables({stage: STAGES[stage][0] for stage in ORDER})


def make_config(stage: str, table: dict):
    """The stage's frozen config from its TOML table; list values become tuples, unknown keys are errors."""
    cls = STAGES[stage][0]
    names = [f.name for f, _ in options_of(cls)]
    unknown = set(table) - set(names)
    if unknown:
        raise UserError(f"[{stage}] has unknown key(s) {sorted(unknown)}; known: {', '.join(names)}")
    try:
        return cls(**table)
    except UserError as e:
        raise UserError(f"[{stage}] {e}") from e


def run(config_path: str | None, out: str | None, log: Callable[[str], None], show: Callable[[str], None]) -> dict:
    """Every stage of the config in order; `log` gets progress lines (stderr), `show` each stage's results
    (stdout) as soon as the stage ends."""
    cfg = load_config(config_path)
    run_dir = RunDir.open(out or cfg.get("out", "runs/demo"), create=True)
    made = next((name for stage, name in (("distill", "student"), ("prune", "pruned"), ("train", "checkpoint"))
                 if stage in cfg), None)
    if made is not None and "export" in cfg:
        cfg["export"].setdefault("model", str(run_dir.root / made))
    elif "export" in cfg and "model" not in cfg["export"]:
        raise UserError("[export] needs `model = \"PATH\"` (or add a [train] table to train one)")
    if "prune" in cfg and "source" not in cfg["prune"] and "train" not in cfg:
        raise UserError("[prune] needs `source = \"PATH\"` (or add a [train] table to train one)")
    if "distill" in cfg and "prune" not in cfg and not {"teacher", "student"} <= set(cfg["distill"]):
        raise UserError("[distill] needs `teacher` and `student` (or a [prune] table before it)")
    try:
        configs = {s: make_config(s, cfg[s]) for s in ORDER if s in cfg}  # validate all before running any
    except TypeError as e:  # a required key is missing, e.g. [package] without out
        raise UserError(f"config: {e}") from e
    results, lines = {}, []
    for stage, scfg in configs.items():
        log(f"== {stage}")
        t0 = time.perf_counter()
        results[stage] = STAGES[stage][1](run_dir, scfg)
        lines.append(f"{stage:<9} {time.perf_counter() - t0:7.1f}s")
        if stage == "train":
            show(train.render(results[stage]))
        if stage == "prune":
            show(prune.render(results[stage]))
        if stage == "distill":
            show(distill.render(results[stage]))
        if stage == "check":
            show(check.render_table(results[stage]))
        if stage == "bench":
            show(bench.render(results[stage], scfg.format))
    verdicts = {s: "passed" if results[s]["passed"] else "FAILED" for s in ("check", "bench") if s in results}
    passed = all(v == "passed" for v in verdicts.values())
    summary = "\n".join([f"run directory: {run_dir.root} (manifest.json records every stage)", *lines,
                         *(f"{s}: {v}" for s, v in verdicts.items())])
    return {"run_dir": str(run_dir.root), "stages": results, "passed": passed, "summary": summary}


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(markdown(), end="")
