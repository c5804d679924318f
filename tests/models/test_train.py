"""models/train.py on a tiny model: it learns, it saves a checkpoint transformers reads with the same logits,
it respects its time budget, and Ctrl-C leaves no checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import models.train as train_module
from models.checkpoint import LLAMA_LAYER_MODULES
from models.decoder import Decoder, DecoderConfig
from models.errors import UserError
from models.train import TrainConfig, train

TINY = TrainConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=384,
                   max_corpus_bytes=200_000, seq_len=32, batch_size=8, eval_windows=8, lr=1e-2, warmup_steps=5,
                   max_steps=30, max_seconds=120, sample_tokens=8, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("train") / "checkpoint"
    return train(TINY, out, progress=False), out


def decoder_from_checkpoint(path: Path) -> Decoder:
    """Our Decoder with the checkpoint's weights: HF names mapped back through checkpoint.py's table."""
    cfg = json.loads((path / "config.json").read_text())
    model = Decoder(DecoderConfig.from_dict(cfg["pipeline"]["decoder"]))
    hf = load_file(str(path / "model.safetensors"))
    ours = {"embed_tokens.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(model.config.num_layers):
        for hf_name, our_name in LLAMA_LAYER_MODULES.items():
            ours[f"layers.{i}.{our_name}.weight"] = hf[f"model.layers.{i}.{hf_name}.weight"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return model.eval()


def test_tiny_run_learns(trained):
    result, _ = trained
    assert result["steps"] == TINY.max_steps and result["stopped_by"] == "max_steps"
    assert result["train_loss"] < result["initial_loss"] - 0.5
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_ppl"] < result["vocab_size"] and result["unigram_ppl"] < result["vocab_size"]
    assert result["tokens_seen"] == TINY.max_steps * TINY.batch_size * TINY.seq_len
    assert result["sample"].lstrip().startswith("def")
    assert result["params"] > 0 and result["seconds"] > 0


def test_checkpoint_loads_in_transformers_with_our_logits(trained):
    result, path = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file()
    config = json.loads((path / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == config["pipeline"]["extra"]["eos_token_id"]
    assert config["pipeline"]["extra"]["training"]["steps"] == result["steps"]

    ids = torch.randint(0, result["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ours, _ = decoder_from_checkpoint(path)(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_checkpoint_tokenizer_loads_in_transformers(trained):
    result, path = trained
    tok = AutoTokenizer.from_pretrained(path)
    text = "def f(x):\n    return x  # \u00e9\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: exact round trip, and no BOS/EOS slipped in
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eos
    assert len(tok) == result["vocab_size"]


def test_same_seed_same_model(trained, tmp_path):
    result, path = trained
    again = train(TINY, tmp_path / "again", progress=False)
    assert again["val_loss"] == result["val_loss"] and again["sample"] == result["sample"]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_same_seed_same_model_however_fast_the_clock_runs(tmp_path, monkeypatch):
    """A time budget far from binding must not touch the schedule: two clocks, one 50x faster, same model."""
    import itertools
    import types

    paths = []
    for tick in (0.001, 0.05):  # seconds per clock read: a few seconds in all, against max_seconds=120
        clock = itertools.count(0.0, tick)
        monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock),
                                                                        sleep=lambda s: None))
        train(TINY, tmp_path / str(tick), progress=False)
        paths.append(tmp_path / str(tick) / "model.safetensors")
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_time_budget_stops_cleanly(tmp_path):
    config = replace(TINY, max_steps=100_000, max_seconds=7.0)
    result = train(config, tmp_path / "out", progress=False)
    assert result["stopped_by"] == "max_seconds"
    assert 0 < result["steps"] < config.max_steps
    assert result["seconds"] < config.max_seconds + 5
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_ctrl_c_leaves_no_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = train_module.lm_loss, []

    def interrupted(model, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(train_module, "lm_loss", interrupted)
    scratch = set(Path(tempfile.gettempdir()).glob("pipeline-train-*"))
    with pytest.raises(KeyboardInterrupt):
        train(TINY, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, not even a temporary one beside it
    assert set(Path(tempfile.gettempdir()).glob("pipeline-train-*")) == scratch  # tokenizer scratch removed


def test_bad_corpus_path_is_a_user_error(tmp_path):
    config = replace(TINY, corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(UserError):
        train(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PIPELINE_SLOW_TESTS"),
                    reason="the default run takes ~4 minutes; set PIPELINE_SLOW_TESTS=1 to run it")
def test_default_config_learns_python_within_five_minutes(tmp_path):
    result = train(TrainConfig(), tmp_path / "checkpoint", progress=False)
    assert result["seconds"] < 300
    assert result["val_ppl"] < result["unigram_ppl"] / 4
    assert result["sample"].lstrip().startswith("def") and "(" in result["sample"]


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="samples /proc/stat")
def test_busy_cores_sees_a_spinning_process_at_once():
    """A process that has just started spinning counts as busy now (a load average would lag by a minute)."""
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = train_module.busy_cores(interval=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.7 <= busy <= (os.cpu_count() or 1) + 0.01
    assert 1 <= train_module.idle_cores() <= len(os.sched_getaffinity(0))
