"""models/train.py under torchrun: 2 gloo processes on the CPU take the steps 1 process takes (DDP and FSDP2),
each on its own half of every batch, and stop together on rank 0's clock.

This file is also the worker torchrun starts (`python test_train_distributed.py CONFIG OUT`): it trains with
the config, records every training step's loss on this process's rows, and writes its summary and losses
to OUT.rank<N>.json and its own copy of the trained parameters to OUT.rank<N>.pt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.train import TrainConfig

TINY = TrainConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=384,
                   max_corpus_bytes=200_000, seq_len=32, batch_size=4, eval_windows=8, lr=1e-2, warmup_steps=2,
                   max_steps=4, max_seconds=600, sample_tokens=8, threads=1)
LAUNCH_TIMEOUT = 120  # seconds for one torchrun job; a hang (processes that disagree on a collective) ends here


def worker(config_json: str, out: str, fast_clock: float = 1.0) -> None:
    """One process's run. `fast_clock` > 1 makes rank 1's clock run that many times faster than rank 0's."""
    import models.train as train_module
    from models.distributed import environment

    rank = environment()[0]
    Path(f"{out}.rank{rank}.pid").write_text(str(os.getpid()))  # torchrun starts each in a session of its own
    losses: list[float] = []
    real_loss, real_gathered = train_module.lm_loss, train_module.gathered

    def recorded(model, batch):
        loss = real_loss(model, batch)
        if torch.is_grad_enabled():  # a training step, not evaluation
            losses.append(loss.item())
        return loss

    def gathered(model, cl):
        own = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
               for k, v in model.state_dict().items()}
        torch.save(own, f"{out}.rank{rank}.pt")
        return real_gathered(model, cl)

    train_module.lm_loss, train_module.gathered = recorded, gathered
    if rank == 1 and fast_clock != 1.0:
        t0 = time.monotonic()
        train_module.time = types.SimpleNamespace(monotonic=lambda: t0 + fast_clock * (time.monotonic() - t0),
                                                  sleep=time.sleep)
    summary = train_module.train(TrainConfig(**json.loads(config_json)), out, progress=False)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"summary": summary, "losses": losses}))


def launch(config: TrainConfig, out: Path, processes: int, fast_clock: float = 1.0) -> list[dict]:
    """Run the worker in `processes` processes (plain python for 1, torchrun otherwise); each rank's record."""
    args = [__file__, json.dumps(asdict(config)), str(out), str(fast_clock)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc, [Path(f"{out}.rank{r}.pid") for r in range(processes)])
        output, _ = proc.communicate()
        pytest.fail(f"{processes} processes did not finish in {LAUNCH_TIMEOUT}s (a hang?):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]


def stop(proc: subprocess.Popen, pid_files: list[Path]) -> None:
    """End a hung job: torchrun ends its workers on SIGTERM; a worker still there after that is killed by the
    process id it wrote (torchrun starts each in a session of its own, out of reach of torchrun's group)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    for f in pid_files:
        if f.is_file():
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def initial_weights(config: TrainConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    from models.checkpoint import hf_state_dict
    from models.decoder import Decoder

    torch.manual_seed(config.seed)  # as models.train.run seeds before building the model
    return hf_state_dict(Decoder(config.decoder_config(vocab_size)))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("one") / "checkpoint"
    (record,) = launch(TINY, out, 1)
    return record, load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_take_the_one_process_steps(one_process, tmp_path, fsdp):
    reference, ref_weights = one_process
    out = tmp_path / "checkpoint"
    ranks = launch(replace(TINY, fsdp=fsdp), out, 2)

    ref = reference["summary"]
    assert ref["steps"] == TINY.max_steps and ref["processes"] == 1
    for r in ranks:
        s = r["summary"]
        assert s["processes"] == 2 and s["steps"] == ref["steps"] and s["stopped_by"] == "max_steps"
        assert s["tokens_seen"] == ref["tokens_seen"] == TINY.max_steps * TINY.batch_size * TINY.seq_len
        assert s["sample"] == ranks[0]["summary"]["sample"] and s["val_loss"] == ranks[0]["summary"]["val_loss"]
        assert s["checkpoint"] == str(out.resolve())
    assert ranks[0]["summary"]["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    assert ranks[0]["summary"]["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)

    # each process computed the loss of its own half of every batch; their mean is the whole batch's
    halves = [r["losses"] for r in ranks]
    assert len(halves[0]) == len(halves[1]) == len(reference["losses"]) == TINY.max_steps
    assert all(abs(a - b) > 1e-4 for a, b in zip(*halves))
    assert [(a + b) / 2 for a, b in zip(*halves)] == pytest.approx(reference["losses"], rel=1e-5)

    # rank 0 alone wrote the checkpoint, and it holds the one-process weights
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("checkpoint.rank")) == ["checkpoint"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    moved = max((ref_weights[k] - v).abs().max().item()
                for k, v in initial_weights(TINY, ref["vocab_size"]).items())
    assert moved > 1e-2  # the steps changed the weights well beyond the tolerance below
    for name, w in weights.items():
        assert torch.allclose(w, ref_weights[name], atol=1e-5, rtol=0), name
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline"]["extra"]["train_config"]["fsdp"] is fsdp

    own = [torch.load(f"{out}.rank{r}.pt") for r in range(2)]
    if fsdp:  # each process held half of every parameter
        assert own[0]["embed_tokens.weight"].shape == ((ref["vocab_size"] + 1) // 2, TINY.hidden_size)
    else:  # DDP: every process holds the whole model, the same to the bit
        assert all(torch.equal(own[0][k], own[1][k]) for k in own[0])


def test_time_budget_stops_every_process_at_rank_zeros_step(tmp_path):
    """Rank 1's clock runs 3x fast: on its own it would stop long before rank 0 (and leave rank 0 waiting in the
    next all-reduce) and follow another learning-rate schedule. Rank 0's clock decides for both."""
    config = replace(TINY, max_steps=100_000, max_seconds=9.0)  # ~5 s of the 9 are kept for evaluation and saving
    started = time.monotonic()
    ranks = launch(config, tmp_path / "checkpoint", 2, fast_clock=3.0)
    assert time.monotonic() - started < LAUNCH_TIMEOUT
    steps = [r["summary"]["steps"] for r in ranks]
    assert [r["summary"]["stopped_by"] for r in ranks] == ["max_seconds"] * 2
    assert steps[0] == steps[1] and 2 < steps[0] < config.max_steps
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == steps[0]
    own = [torch.load(tmp_path / f"checkpoint.rank{r}.pt") for r in range(2)]
    assert all(torch.equal(own[0][k], own[1][k]) for k in own[0])  # the same learning rate at every step
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def torchrun_pipeline(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m pipeline ARGS`, as a person would type it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pipeline",
           *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def test_pipeline_train_under_torchrun_records_the_run_once(tmp_path):
    """Rank 0 alone stages, publishes and records; rank 1 trains beside it and leaves the run directory alone."""
    import argparse

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(argparse.__file__).parent
    for name in ("argparse", "typing", "inspect", "dataclasses", "pathlib", "subprocess", "tarfile", "ast",
                 "enum", "functools"):
        (corpus / f"{name}.py").write_bytes((stdlib / f"{name}.py").read_bytes())
    run = tmp_path / "run"
    proc = torchrun_pipeline("train", "--out", str(run), "--corpus", str(corpus), "--max-steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [".pipeline.lock", "checkpoint", "manifest.json"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["train"] and list(manifest["artifacts"]) == ["checkpoint"]
    results = manifest["stages"][0]["results"]
    assert results["processes"] == 2 and results["steps"] == 2
    assert json.loads((run / "checkpoint" / "config.json").read_text())["pipeline"]["extra"]["training"]["steps"] == 2


def test_batch_that_does_not_divide_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc = torchrun_pipeline("train", "--out", str(run), "--batch-size", "3", "--max-steps", "2")
    assert proc.returncode != 0
    assert "error: batch size 3 does not divide among 2 processes; give a multiple of 2\n" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr  # one line each
    assert not run.exists()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
