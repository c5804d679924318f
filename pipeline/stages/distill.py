"""Stage `distill`: a student learns a teacher's distributions on a local corpus (models/distill.py).

`pipeline distill --teacher T --student S --out CKPT` writes a Hugging Face checkpoint directory, keeping its
work state in CKPT.distill/ for `--resume`; it runs unchanged under `torchrun --nproc-per-node N`. Inside
`pipeline run` (a [distill] table) the student is the run's `student/` artifact; the teacher defaults to what
[prune] pruned and the student to the run's pruned checkpoint, and `export` takes the student.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.manifest import RunDir
from pipeline.options import check_options, option
from pipeline.stages.prune import own_artifact

EMBEDDINGS = ("auto", "frozen", "trained")


@dataclass(frozen=True)
class DistillStageConfig:
    teacher: str | None = option(str, None, "Teacher checkpoint directory or .gguf file (in `pipeline run`, "
                                 "default: the checkpoint [prune] pruned).", optional=True)
    student: str | None = option(str, None, "Student checkpoint directory with the teacher's vocabulary (a "
                                 "`pipeline prune` output), or `builtin`: the built-in decoder, fresh (in "
                                 "`pipeline run`, default: the run's pruned checkpoint).", optional=True)
    corpus: str | None = option(str, None, "Text file or directory: trained on its train split, perplexity on "
                                "its held-out valid split (default: this Python's stdlib sources).", optional=True)
    max_seconds: float | None = option(float, 1800.0, "Training time budget in seconds (unset: steps only).",
                                       lo=1.0, optional=True)
    max_steps: int = option(int, 100_000, "Stop after this many optimizer steps.", lo=1)
    batch_size: int = option(int, 4, "Windows per optimizer step over all processes.", lo=1)
    seq_len: int = option(int, 256, "Tokens per window.", lo=8)
    lr: float = option(float, 1e-4, "Peak learning rate (warmup, then cosine to a tenth).", lo=1e-8, hi=1.0)
    warmup_steps: int = option(int, 20, "Linear warmup steps.", lo=0)
    temperature: float = option(float, 1.0, "Distillation temperature.", lo=0.05, hi=100.0)
    top_k: int = option(int, 64, "Teacher logits kept per position, cached on disk so a window's teacher runs "
                        "once (0: the full distribution every step).", lo=0)
    ce_weight: float = option(float, 0.0, "Weight of the plain next-token loss beside the KL.", lo=0.0)
    hidden_weight: float = option(float, 0.0, "Weight of the hidden-state loss (pruned students; the teacher "
                                  "then runs every step).", lo=0.0)
    eval_every: int = option(int, 50, "Steps between held-out perplexity measurements.", lo=1)
    eval_windows: int = option(int, 32, "Held-out windows measured.", lo=1)
    checkpoint_every: int = option(int, 100, "Steps between saves of the work state (CKPT.distill/).", lo=1)
    resume: bool = option(bool, False, "Continue from CKPT.distill/state.pt.")
    bf16: bool = option(bool, True, "bfloat16 autocast where the CPU (avx512_bf16, amx) or GPU has it.",
                        off="--no-bf16")
    embeddings: str = option(str, "auto", "auto: frozen when they come from the teacher (a pruned student), "
                             "else trained.", choices=EMBEDDINGS)
    fsdp: bool = option(bool, False, "Under torchrun, shard teacher and student with FSDP2 instead of DDP.")
    seed: int = option(int, 0, "Data order and a fresh student's weights.", lo=0)

    def __post_init__(self):
        check_options(self)

    def model_config(self):
        from models.distill import DistillConfig

        fields = asdict(self)
        for key in ("teacher", "student", "embeddings"):
            fields.pop(key)
        freeze = {"auto": None, "frozen": True, "trained": False}[self.embeddings]
        return DistillConfig(**fields, freeze_embeddings=freeze)


def distill_checkpoint(config: DistillStageConfig, out: str, progress: bool) -> dict:
    """`pipeline distill --teacher T --student S --out CKPT`."""
    from models.distill import distill
    from models.errors import UserError

    if config.teacher is None or config.student is None:
        raise UserError("give both models: pipeline distill --teacher T --student S --out CKPT")
    return distill(config.teacher, config.student, out, config.model_config(), progress=progress)


def distill_stage(run: RunDir, config: DistillStageConfig) -> dict:
    """[distill] in `pipeline run`: RUN/student, recorded in the manifest (its work state lives in the stage's
    private staging directory, so an interrupted [distill] starts again)."""
    from models.distill import distill
    from models.errors import UserError
    from pipeline import progress

    arts = run.load()["artifacts"]
    teacher = config.teacher or (run.results("prune").get("source") if "pruned" in arts else None)
    student = config.student or (str(run.root / "pruned") if "pruned" in arts else None)
    if teacher is None or student is None:
        raise UserError("[distill] needs `teacher` and `student` (or a [prune] table before it)")
    if config.resume:
        raise UserError("[distill] in `pipeline run` cannot resume (its state is private to the stage); "
                        "use `pipeline distill ... --resume`")
    with run.transaction() as tx:
        own = own_artifact(run, student) if student != "builtin" else None
        if own:
            tx.read(own)
        results = distill(teacher, student, tx.path("student"), config.model_config(), progress=progress.enabled())
        results["out"] = str(run.root / "student")
        tx.record("distill", asdict(config), {"teacher": teacher, "student": student},
                  {"student": {"kind": "checkpoint", "path": "student", "parent": own}}, results)
    return results


def render(r: dict) -> str:
    from models.distill import summary_line

    return summary_line(r) + f"\n  -> {r['out']}"
