"""Stage `train`: the built-in decoder and its tokenizer, trained on a local corpus -> RUN/checkpoint.

It runs unchanged under `torchrun --nproc-per-node N` (models/train.py): every process trains, rank 0 alone
opens the run's transaction, writes the checkpoint and records the manifest.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.manifest import RunDir
from pipeline.options import check_options, option


@dataclass(frozen=True)
class TrainStageConfig:
    corpus: str | None = option(str, None, "Text file or directory (default: this Python's stdlib sources).",
                                optional=True)
    max_seconds: float | None = option(float, None, "Training time budget (default: the training config's).",
                                       lo=0.001, optional=True)
    max_steps: int | None = option(int, None, "Stop after this many optimizer steps (default: the training "
                                   "config's).", lo=1, optional=True)
    batch_size: int | None = option(int, None, "Windows per optimizer step over all processes; under torchrun a "
                                    "multiple of their number (default: the training config's).", lo=1,
                                    optional=True)
    fsdp: bool = option(bool, False, "Under torchrun, shard parameters and optimizer state with FSDP2 instead "
                        "of DDP.")

    def __post_init__(self):
        check_options(self)


def train(run: RunDir, config: TrainStageConfig) -> dict:
    from models.distributed import environment
    from models.train import TrainConfig, train as train_model

    tcfg = TrainConfig()
    overrides = {k: v for k, v in (("corpus", config.corpus), ("max_seconds", config.max_seconds),
                                   ("max_steps", config.max_steps), ("batch_size", config.batch_size))
                 if v is not None}
    tcfg = replace(tcfg, **overrides, fsdp=config.fsdp)
    if environment()[0] != 0:
        # another torchrun process: it trains beside rank 0 but never touches the run directory (its staging,
        # lock and manifest are rank 0's); models.train writes nothing here, the scratch folder is a safeguard
        with tempfile.TemporaryDirectory(prefix="pipeline-train-rank-") as tmp:
            results = train_model(tcfg, Path(tmp) / "checkpoint")
        results["checkpoint"] = str(run.root / "checkpoint")
        return results
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
