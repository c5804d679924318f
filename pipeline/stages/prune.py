"""Stage `prune`: a smaller model of the same family from a checkpoint (models/prune.py).

`pipeline prune SOURCE --out CKPT` writes a Hugging Face checkpoint directory; inside `pipeline run` (a [prune]
table) the checkpoint is the run's `pruned/` artifact, made from the `source` key or, after [train], from the
run's own checkpoint, and `export` takes it unless [distill] follows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.manifest import RunDir
from pipeline.options import check_options, option


@dataclass(frozen=True)
class PruneStageConfig:
    source: str | None = option(str, None, "Checkpoint directory or .gguf file to prune (the CLI's SOURCE "
                                "argument; in `pipeline run`, default: the run's trained checkpoint).", optional=True)
    mlp: float = option(float, 0.0, "Share of each layer's MLP channels to remove (e.g. 0.25).", lo=0.0, hi=0.95)
    heads: float = option(float, 0.0, "Share of each layer's key/value groups to remove, each with its query "
                          "heads.", lo=0.0, hi=0.95)
    hidden: float = option(float, 0.0, "Share of the embedding (residual stream) channels to remove.", lo=0.0,
                           hi=0.95)
    layers: int = option(int, 0, "Whole layers to remove (the ones that turn the hidden states least).", lo=0)
    corpus: str | None = option(str, None, "Text file or directory: importance on its calib split, perplexity "
                                "on its held-out valid split (default: this Python's stdlib sources).",
                                optional=True)
    calib_windows: int = option(int, 32, "Calibration windows importance is measured on.", lo=1)
    eval_windows: int = option(int, 32, "Held-out windows perplexity is measured on.", lo=1)
    seq_len: int = option(int, 256, "Tokens per window.", lo=8)
    multiple: int = option(int, 32, "Kept MLP and embedding widths are multiples of this.", lo=1)

    def __post_init__(self):
        check_options(self)

    def model_config(self):
        from models.prune import PruneConfig

        fields = asdict(self)
        fields.pop("source")
        config = PruneConfig(**fields)
        config.check()
        return config


def prune_checkpoint(config: PruneStageConfig, out: str) -> dict:
    """`pipeline prune SOURCE --out CKPT`."""
    from models.errors import UserError
    from models.prune import prune

    if config.source is None:
        raise UserError("give the checkpoint to prune: pipeline prune SOURCE --out CKPT")
    return prune(config.source, out, config.model_config())


def own_artifact(run: RunDir, model: str, names=("student", "pruned", "checkpoint")) -> str | None:
    """The run's own checkpoint artifact that `model` points at, if any (what a stage made from it derives from)."""
    arts = run.load()["artifacts"]
    for name in names:
        if name in arts and Path(model).resolve() == (run.root / arts[name]["path"]).resolve():
            return name
    return None


def prune_stage(run: RunDir, config: PruneStageConfig) -> dict:
    """[prune] in `pipeline run`: RUN/pruned, recorded in the manifest."""
    from models.errors import UserError
    from models.prune import prune

    source = config.source
    if source is None:
        if "checkpoint" not in run.load()["artifacts"]:
            raise UserError("[prune] needs `source = \"PATH\"` (or a [train] table before it)")
        source = str(run.root / "checkpoint")
    with run.transaction() as tx:
        own = own_artifact(run, source)
        if own:
            tx.read(own)
        results = prune(source, tx.path("pruned"), config.model_config())
        results["out"] = str(run.root / "pruned")
        tx.record("prune", asdict(config), {"source": source},
                  {"pruned": {"kind": "checkpoint", "path": "pruned", "parent": own}}, summary(results))
    return results


def summary(r: dict) -> dict:
    """What the manifest keeps of a prune: the figures, not the kept-channel lists (pruned/pruning.json has them)."""
    return {k: v for k, v in r.items() if k != "kept"}


def render(r: dict) -> str:
    b, a = r["before"], r["after"]
    shape = ", ".join(f"{k} {r['shape_before'][k]}->{v}" for k, v in r["shape_after"].items()
                      if v != r["shape_before"][k])
    return (f"pruned {r['source']} -> {r['out']} ({shape})\n"
            f"  parameters      {b['parameters']:>13,} -> {a['parameters']:>13,}\n"
            f"  non-embedding   {b['non_embedding']:>13,} -> {a['non_embedding']:>13,} "
            f"({r['non_embedding_ratio']:.1%})\n"
            f"  read per token  {b['per_token']:>13,} -> {a['per_token']:>13,} ({r['per_token_ratio']:.1%}; "
            f"{a['bytes_per_token_fp32'] / 1e6:.0f} MB float32, {a['bytes_per_token_int8'] / 1e6:.0f} MB int8)\n"
            f"  held-out ppl    {b['perplexity']:>13.3f} -> {a['perplexity']:>13.3f} ({r['eval_tokens']:,} tokens)")
