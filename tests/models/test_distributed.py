"""models/distributed.py under a real torchrun: 2 gloo processes on the CPU distil a tiny teacher into its pruned
self, with DDP and with FSDP2, and must take the very steps one process takes on the same global batches.

Each job runs a small script (written to tmp_path) that calls models.distill.distill three times in the same
processes: with the full teacher distribution (top_k 0), with the top-k cache, and with the top-k cache
interrupted after its checkpoint and resumed. The first two run in this process too, as the reference. The
2-process students must equal the 1-process ones parameter by parameter, their curves agree, and only rank 0
may have written anything.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from models.distill import DistillConfig, distill
from models.distributed import Cluster, cluster, environment
from models.errors import UserError
from models.prune import PruneConfig, prune
from tests.models.tiny_teacher import corpus_tokenizer, family_config, save_teacher, write_corpus

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
RUNS = {"full": 0, "top64": 64, "resumed": 64}  # run name -> top_k ("resumed": stopped at step 3 and resumed)
JOB_TIMEOUT = 240  # seconds; a job that deadlocks in a collective is killed and fails the test

CHILD = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
import models.distill as distill_module
from models.distill import DistillConfig, distill

spec = json.loads(sys.argv[1])
save_state = distill_module.save_state


def save_then_stop(path, *args):
    save_state(path, *args)
    raise KeyboardInterrupt


for name, top_k, out in spec["runs"]:
    config = DistillConfig(**spec["config"], top_k=top_k)
    if name == "resumed":  # stopped after the first checkpoint, on every process, then resumed
        distill_module.save_state = save_then_stop
        try:
            distill(spec["teacher"], spec["student"], out, config, progress=False)
            raise AssertionError("not interrupted")
        except KeyboardInterrupt:
            pass
        distill_module.save_state = save_state
        config = DistillConfig(**{**config.__dict__, "resume": True})
    s = distill(spec["teacher"], spec["student"], out, config, progress=False)
    line = "SUMMARY " + json.dumps({"rank": int(os.environ["RANK"]), "name": name, "summary": s}) + "\n"
    os.write(1, line.encode())  # one write: the two processes share the output (and python -u splits print's)
"""


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small corpus (10 training windows: 6 steps of 4 pass 2 epochs, so the top-k runs read the cache; 3
    held-out windows, which 2 processes cannot split evenly), a teacher and its pruned student, and the 1-process
    reference runs."""
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    root = tmp_path_factory.mktemp("distributed")
    corpus = write_corpus(root / "corpus")
    small = write_corpus(root / "small", files=80, words=15)
    tok = corpus_tokenizer(corpus, root / "tokenizer.json")
    save_teacher(family_config("llama", tok.vocab_size, tok.eos_id, tied=True), tok, root / "teacher")
    prune(root / "teacher", root / "pruned", PruneConfig(mlp=0.5, heads=0.5, hidden=0.25, layers=1, multiple=8,
                                                         seq_len=16, calib_windows=8, eval_windows=8,
                                                         corpus=str(corpus)))
    config = dict(corpus=str(small), max_corpus_bytes=300, seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2,
                  max_steps=6, eval_every=3, checkpoint_every=3, eval_windows=3, bf16=False, max_seconds=None)
    single = {}
    for top_k in sorted(set(RUNS.values())):
        out = root / f"single-{top_k}"
        summary = distill(str(root / "teacher"), str(root / "pruned"), out, DistillConfig(**config, top_k=top_k),
                          progress=False)
        single[top_k] = (load_file(out / "model.safetensors"), summary)
    return {"teacher": str(root / "teacher"), "student": str(root / "pruned"), "config": config, "single": single}


def descendants(pid: int) -> list[int]:
    """Processes below `pid`, from /proc (torchrun starts each worker in a session of its own, out of reach of a
    signal to torchrun's process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen) -> None:
    """End a hung job: torchrun and every worker it started."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def launch(script: Path, args: list[str], log: Path) -> tuple[int, str]:
    """`torchrun --nproc-per-node 2 script args` on a free port (a hang is killed, the workers with torchrun);
    its exit status and output (also kept in `log`)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop(proc)
            pytest.fail(f"torchrun job did not finish in {JOB_TIMEOUT}s (a collective waiting forever?):\n"
                        f"{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def torchrun(setup, job: Path, fsdp: bool) -> dict:
    """The distillations of RUNS, in order, in 2 gloo processes: the job folder, its exit status and output, and
    run name -> {rank: summary} from each rank's output."""
    job.mkdir()
    (job / "child.py").write_text(CHILD)
    spec = {"teacher": setup["teacher"], "student": setup["student"], "config": {**setup["config"], "fsdp": fsdp},
            "runs": [[name, top_k, str(job / f"out-{name}")] for name, top_k in RUNS.items()]}
    returncode, output = launch(job / "child.py", [json.dumps(spec)], job.parent / "log.txt")
    runs: dict = {}
    for line in output.splitlines():
        if line.startswith("SUMMARY "):
            r = json.loads(line[len("SUMMARY "):])
            runs.setdefault(r["name"], {})[r["rank"]] = r["summary"]
    return {"job": job, "returncode": returncode, "output": output, "runs": runs}


@pytest.fixture(scope="module")
def jobs(setup, tmp_path_factory):
    """mode ("ddp" or "fsdp") -> its torchrun job, run once for the module's tests."""
    done = {}

    def job(mode: str) -> dict:
        if mode not in done:
            done[mode] = torchrun(setup, tmp_path_factory.mktemp(mode) / "job", mode == "fsdp")
        return done[mode]
    return job


TIMING = ("train_seconds", "steps_per_s", "tokens_per_s")  # each process's own clock


def untimed(summary: dict) -> dict:
    return {**{k: v for k, v in summary.items() if k not in TIMING},
            "curve": [{k: v for k, v in p.items() if k != "seconds"} for p in summary["curve"]]}


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_take_the_one_process_steps(mode, name, setup, jobs):
    """"resumed" also holds the state a resume reads (every parameter under its single-process name, a tied head
    included; the optimizer's state gathered from the shards) to the straight 1-process run."""
    run, top_k = jobs(mode), RUNS[name]
    job, out = run["job"], run["job"] / f"out-{name}"
    summaries = run["runs"].get(name, {})
    assert sorted(summaries) == [0, 1], f"torchrun ({run['returncode']}):\n{run['output'][-4000:]}"
    # only rank 0 wrote: the published student, nothing else (no work folder, no staging, no rank-1 files)
    assert not [p.name for p in job.iterdir() if p.name.startswith((f"out-{name}.", f".out-{name}"))]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "distill.json", "generation_config.json", "model.safetensors", "pruning.json",
        "tokenizer.json", "tokenizer_config.json"]
    ref_weights, ref = setup["single"][top_k]
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")

    s0, s1 = summaries[0], summaries[1]
    assert json.loads((out / "distill.json").read_text()) == s0
    assert (s0["processes"], s0["steps"], s0["tokens_seen"]) == (2, ref["steps"], ref["tokens_seen"])
    assert [p["step"] for p in s0["curve"]] == [p["step"] for p in ref["curve"]] == [0, 3, 6]
    for p, q in zip(s0["curve"], ref["curve"]):
        # float32 sums in another order: within 1e-5 in log-perplexity (the mean loss)
        assert math.log(p["perplexity"]) == pytest.approx(math.log(q["perplexity"]), abs=1e-5)
        if q["train_loss"] is not None:
            assert p["train_loss"] == pytest.approx(q["train_loss"], abs=1e-4)
            assert p["kl"] == pytest.approx(q["kl"], abs=1e-4)
    assert math.log(s0["teacher_perplexity"]) == pytest.approx(math.log(ref["teacher_perplexity"]), abs=1e-5)
    assert untimed(s1) == untimed(s0), "the processes disagree on the summary"
    # the teacher ran on the same global batches as in one process (the cache holds the same windows)
    assert (s0["teacher_windows_run"], s0["cached_windows"]) == (ref["teacher_windows_run"], ref["cached_windows"])
    if top_k:
        assert ref["teacher_windows_run"] < ref["steps"] * 4, "the runs never read the cache"


REENTER = r"""
import os
import torch
import torch.distributed as dist
from models.distributed import cluster

for i in range(4):  # as `pipeline run` does with [train] then [distill]: every stage enters cluster() anew
    with cluster() as cl:
        assert cl.parallel and dist.is_initialized()
        assert cl.sum(cl.rank + i) == [1.0 + 2 * i]
        assert cl.agree(float(cl.rank + 7)) == 7.0
        cl.barrier()
os.write(1, f"REENTERED {cl.rank}\n".encode())
"""


def test_cluster_can_be_entered_again(tmp_path):
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    (tmp_path / "reenter.py").write_text(REENTER)
    returncode, output = launch(tmp_path / "reenter.py", [], tmp_path / "log.txt")
    assert returncode == 0, output[-4000:]
    assert sorted(line for line in output.splitlines() if line.startswith("REENTERED")) == [
        "REENTERED 0", "REENTERED 1"]


# --- the helpers without torchrun: the identity ------------------------------------------------------------------

def test_one_process_helpers_are_the_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert environment() == (0, 1, 0, 1)
    with cluster() as cl:
        assert cl == Cluster() and cl.main and not cl.parallel and not dist.is_initialized()
        batch = torch.arange(12).reshape(6, 2)
        assert cl.shard(batch) is batch
        model = torch.nn.Linear(2, 2)
        assert cl.wrap(model) is model and cl.wrap(model, fsdp=True) is model
        assert cl.sum(1.5, 2.0) == [1.5, 2.0] and cl.mean(3.0) == 3.0 and cl.agree(0.25) == 0.25
        cl.check_batch(3)


def test_shard_takes_contiguous_equal_slices():
    batch = torch.arange(8)
    assert [Cluster(rank=r, world=4).shard(batch).tolist() for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(UserError, match="batch size 6 does not divide among 4 processes; give a multiple of 4"):
        Cluster(rank=0, world=4).check_batch(6)


def test_environment_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert environment() == (3, 4, 1, 2)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UserError, match="not integers"):
        environment()


class Collecting:
    """A cluster of `world` processes as process `rank` sees it, whose sums are kept instead of combined."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.parallel, self.sent = rank, world, True, None

    def sum(self, *values: float) -> list[float]:
        self.sent = values
        return list(values)


@pytest.mark.parametrize("world, windows", [(2, 7), (3, 7), (2, 2), (4, 9)])
def test_perplexity_of_processes_is_one_process_perplexity(world, windows):
    """Every window counts once over the processes, whatever their number, and every process makes the same
    forward calls with the same shapes (under FSDP each one gathers the parameters)."""
    from transformers import AutoModelForCausalLM

    from models.textdata import perplexity

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("llama", 64, 0, layers=1)).eval()
    data = torch.randint(0, 64, (windows, 9), generator=torch.Generator().manual_seed(1))
    calls: list[tuple] = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    single = perplexity(model, data, batch_size=2)
    shapes, total, count = [], 0.0, 0.0
    for rank in range(world):
        calls.clear()
        cl = Collecting(rank, world)
        perplexity(model, data, batch_size=2, cl=cl)
        shapes.append(list(calls))
        total, count = total + cl.sent[0], count + cl.sent[1]
    assert count == windows * 8
    assert math.exp(total / count) == pytest.approx(single, rel=1e-6)
    assert all(s == shapes[0] for s in shapes), shapes


def hammer_tokenizer(source: str, workdir: str, times: int, failures) -> None:
    from models.textdata import source_tokenizer

    for _ in range(times):
        try:
            source_tokenizer(source, Path(workdir), 0)
        except Exception:
            failures.value += 1


def test_processes_export_the_tokenizer_at_once(tmp_path):
    """Under torchrun every process writes the distillation's tokenizer into the same folder at the same moment:
    none may read a file another is still writing."""
    import multiprocessing

    (tmp_path / "checkpoint").mkdir()
    corpus_tokenizer(write_corpus(tmp_path / "corpus"), tmp_path / "checkpoint" / "tokenizer.json")
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    ctx = multiprocessing.get_context("fork")
    failures = ctx.Value("i", 0)
    procs = [ctx.Process(target=hammer_tokenizer, args=(str(tmp_path / "checkpoint"), str(tmp_path / "work"), 200,
                                                        failures)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert failures.value == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["tokenizer.json"]
