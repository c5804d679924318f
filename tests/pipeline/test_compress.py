"""`pipeline prune`, `pipeline distill` and their [prune]/[distill] tables in `pipeline run`, on tiny checkpoints:
what they write, what the manifest records, and every bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.manifest import RunDir
from tests.pipeline.conftest import make_hf_checkpoint
from tests.pipeline.test_cli import invoke, one_line_error

FAST = ["--seq-len", "32", "--calib-windows", "4", "--eval-windows", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Sixty small Python-like files: enough pieces that the train, calib and valid splits all get text."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        (d / f"mod_{i}.py").write_text("".join(
            f"def f_{i}_{j}(a, b):\n    return a * {j} + b - {i}\n\n" for j in range(40)))
    return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("teacher") / "ckpt", "llama", intermediate_size=128)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, teacher, corpus) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pruned") / "p"
    r = invoke("prune", teacher, "--out", out, "--mlp", "0.5", "--layers", "1", "--multiple", "8",
               "--corpus", corpus, *FAST, "--json")
    return out, json.loads(r.stdout)


def test_prune_writes_a_smaller_checkpoint_that_exports(pruned, tmp_path):
    out, r = pruned
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (64, 1, 64)
    assert "quantization_config" not in cfg
    weights = load_file(str(out / "model.safetensors"))
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    assert "model.layers.1.mlp.down_proj.weight" not in weights
    assert r["after"]["non_embedding"] < 0.5 * r["before"]["non_embedding"]
    assert r["non_embedding_ratio"] == pytest.approx(r["after"]["non_embedding"] / r["before"]["non_embedding"])
    assert json.loads((out / "pruning.json").read_text())["kept"]["layers"] == r["kept"]["layers"]
    run = tmp_path / "run"
    invoke("export", "--model", out, "--out", run)
    assert RunDir(run).results("export")["parameters"] == r["after"]["parameters"]


def test_prune_prints_before_and_after(teacher, corpus, tmp_path):
    r = invoke("prune", teacher, "--out", tmp_path / "p", "--heads", "0.5", "--corpus", corpus, *FAST)
    assert "held-out ppl" in r.stdout and "num_key_value_heads 2->1" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--mlp", "0.3"], "does not exist"),                           # the source is missing
    (["--mlp", "1.5"], "mlp is 1.5"),
    ([], "nothing to prune"),
    (["--layers", "2"], "would remove all 2 layers"),
])
def test_prune_bad_input_is_one_line(teacher, corpus, tmp_path, args, needle):
    source = tmp_path / "nowhere" if needle == "does not exist" else teacher
    r = invoke("prune", source, "--out", tmp_path / "p", "--corpus", corpus, *FAST, *args, ok=False)
    one_line_error(r, needle)
    assert not (tmp_path / "p").exists()


def test_prune_refuses_a_family_it_cannot_cut(tmp_path, corpus):
    gpt2 = make_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    one_line_error(invoke("prune", gpt2, "--out", tmp_path / "p", "--mlp", "0.5", "--corpus", corpus, *FAST,
                          ok=False), "pruning supports")


def test_distill_bad_input_is_one_line(teacher, pruned, tmp_path, corpus):
    one_line_error(invoke("distill", "--student", pruned[0], "--out", tmp_path / "s", ok=False), "give both models")
    other = make_hf_checkpoint(tmp_path / "other", "llama", vocab_size=200)
    one_line_error(invoke("distill", "--teacher", teacher, "--student", other, "--out", tmp_path / "s",
                          "--corpus", corpus, "--seq-len", "32", ok=False), "vocabulary")
    one_line_error(invoke("distill", "--teacher", teacher, "--student", pruned[0], "--out", tmp_path / "s",
                          "--corpus", corpus, "--seq-len", "32", "--resume", ok=False), "nothing to resume")
    one_line_error(invoke("distill", "--teacher", teacher, "--student", pruned[0], "--out", tmp_path / "s",
                          "--batch-size", "0", ok=False), "batch_size is 0")


def test_pipeline_run_prunes_distills_and_exports_the_student(teacher, corpus, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'''out = "{tmp_path / 'run'}"
[prune]
source = "{teacher}"
mlp = 0.5
multiple = 8
corpus = "{corpus}"
seq_len = 32
calib_windows = 4
eval_windows = 4
[distill]
corpus = "{corpus}"
seq_len = 32
max_steps = 3
eval_every = 1
eval_windows = 2
bf16 = false
lr = 0.001
[export]
''')
    r = invoke("run", config)
    assert "pruned" in r.stdout and "distilled 3 steps" in r.stdout
    data = RunDir(tmp_path / "run").load()
    arts = data["artifacts"]
    assert arts["pruned"]["parent"] is None and arts["student"]["parent"] == "pruned"
    assert arts["source"]["parent"] == "student"
    assert Path(arts["source"]["path"]) == (tmp_path / "run" / "student").resolve()
    assert [s["stage"] for s in data["stages"]] == ["prune", "distill", "export"]
    distilled = json.loads((tmp_path / "run" / "student" / "distill.json").read_text())
    assert distilled["teacher"] == str(teacher) and [p["step"] for p in distilled["curve"]] == [0, 1, 2, 3]
    # the student moved away from the pruned weights it started from
    before = load_file(str(tmp_path / "run" / "pruned" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[name], after[name])
    assert not (tmp_path / "run" / "student.distill").exists()
