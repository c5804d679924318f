"""Stage `train`: the built-in decoder and its tokenizer, trained on a local corpus -> RUN/checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from pipeline.manifest import RunDir
from pipeline.validation import number, text


@dataclass(frozen=True)
class TrainStageConfig:
    corpus: str | None = None        # text file or directory; None = this Python's stdlib sources
    max_seconds: float | None = None  # time budget; None = the training config's default
    max_steps: int | None = None     # step budget; None = the training config's default

    def __post_init__(self):
        text("corpus", self.corpus, optional=True)
        number("max_seconds", self.max_seconds, 1e-3, integer=False, optional=True)
        number("max_steps", self.max_steps, 1, optional=True)


def train(run: RunDir, config: TrainStageConfig) -> dict:
    from models.train import TrainConfig, train as train_model

    tcfg = TrainConfig()
    overrides = {k: v for k, v in (("corpus", config.corpus), ("max_seconds", config.max_seconds),
                                   ("max_steps", config.max_steps)) if v is not None}
    tcfg = replace(tcfg, **overrides)
    with run.transaction() as tx:
        results = train_model(tcfg, tx.path("checkpoint"))
        results["checkpoint"] = str(run.root / "checkpoint")
        tx.record("train", {**asdict(config), "train_config": asdict(tcfg)}, {"corpus": config.corpus or "stdlib"},
                  {"checkpoint": {"kind": "checkpoint", "path": "checkpoint", "parent": None}}, results)
    return results


def render(results: dict) -> str:
    return (f"trained {results['params']:,} parameters in {results['seconds']:.0f}s ({results['steps']} steps, "
            f"{results['threads']} threads): val loss {results['val_loss']:.3f}, val perplexity "
            f"{results['val_ppl']:.1f} (unigram baseline {results['unigram_ppl']:.0f})\nsample: {results['sample']!r}")
