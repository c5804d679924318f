"""Knowledge distillation: a student (a pruned checkpoint, any checkpoint of the teacher's vocabulary, or the
built-in decoder) learns the teacher's next-token distributions on a local corpus.

    loss = T^2 * KL(teacher_T || student_T)  [+ ce_weight * next-token loss]  [+ hidden_weight * hidden loss]

- The teacher's distribution is kept as its top-k log-probabilities per position (`top_k`, 64 by default; the
  KL is then over those k tokens and "any other", see kd_loss), cached on disk the first time a window is
  seen, so a second epoch or a resumed run never runs the teacher on that window again; `top_k 0` uses the
  full distribution, computed every step.
- The hidden loss (pruned students only: pruning.json maps each student layer and embedding channel to the
  teacher's) is the mean squared error between each student layer's output and the teacher's at the same
  depth, on the kept channels, relative to the teacher's mean square. It needs the teacher every step.
- Training windows come from the corpus's "train" split, perplexity from the held-out "valid" split (never
  trained on), measured at the start, every `eval_every` steps and at the end: the curve (perplexity against
  tokens seen, wall and CPU seconds) is the run's main result.
- Work state (the student, the optimizer, the data position and the curve) is saved every
  `checkpoint_every` steps in OUT.distill/; `resume` continues from it. The finished student is published at
  OUT whole (a Hugging Face checkpoint with the teacher's tokenizer and distill.json) and the work state is
  removed.
- Under torchrun every process runs this same code (models/distributed.py): each takes its slice of every
  global batch, DDP (or FSDP2 with `fsdp`) averages the gradients, rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.distributed import Cluster, cluster, full_state_dict, unwrap
from models.errors import UserError
from models.files import remove_tree
from models.train import lr_at  # the same warmup and cosine, read from the config's lr/warmup_steps/min_lr_ratio

BUILTIN = "builtin"


@dataclass(frozen=True)
class DistillConfig:
    corpus: str | None = None      # text file or directory; None: this Python's standard library sources
    max_corpus_bytes: int = 8_000_000
    seq_len: int = 256             # tokens per window
    batch_size: int = 4            # windows per optimizer step, over all processes
    lr: float = 1e-4               # peak learning rate (a pruned student starts close: small steps)
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 100_000       # the clock usually ends the run first
    max_seconds: float | None = 1800.0  # training time budget (None: steps only)
    temperature: float = 1.0
    top_k: int = 64                # teacher logits kept per position (0: the full distribution, no cache)
    ce_weight: float = 0.0         # weight of the ordinary next-token loss beside the KL
    hidden_weight: float = 0.0     # weight of the hidden-state loss (pruned students)
    eval_every: int = 50           # steps between held-out perplexity measurements
    eval_windows: int = 32         # held-out windows measured
    checkpoint_every: int = 100    # steps between saves of the work state
    resume: bool = False           # continue from OUT.distill/state.pt
    bf16: bool = True              # bfloat16 autocast where the CPU has bf16 instructions (or on CUDA)
    freeze_embeddings: bool | None = None  # None: frozen when the student's embeddings come from the teacher
    fsdp: bool = False             # shard teacher and student with FSDP2 under torchrun
    seed: int = 0

    def check(self) -> None:
        for name in ("seq_len", "batch_size", "max_steps", "eval_every", "eval_windows", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise UserError(f"top_k must be 0 (the full distribution) or more, got {self.top_k}")
        if self.temperature <= 0 or self.lr <= 0:
            raise UserError("temperature and lr must be positive")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise UserError(f"max_seconds must be positive, got {self.max_seconds}")


def bf16_usable() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags or " bf16" in flags  # x86 and AArch64 (FEAT_BF16)


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".distill")


class TopKCache:
    """The teacher's top-k log-probabilities (float16) and token ids (int32) per training window, in two sparse memory-mapped
    files; `filled` says which windows hold them. Rebuilt when anything it depends on changes (meta.json)."""

    def __init__(self, folder: Path, n: int, seq_len: int, k: int, key: dict, cl: Cluster):
        self.folder = folder
        shape = (n, seq_len, k)
        meta = folder / "topk-meta.json"
        fresh = not meta.is_file() or json.loads(meta.read_text()) != key
        cl.barrier()  # every process reads meta.json before the main one rewrites it
        if cl.main:
            folder.mkdir(parents=True, exist_ok=True)
            if fresh:
                for name in ("topk-values.f16", "topk-index.i32", "topk-filled.npy"):
                    (folder / name).unlink(missing_ok=True)
                with open(folder / "topk-values.f16", "wb") as f:
                    f.truncate(int(np.prod(shape)) * 2)
                with open(folder / "topk-index.i32", "wb") as f:
                    f.truncate(int(np.prod(shape)) * 4)
                np.save(folder / "topk-filled.npy", np.zeros(n, dtype=bool))
                meta.write_text(json.dumps(key, sort_keys=True))
        cl.barrier()
        self.values = np.memmap(folder / "topk-values.f16", dtype=np.float16, mode="r+", shape=shape)
        self.index = np.memmap(folder / "topk-index.i32", dtype=np.int32, mode="r+", shape=shape)
        self.filled = np.load(folder / "topk-filled.npy")

    def get(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not all(self.filled[r] for r in rows):
            return None
        return (torch.from_numpy(np.asarray(self.values[rows])).float(),
                torch.from_numpy(np.asarray(self.index[rows])).long())

    def put(self, rows: list[int], values: torch.Tensor, index: torch.Tensor) -> None:
        self.values[rows] = values.to(torch.float16).cpu().numpy()
        self.index[rows] = index.to(torch.int32).cpu().numpy()

    def mark(self, rows: list[int]) -> None:
        """Every process marks the whole global batch: each filled its own slice of it in this step."""
        self.filled[rows] = True

    def flush(self, cl: Cluster) -> None:
        self.values.flush()
        self.index.flush()
        cl.barrier()
        if cl.main:
            tmp = self.folder / "topk-filled.tmp.npy"
            np.save(tmp, self.filled)
            os.replace(tmp, self.folder / "topk-filled.npy")

    def hits(self) -> int:
        return int(self.filled.sum())


def index_batches(n: int, batch_size: int, seed: int, skip: int = 0):
    """Endless global batches of window indices, reshuffled each epoch from a seeded generator (as
    models.train.batches), with the first `skip` batches passed over (a resumed run continues the order)."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    done = 0
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - batch_size + 1, batch_size):
            if done >= skip:
                yield order[i:i + batch_size]
            done += 1


def kd_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_index: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over positions; `teacher_logp` are the teacher's
    log-probabilities at T (over the whole vocabulary). With `teacher_index` they are its top k: the KL is then
    taken over k + 1 outcomes, the k tokens and "any other token" (the teacher's remaining mass against the
    student's), so it is zero exactly when the student matches the teacher on those k and on the rest, and never
    rewards a student for piling the tail's mass onto the top k."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = teacher_logp.float()
    if teacher_index is None:
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        logq = logq.gather(-1, teacher_index)
        p_rest = (1 - logp.exp().sum(-1)).clamp_min(0)
        q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
        kl = (logp.exp() * (logp - logq)).sum(-1) + p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log())
    return kl.mean() * temperature ** 2


def hidden_loss(student_states, teacher_states, layer_map: list[int], channels: torch.Tensor) -> torch.Tensor:
    """Mean over student layers (but the last, whose output the logits already judge) of the squared error
    between its output and the teacher's at the mapped layer, on the kept channels, relative to the latter's
    mean square."""
    losses = []
    for i in range(len(layer_map) - 1):
        s = student_states[i + 1].float()
        t = teacher_states[layer_map[i] + 1][..., channels].float()
        losses.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-6))
    return torch.stack(losses).mean() if losses else student_states[0].new_zeros(())


def load_models(teacher_src: str, student_src: str, workdir: Path, cl: Cluster):
    from models.checkpoint import save_checkpoint
    from models.decoder import Decoder
    from models.hf import export_tokenizer, load_hf_reference, token_id
    from models.train import TrainConfig

    teacher = load_hf_reference(teacher_src)
    if student_src == BUILTIN:
        init = workdir / "builtin-init"
        if cl.main and not (init / "config.json").is_file():
            with tempfile.TemporaryDirectory() as tmp:
                tok = export_tokenizer(teacher_src, tmp)
                torch.manual_seed(0)
                model = Decoder(TrainConfig().decoder_config(teacher.config.vocab_size))
                extra = {"bos_token_id": token_id(teacher, "bos_token_id"),
                         "eos_token_id": token_id(teacher, "eos_token_id")}
                save_checkpoint(model, init, tok, extra)
        cl.barrier()
        student_src = str(init)
    student = load_hf_reference(student_src)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(f"the student's vocabulary ({student.config.vocab_size}) is not the teacher's "
                        f"({teacher.config.vocab_size}); distillation matches distributions token by token, so "
                        "the student must use the teacher's tokenizer")
    pruning = Path(student_src) / "pruning.json"
    record = json.loads(pruning.read_text()) if Path(student_src).is_dir() and pruning.is_file() else None
    return teacher, student, record


def fingerprint(path: str) -> dict:
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return {"path": str(p), "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]}


def distill(teacher_src: str, student_src: str, out: str | Path, config: DistillConfig, progress: bool = True) -> dict:
    """Distill `teacher_src` into `student_src` (a checkpoint directory, or "builtin"); publish the student at
    `out`. Returns the summary written to OUT/distill.json (on every process; only rank 0 writes)."""
    config.check()
    out = Path(out).resolve()
    with cluster() as cl:
        cl.check_batch(config.batch_size)
        return run(teacher_src, student_src, out, config, cl, progress and cl.main)


def run(teacher_src: str, student_src: str, out: Path, config: DistillConfig, cl: Cluster, progress: bool) -> dict:
    from models.hf import token_id
    from models.textdata import corpus_windows, perplexity, source_tokenizer

    work = work_dir(out)
    state_file = work / "state.pt"
    if cl.main:
        work.mkdir(parents=True, exist_ok=True)
    cl.barrier()
    state = None
    if config.resume:
        if not state_file.is_file():
            raise UserError(f"nothing to resume: {state_file} does not exist (a run saves it every "
                            f"{config.checkpoint_every} steps)")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state["key"] != {"teacher": teacher_src, "student": student_src, "seq_len": config.seq_len,
                            "batch_size": config.batch_size, "corpus": config.corpus}:
            raise UserError(f"{state_file} belongs to another distillation ({state['key']}); "
                            "start afresh without --resume")
    torch.manual_seed(config.seed)
    teacher, student, record = load_models(teacher_src, student_src, work, cl)
    if config.hidden_weight and record is None:
        raise UserError("--hidden-weight needs a student made by `pipeline prune` (its pruning.json maps the "
                        "student's layers and channels onto the teacher's)")
    eos = token_id(teacher, "eos_token_id")
    tok = source_tokenizer(teacher_src, work / "tokenizer", eos if eos is not None else token_id(teacher, "bos_token_id"))
    data = corpus_windows(tok, config.corpus, config.seq_len, config.max_corpus_bytes)
    train_data, held_out = data["train"], data["valid"][:config.eval_windows]

    freeze = config.freeze_embeddings if config.freeze_embeddings is not None else record is not None
    for p in student.get_input_embeddings().parameters():
        p.requires_grad_(not freeze)
    if state is not None:
        student.load_state_dict(state["student"])
    teacher.requires_grad_(False)
    bf16 = config.bf16 and bf16_usable()

    def autocast():
        return torch.autocast(cl.device.type, dtype=torch.bfloat16, enabled=bf16)

    teacher_ppl = state["teacher_ppl"] if state else None
    if teacher_ppl is None:
        with autocast():
            teacher_ppl = perplexity(teacher, held_out, cl=cl)
    teacher = cl.wrap(teacher, fsdp=config.fsdp) if config.fsdp else teacher.to(cl.device)
    model = cl.wrap(student.train(), fsdp=config.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    if state is not None:
        load_optimizer(model, optimizer, state["optimizer"], cl)

    use_cache = config.top_k > 0 and not config.hidden_weight
    cache = None
    if use_cache:
        key = {"teacher": fingerprint(teacher_src), "corpus": config.corpus, "max_corpus_bytes": config.max_corpus_bytes,
               "seq_len": config.seq_len, "k": config.top_k, "temperature": config.temperature,
               "windows": len(train_data),
               "first": hashlib.sha256(train_data[:8].numpy().tobytes()).hexdigest()}
        cache = TopKCache(work, len(train_data), config.seq_len, config.top_k, key, cl)
    layer_map = record["kept"]["layers"] if record else None
    channels = torch.tensor(record["kept"]["hidden"]) if record else None

    step = state["step"] if state else 0
    tokens = state["tokens"] if state else 0
    curve = state["curve"] if state else []
    spent = state["seconds"] if state else 0.0
    cpu_spent = state["cpu_seconds"] if state else 0.0
    teacher_runs = state["teacher_runs"] if state else 0
    if not curve:
        with autocast():
            curve.append(point(0, 0, 0.0, 0.0, None, perplexity(model, held_out, cl=cl)))
    start_ppl = curve[0]["perplexity"]
    recent: list[float] = state["recent"] if state else []  # the last 20 step losses, behind train_loss
    clock0, cpu0 = time.monotonic(), cpu_seconds(cl)
    stopped_by = "max_steps"
    batches = index_batches(len(train_data), config.batch_size, config.seed, skip=step)
    bar = tqdm(total=config.max_steps, initial=step, desc="distill", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        while step < config.max_steps:
            elapsed = spent + time.monotonic() - clock0
            per_step = (time.monotonic() - clock0) / max(1, step - (state["step"] if state else 0))
            out_of_time = config.max_seconds is not None and elapsed + per_step > config.max_seconds
            if cl.agree(out_of_time and step > 0):
                stopped_by = "max_seconds"
                break
            progress_share = step / config.max_steps
            if config.max_seconds is not None:
                progress_share = cl.agree(max(progress_share, elapsed / config.max_seconds))
            lr = lr_at(config, step, progress_share)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = next(batches)
            local = cl.shard(torch.tensor(rows)).tolist()
            batch = train_data[local].to(cl.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast():
                cached = cache.get(local) if cache is not None else None
                if cl.parallel and cl.sum(cached is None)[0]:
                    cached = None  # one process lacks a window: all run the teacher (FSDP's gathers need all)
                t_states = None
                if cached is None:
                    with torch.no_grad():
                        t_out = teacher(input_ids=inputs, use_cache=False,
                                        output_hidden_states=bool(config.hidden_weight))
                    teacher_runs += len(rows)
                    t_logits = t_out.logits.float()
                    t_states = t_out.hidden_states
                    t_logp = F.log_softmax(t_logits / config.temperature, dim=-1)
                    if config.top_k:
                        values, index = torch.topk(t_logp, config.top_k, dim=-1)
                        if use_cache:
                            cache.put(local, values, index)
                    else:
                        values, index = t_logp, None
                else:
                    values, index = (t.to(cl.device) for t in cached)
                s_out = model(input_ids=inputs, use_cache=False, output_hidden_states=bool(config.hidden_weight))
                loss = kd_loss(s_out.logits, values, index, config.temperature)
                kl = loss.detach()
                if config.ce_weight:
                    logits = s_out.logits.float()
                    loss = loss + config.ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                     targets.reshape(-1))
                if config.hidden_weight:
                    loss = loss + config.hidden_weight * hidden_loss(s_out.hidden_states, t_states, layer_map,
                                                                     channels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if cache is not None:
                cache.mark(rows)
            step += 1
            tokens += inputs.numel() * cl.world
            value = cl.mean(loss.item())
            recent = (recent + [value])[-20:]
            bar.update(1)
            now = spent + time.monotonic() - clock0
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens / max(now, 1e-9):.0f}")
            if step % config.eval_every == 0:
                with autocast():
                    ppl = perplexity(model, held_out, cl=cl)
                curve.append(point(step, tokens, now, cpu_spent + cpu_seconds(cl) - cpu0,
                                   sum(recent) / len(recent), ppl, float(cl.mean(kl.item()))))
                bar.write(f"step {step}: held-out perplexity {ppl:.3f} (start {start_ppl:.3f}, "
                          f"teacher {teacher_ppl:.3f})") if progress else None
            if step % config.checkpoint_every == 0:
                save_state(state_file, model, optimizer, cl, cache, {
                    "key": {"teacher": teacher_src, "student": student_src, "seq_len": config.seq_len,
                            "batch_size": config.batch_size, "corpus": config.corpus},
                    "step": step, "tokens": tokens, "curve": curve, "teacher_ppl": teacher_ppl,
                    "seconds": now, "cpu_seconds": cpu_spent + cpu_seconds(cl) - cpu0,
                    "teacher_runs": teacher_runs, "recent": recent})
    finally:
        bar.close()
    seconds = spent + time.monotonic() - clock0
    cpu_total = cpu_spent + cpu_seconds(cl) - cpu0
    if curve[-1]["step"] != step:
        with autocast():
            curve.append(point(step, tokens, seconds, cpu_total, sum(recent) / max(1, len(recent)),
                               perplexity(model, held_out, cl=cl)))
    weights = full_state_dict(model, cl)
    summary = {"teacher": teacher_src, "student": student_src, "config": asdict(config), "processes": cl.world,
               "steps": step, "tokens_seen": tokens, "train_seconds": seconds, "cpu_seconds": cpu_total,
               "steps_per_s": step / max(seconds, 1e-9), "tokens_per_s": tokens / max(seconds, 1e-9),
               "stopped_by": stopped_by, "bf16": bf16, "embeddings_frozen": freeze,
               "teacher_windows_run": teacher_runs, "cached_windows": cache.hits() if cache else 0,
               "teacher_perplexity": teacher_ppl, "start_perplexity": start_ppl,
               "final_perplexity": curve[-1]["perplexity"], "curve": curve, "out": str(out)}
    if record is not None:
        from models.prune import recovered

        summary["pruned_from"] = record["source"]
        summary["recovered"] = recovered(teacher_ppl, start_ppl, curve[-1]["perplexity"])
    if cl.main:
        from models.prune import save_pretrained_dir

        extra = {"distill.json": summary}
        if record is not None:
            extra["pruning.json"] = record
        save_pretrained_dir(unwrap(model), teacher_src, out, extra, state_dict=weights)
        remove_tree(work)
    cl.barrier()
    return summary


def point(step: int, tokens: int, seconds: float, cpu: float, train_loss, ppl: float, kl=None) -> dict:
    return {"step": step, "tokens": tokens, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "train_loss": train_loss, "kl": kl, "perplexity": ppl}


def cpu_seconds(cl: Cluster) -> float:
    """CPU time of this process (user + system, all its threads), summed over the processes."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return cl.sum(use.ru_utime + use.ru_stime)[0]


def load_optimizer(model, optimizer, saved: dict, cl: Cluster) -> None:
    if cl.parallel:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


def save_state(path: Path, model, optimizer, cl: Cluster, cache: TopKCache | None, fields: dict) -> None:
    """The work state, written aside and renamed (a Ctrl-C mid-save keeps the previous one); every process
    takes part (FSDP gathers the shards), rank 0 writes."""
    if cl.parallel:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
    else:
        opt = optimizer.state_dict()
    weights = full_state_dict(model, cl)
    if cache is not None:
        cache.flush(cl)
    if cl.main:
        tmp = path.with_suffix(".tmp")
        torch.save({**fields, "student": weights, "optimizer": opt}, tmp)
        os.replace(tmp, path)
    cl.barrier()


def summary_line(r: dict) -> str:
    line = (f"distilled {r['steps']} steps, {r['tokens_seen']:,} tokens in {r['train_seconds']:.0f}s "
            f"({r['cpu_seconds']:.0f} CPU s, {r['processes']} process(es)): held-out perplexity "
            f"{r['start_perplexity']:.3f} -> {r['final_perplexity']:.3f} (teacher {r['teacher_perplexity']:.3f})")
    if "recovered" in r:
        line += f"; recovered {r['recovered']['perplexity']:.0%} of the perplexity pruning lost"
    return line

