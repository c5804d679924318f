"""Train the demo decoder from scratch on CPU in a few minutes, and save it as a Hugging Face checkpoint.

The run is: corpus (models/corpus.py) -> byte-level BPE (models/tokenizer.py) -> token stream with
<|endoftext|> between documents -> AdamW with warmup and cosine decay -> validation loss/perplexity on the
"valid" split, next to the unigram perplexity that a model which learned nothing about context would get ->
a greedy sample -> save_checkpoint (atomic, so Ctrl-C never leaves a half-written checkpoint).

Both `max_steps` and `max_seconds` bound the run; the learning-rate schedule follows whichever is nearer to
its end, so a run cut short by the clock still finishes its cosine decay instead of stopping at a high rate.

Under torchrun every process runs this same code (models/distributed.py): each takes its contiguous slice of
every global batch of `batch_size` windows, DDP (or FSDP2 with `fsdp`) averages the gradients, so N processes
take the steps one process takes; rank 0's clock decides when to stop and how far the schedule is, evaluation
and the sample run on every process, and rank 0 alone shows progress and writes the checkpoint.

    torchrun --nproc-per-node 2 -m pipeline train --out runs/demo
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import save_checkpoint
from models.corpus import DEFAULT_MAX_BYTES, load_corpus
from models.decoder import Decoder, DecoderConfig
from models.distributed import Cluster, cluster, full_state_dict, unwrap
from models.errors import UserError
from models.tokenizer import DEFAULT_VOCAB_SIZE, TrainedTokenizer, train_tokenizer

SAMPLE_PROMPT = "    def"  # the corpus is Python; " def" after indentation is unambiguously the keyword
REPETITION_PENALTY = 1.3   # for the sample only (see greedy_sample)


@dataclass(frozen=True)
class TrainConfig:
    # model size: small on purpose. On 2 CPU cores a 4-minute run sees ~1M tokens, far too few for a wider
    # model to catch up: at equal wall time width 128 reached validation ppl ~90 where width 192 reached ~160
    hidden_size: int = 128           # width of the residual stream
    num_layers: int = 4              # transformer blocks (6 layers learned slower per second)
    num_heads: int = 4               # query heads (head_dim = 32)
    num_kv_heads: int = 2            # grouped-query attention, as in the exported graphs
    intermediate_size: int = 352     # SwiGLU width (~8/3 * hidden, multiple of 16)
    vocab_size: int = DEFAULT_VOCAB_SIZE  # BPE vocabulary requested from the tokenizer trainer
    # data
    corpus: str | None = None        # text file or directory; None = the Python standard library's source
    max_corpus_bytes: int = DEFAULT_MAX_BYTES  # corpus budget over all splits (train gets 80%, ~1.8M tokens)
    seq_len: int = 128               # tokens per training window (cheaper attention than 256, learned faster)
    batch_size: int = 8              # windows per step: at equal time, more small steps beat fewer big ones
    eval_windows: int = 128          # validation windows scored at the end (128 * 128 = 16k tokens)
    # optimisation
    lr: float = 3e-3                 # peak learning rate (small models tolerate a high one)
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30           # linear warmup from 0, in steps
    weight_decay: float = 0.1        # AdamW decay, applied to matrices only (not norms)
    grad_clip: float = 1.0           # global gradient-norm clip: keeps the high lr stable early on
    max_steps: int = 2000            # step budget: on 2 cores the clock ends the run first
    max_seconds: float = 240.0       # wall-clock budget for the whole call (setup, training, eval, saving)
    seed: int = 0                    # weights and data order
    threads: int = 0                 # torch intra-op threads; 0 = torch's default less the cores already busy
                                     # (under torchrun: each process's share of the cores)
    fsdp: bool = False               # under torchrun, shard parameters and optimizer state (FSDP2), not DDP
    sample_tokens: int = 48          # length of the greedy sample

    def decoder_config(self, vocab_size: int) -> DecoderConfig:
        """The model for a tokenizer of `vocab_size` tokens (the trainer may return fewer than requested)."""
        return DecoderConfig(vocab_size=vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                             num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                             intermediate_size=self.intermediate_size,
                             max_position_embeddings=max(self.seq_len, DecoderConfig.max_position_embeddings))


def busy_cores(interval: float = 0.5) -> float:
    """Cores' worth of CPU time other processes are using now, sampled from /proc/stat over `interval` seconds.

    The 1-minute load average would do on paper, but it lags: a minute after a heavy job ends it still reads
    ~1 on an idle machine. Where /proc/stat is missing, it is the fallback.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


def idle_cores() -> int:
    """Cores not already busy, at least 1.

    More torch threads than free cores is far worse than fewer: on 2 cores shared with another busy process,
    2 threads made each step 2.5x slower than 1 thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - busy_cores())))


def token_stream(tok: TrainedTokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream, each preceded by <|endoftext|> so the model learns where documents start."""
    encodings = tok.tokenizer.encode_batch(docs)  # batched: runs on all cores in Rust
    ids: list[int] = []
    for enc in encodings:
        ids.append(tok.eos_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping (n, seq_len + 1) windows: inputs are [:, :-1], targets [:, 1:]."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise UserError(f"corpus split has {len(stream)} tokens, fewer than one window of {seq_len}; "
                        "give more text or a smaller seq_len")
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def batches(data: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of windows, reshuffled each epoch from a seeded generator: the same order every run."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(data))
    while True:
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield data[order[i:i + batch_size]]


def lm_loss(model: Decoder, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T + 1) batch."""
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def make_optimizer(model: Decoder, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains towards 0 only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def lr_at(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warm * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate(model: Decoder, data: torch.Tensor, batch_size: int, cl: Cluster = Cluster()) -> float:
    """Mean next-token loss over all of `data`'s windows (every window has the same length, so means average).

    With several processes each scores its slice of every batch and the sums are combined. Every process makes
    the same forward calls (FSDP gathers the parameters in each): one whose slice of the last batch is empty
    runs a window it does not count.
    """
    model.eval()
    total = count = 0.0
    for i in range(0, len(data), batch_size):
        batch = data[i:i + batch_size]
        mine = batch.tensor_split(cl.world)[cl.rank]
        if len(mine):
            total += lm_loss(model, mine).item() * len(mine)
            count += len(mine)
        else:
            lm_loss(model, batch[:1])
    total, count = cl.sum(total, count)
    model.train()
    return total / count


def unigram_loss(train_stream: torch.Tensor, data: torch.Tensor, vocab_size: int) -> float:
    """Loss of predicting every target from training-token frequencies alone (add-one smoothed): the baseline
    a model reaches if it learned nothing from context."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[data[:, 1:].reshape(-1)].mean().item()


@torch.no_grad()
def greedy_sample(model: Decoder, tok: TrainedTokenizer, prompt: str, n_tokens: int, cl: Cluster = Cluster()) -> str:
    """The prompt and its greedy continuation (with a repetition penalty), cut at the first <|endoftext|>.

    Plain greedy decoding of a model this small falls into loops ("self.w, self.w, self.w") that hide what it
    learned; HF-style repetition_penalty=REPETITION_PENALTY on already-present tokens keeps the sample
    deterministic and shows the model's Python. The prompt is not preceded by <|endoftext|>: a continuation
    from the middle of a stream is more telling than a guess at a file header. With several processes, each
    token is rank 0's choice: every process then makes the same calls and returns the same text.
    """
    ids = tok.tokenizer.encode(prompt).ids
    seen = torch.zeros(tok.vocab_size, dtype=torch.bool)
    seen[ids] = True
    model.eval()
    logits, past = model(torch.tensor([ids]))
    new: list[int] = []
    for _ in range(n_tokens):
        last = logits[0, -1]
        last = torch.where(seen, torch.where(last > 0, last / REPETITION_PENALTY, last * REPETITION_PENALTY), last)
        nxt = int(cl.agree(int(last.argmax())))
        if nxt == tok.eos_id:
            break
        new.append(nxt)
        seen[nxt] = True
        logits, past = model(torch.tensor([[nxt]]), past_key_values=past)
    model.train()
    return prompt + tok.tokenizer.decode(new)


def train(config: TrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train a decoder as `config` says, save it at `out_dir` (HF Llama format) and return a summary.

    Under torchrun every process calls this and returns the same summary; only rank 0 shows progress and
    writes `out_dir`. KeyboardInterrupt propagates untouched: the checkpoint is written only at the end,
    atomically.
    """
    start = time.monotonic()
    with cluster() as cl:
        cl.check_batch(config.batch_size)
        previous_threads = torch.get_num_threads()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        elif not cl.parallel:  # under torchrun, cluster() has given each process its share of the cores
            torch.set_num_threads(min(previous_threads, idle_cores()))
        try:
            with tempfile.TemporaryDirectory(prefix="pipeline-train-") as tmp:
                return run(config, Path(out_dir), Path(tmp), start, progress and cl.main, cl)
        finally:
            torch.set_num_threads(previous_threads)


def run(config: TrainConfig, out_dir: Path, tmp: Path, start: float, progress: bool,
        cl: Cluster = Cluster()) -> dict:
    """train()'s body, with the tokenizer kept in `tmp` until save_checkpoint copies it."""
    corpus = load_corpus(config.corpus, config.max_corpus_bytes)
    tok = train_tokenizer(corpus["train"], tmp / "tokenizer.json", config.vocab_size)
    train_stream = token_stream(tok, corpus["train"])
    train_data = windows(train_stream, config.seq_len)
    valid_data = windows(token_stream(tok, corpus["valid"]), config.seq_len)[: config.eval_windows]
    check_same_data(cl, tok, train_stream)

    torch.manual_seed(config.seed)
    model = cl.wrap(Decoder(config.decoder_config(tok.vocab_size)), fsdp=config.fsdp)
    optimizer = make_optimizer(model, config)  # after wrapping: FSDP replaces the parameters by their shards
    model.train()

    loop = train_loop(model, optimizer, train_data, config, start, progress, cl)
    val_loss = evaluate(model, valid_data, config.batch_size, cl)
    uni_loss = unigram_loss(train_stream, valid_data, tok.vocab_size)
    summary = {
        **loop,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "unigram_ppl": math.exp(uni_loss),
        "params": sum(p.numel() for p in model.parameters()),  # an FSDP shard's numel() is the whole tensor's
        "vocab_size": tok.vocab_size,
        "train_tokens_available": len(train_stream),
        "threads": torch.get_num_threads(),
        "processes": cl.world,
        "sample": greedy_sample(model, tok, SAMPLE_PROMPT, config.sample_tokens, cl),
    }
    extra = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id,
             "training": summary, "train_config": asdict(config)}
    final = gathered(model, cl)  # every process takes part (FSDP gathers the shards); rank 0 gets the model
    summary["checkpoint"] = str(save_checkpoint(final, out_dir, tok.path, extra) if final else out_dir.resolve())
    cl.barrier()  # no process returns (and leaves the process group) before the checkpoint is written
    summary["seconds"] = time.monotonic() - start
    return summary


def check_same_data(cl: Cluster, tok: TrainedTokenizer, train_stream: torch.Tensor) -> None:
    """Every process trained its own tokenizer and tokenized the corpus itself: refuse to go on if any got other
    ids than rank 0 (a model of another vocabulary size would stop DDP; another tokenization would train on
    other windows without a word)."""
    if not cl.parallel:
        return
    digest = hashlib.sha256(Path(tok.path).read_bytes())
    digest.update(train_stream.numpy().tobytes())
    mine = float(int.from_bytes(digest.digest()[:6], "big"))  # 48 bits: exact in the float64 agree() carries
    if cl.sum(float(cl.agree(mine) != mine))[0]:
        raise UserError("the processes tokenized the corpus differently (the tokenizer trainer was not "
                        "deterministic here); train with one process")


def gathered(model: torch.nn.Module, cl: Cluster) -> Decoder | None:
    """The trained model as a plain Decoder holding every weight whole, on rank 0 (None on the others). Every
    process must call it: under FSDP the weights are gathered from the shards."""
    weights = full_state_dict(model, cl)
    if not cl.main:
        return None
    if not cl.parallel:
        return model
    plain = Decoder(unwrap(model).config)  # DDP wraps the model; FSDP2 made it a subclass holding shards
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if plain.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return plain


def reserve_seconds(config: TrainConfig, step_time: float) -> float:
    """Time to keep for after the loop: evaluation runs `eval_windows` forward-only (about a third of a training
    step per batch), plus a few seconds for the sample and the checkpoint."""
    return math.ceil(config.eval_windows / config.batch_size) * step_time / 3 + 5.0


def global_batch_size(batch_size: int, windows: int, cl: Cluster) -> int:
    """`batch_size`, or as many of the corpus's windows as divide among the processes when it holds fewer."""
    size = min(batch_size, windows - windows % cl.world)
    if size < 1:
        raise UserError(f"the corpus has {windows} training window(s), fewer than the {cl.world} processes; "
                        "give more text or a smaller seq_len")
    return size


def train_loop(model: Decoder, optimizer: torch.optim.Optimizer, data: torch.Tensor, config: TrainConfig,
               start: float, progress: bool, cl: Cluster = Cluster()) -> dict:
    """Optimise until max_steps, or until the clock leaves just enough of max_seconds for evaluation and saving.

    The deadline is re-estimated every step from the mean step time so far; the progress bar's total follows
    it, so its ETA is right whichever budget ends the run. With several processes, rank 0's clock decides for
    all: each process's own would stop one while another waits for it in DDP's all-reduce, or give them other
    learning rates. Each process computes its slice of every global batch; the loss shown and returned is the
    mean over processes, which is the whole batch's.
    """
    loop_start = time.monotonic()
    recent: list[float] = []
    initial_loss = None
    tokens_seen = 0
    stopped_by = "max_steps"
    step = 0
    with tqdm(total=config.max_steps, desc="train", unit="step", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in batches(data, global_batch_size(config.batch_size, len(data), cl), config.seed):
            if step >= config.max_steps:
                break
            planned = config.max_steps  # steps the run will take: the time budget only ever lowers it
            if step:
                now = time.monotonic()
                step_time = (now - loop_start) / step
                deadline = start + config.max_seconds - reserve_seconds(config, step_time)
                out_of_time = now + step_time > deadline
                planned = min(planned, step + int((deadline - now) / max(step_time, 1e-9)))
                # rank 0's verdict, the same on every process: out of time is "no step beyond this one"
                planned = int(cl.agree(step if out_of_time else max(planned, step + 1)))
                if planned <= step:
                    stopped_by = "max_seconds"
                    break
                bar.total = planned
            # the schedule reads the clock only when the time budget binds: otherwise the same seed gives the
            # same model however loaded the machine is (a wall-clock fraction here moved step 0's lr with load)
            lr = lr_at(config, step, step / max(planned, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = lm_loss(model, cl.shard(batch))  # this process's rows; DDP averages the gradients
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = cl.mean(loss.item())  # equal slices: the mean of their means is the whole batch's
            initial_loss = value if initial_loss is None else initial_loss
            recent = (recent + [value])[-20:]
            step += 1
            tokens_seen += batch[:, :-1].numel()
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.1e}")
    seconds = time.monotonic() - loop_start
    return {
        "initial_loss": initial_loss,
        "train_loss": sum(recent) / len(recent),  # mean of the last 20 steps: one batch is noisy
        "steps": step,
        "train_seconds": seconds,
        "steps_per_s": step / seconds,
        "tokens_seen": tokens_seen,
        "stopped_by": stopped_by,
    }
