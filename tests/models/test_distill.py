"""models/distill.py: the loss on hand-computed examples, the data order, and short runs of a tiny random Llama
teacher into its pruned self (a few hundred milliseconds each), checked on what they publish, on the teacher's
top-k cache and on resuming.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import models.distill as distill_module
from models.distill import DistillConfig, distill, hidden_loss, index_batches, kd_loss, work_dir
from models.errors import UserError
from models.prune import PruneConfig, prune
from models.textdata import corpus_windows
from tests.models.tiny_teacher import corpus_tokenizer, family_config, save_teacher, write_corpus

torch.set_num_threads(1)

SEQ = 16
SMALL_BYTES = 300  # the small corpus's budget: a train split of 10 windows of 16 tokens, 3 held-out windows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, a small corpus (same words, tiny files), a teacher with their tokenizer and its pruned student."""
    root = tmp_path_factory.mktemp("distill")
    corpus = write_corpus(root / "corpus")
    small = write_corpus(root / "small", files=80, words=15)
    tok = corpus_tokenizer(corpus, root / "tokenizer.json")
    save_teacher(family_config("llama", tok.vocab_size, tok.eos_id, tied=True), tok, root / "teacher")
    report = prune(root / "teacher", root / "pruned", PruneConfig(
        mlp=0.5, heads=0.5, hidden=0.25, layers=1, multiple=8, seq_len=SEQ, calib_windows=8, eval_windows=8,
        corpus=str(corpus)))
    return {"root": root, "corpus": corpus, "small": small, "tok": tok, "teacher": str(root / "teacher"),
            "pruned": str(root / "pruned"), "prune_report": report}


def config(corpus, **kw) -> DistillConfig:
    """Exact and step-bounded: float32, no clock."""
    return DistillConfig(**{"corpus": str(corpus), "seq_len": SEQ, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                            "eval_every": 10, "checkpoint_every": 10, "eval_windows": 8, "bf16": False,
                            "max_seconds": None, **kw})


def small(setup, **kw) -> DistillConfig:
    return config(setup["small"], max_corpus_bytes=SMALL_BYTES, eval_windows=4, **kw)


def train_windows(setup, cfg: DistillConfig) -> torch.Tensor:
    return corpus_windows(setup["tok"], cfg.corpus, cfg.seq_len, cfg.max_corpus_bytes)["train"]


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def full_kl(teacher, student, data: torch.Tensor) -> float:
    """KL(teacher || student) per position, over the whole vocabulary."""
    t = F.log_softmax(teacher(input_ids=data[:, :-1]).logits, -1)
    s = F.log_softmax(student(input_ids=data[:, :-1]).logits, -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


# --- the loss ------------------------------------------------------------------------------------------------------

def test_kd_loss_full_is_zero_for_the_teacher_itself_and_the_kl_otherwise():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    for t in (1.0, 2.0):  # the teacher is given as its log-probabilities at the temperature
        assert kd_loss(logits, F.log_softmax(logits / t, -1), None, t).item() == pytest.approx(0.0, abs=1e-6)
    # by hand: teacher (1/2, 1/4, 1/4), student (1/4, 1/2, 1/4): KL = 1/2 ln 2 - 1/4 ln 2 = ln(2) / 4
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.5, 0.25])
    assert kd_loss(q.log()[None], p.log()[None], None, 1.0).item() == pytest.approx(math.log(2) / 4, rel=1e-6)
    # at T = 2 both become proportional to the square roots: (r, 1/2, 1/2) and (1/2, r, 1/2) over 1 + r, r = 1/sqrt 2,
    # so KL = (r - 1/2) / (1 + r) * ln(2 r), times T^2 = 4
    r = 2 ** -0.5
    want = 4 * (r - 0.5) / (1 + r) * math.log(2 * r)
    assert kd_loss(q.log()[None], F.log_softmax(p.log() / 2, -1)[None], None, 2.0).item() == pytest.approx(
        want, rel=1e-6)
    # a mean over positions: the hand pair at one position and a perfect match at the other halves it
    two_s, two_t = torch.stack([q.log(), p.log()]), torch.stack([p.log(), p.log()])
    assert kd_loss(two_s, two_t, None, 1.0).item() == pytest.approx(math.log(2) / 8, rel=1e-6)


def test_kd_loss_top_k_on_a_hand_example():
    """The teacher kept as its top 2 of (.4, .3, .2, .1): the KL is over (first, second, any other), (.4, .3, .3)
    against the uniform student's (.25, .25, .5)."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    values, index = torch.topk(p.log(), 2)
    student = torch.zeros(1, 4)
    want = 0.4 * math.log(0.4 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.3 * math.log(0.3 / 0.5)
    assert kd_loss(student, values[None], index[None], 1.0).item() == pytest.approx(want, rel=1e-6)
    # k = the whole vocabulary is the full form
    v, i = torch.topk(p.log(), 4)
    assert kd_loss(student, v[None], i[None], 1.0).item() == pytest.approx(
        kd_loss(student, p.log()[None], None, 1.0).item(), rel=1e-6)
    # a student that piles the tail's mass onto the top 2, (.55, .44, .005, .005), is not rewarded for it: the
    # teacher renormalised over its 2 against the student's whole vocabulary would score it 0.011, below the
    # teacher itself (-ln .7 = 0.357); over 3 outcomes it is .4 ln(.4/.55) + .3 ln(.3/.44) + .3 ln(.3/.01)
    piled = torch.tensor([0.55, 0.44, 0.005, 0.005]).log()[None]
    want = 0.4 * math.log(0.4 / 0.55) + 0.3 * math.log(0.3 / 0.44) + 0.3 * math.log(0.3 / 0.01)
    assert kd_loss(piled, values[None], index[None], 1.0).item() == pytest.approx(want, rel=1e-5)


def test_kd_loss_top_k_is_zero_for_the_teacher_itself():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0))
    other = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    for t in (1.0, 2.0):
        values, index = torch.topk(F.log_softmax(logits / t, -1), 8)
        assert kd_loss(logits, values, index, t).item() == pytest.approx(0.0, abs=1e-6)
        assert kd_loss(other, values, index, t).item() > 1e-2


def test_hidden_loss_is_relative_mse_on_the_mapped_layers_and_channels():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 3, 8, generator=g) for _ in range(5)]   # embeddings + 4 layers
    channels, layer_map = torch.tensor([0, 2, 5, 7]), [0, 2, 3]        # student: 3 layers of width 4
    student = [teacher[0][..., channels]] + [teacher[i + 1][..., channels].clone() for i in layer_map]
    assert hidden_loss(student, teacher, layer_map, channels).item() == 0.0
    student[2] = student[2] + 0.5  # student layer 1 (teacher layer 2) off by 0.5 everywhere: MSE 0.25
    want = 0.25 / teacher[3][..., channels].pow(2).mean().item() / 2  # mean over the 2 layers judged
    assert hidden_loss(student, teacher, layer_map, channels).item() == pytest.approx(want, rel=1e-5)
    student[3] = student[3] + 100.0  # the last layer is judged by the logits, not here
    assert hidden_loss(student, teacher, layer_map, channels).item() == pytest.approx(want, rel=1e-5)


def test_index_batches_resume_the_same_order():
    straight = list(itertools.islice(index_batches(10, 4, seed=3), 9))
    assert list(itertools.islice(index_batches(10, 4, seed=3, skip=5), 4)) == straight[5:9]
    for epoch in range(4):  # 2 batches an epoch (10 // 4, the remainder left out), never a window twice in one
        rows = straight[2 * epoch] + straight[2 * epoch + 1]
        assert len(set(rows)) == 8 and set(rows) <= set(range(10))
    assert straight[:2] != straight[2:4]  # reshuffled each epoch
    assert straight != list(itertools.islice(index_batches(10, 4, seed=4), 9))
    assert list(itertools.islice(index_batches(3, 4, seed=0), 2))[0].__len__() == 3  # a batch is at most n


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=-1), "top_k must be 0"), (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(max_seconds=0.0), "max_seconds must be positive"), (dict(temperature=0.0), "must be positive"),
])
def test_bad_config_refused(kw, message, tmp_path):
    with pytest.raises(UserError, match=message):
        distill("unused", "unused", tmp_path / "out", DistillConfig(**kw), progress=False)
    assert not list(tmp_path.iterdir())


# --- runs ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [0, 64])
def test_distilling_the_pruned_student_lowers_its_kl(top_k, setup, tmp_path):
    out = tmp_path / "student"
    cfg = config(setup["corpus"], top_k=top_k, max_steps=20)
    s = distill(setup["teacher"], setup["pruned"], out, cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "distill.json", "generation_config.json", "model.safetensors", "pruning.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert not work_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    record = json.loads((out / "distill.json").read_text())
    assert record == json.loads(json.dumps(s))
    assert [p["step"] for p in s["curve"]] == [0, 10, 20]
    assert [p["tokens"] for p in s["curve"]] == [0, 10 * 4 * SEQ, 20 * 4 * SEQ] and s["tokens_seen"] == 20 * 4 * SEQ
    assert (s["steps"], s["stopped_by"], s["processes"], s["bf16"]) == (20, "max_steps", 1, False)
    # 80 windows of the 3385 in the train split, all new: the teacher runs on each once (and caches its top k)
    assert (s["teacher_windows_run"], s["cached_windows"]) == (80, 80 if top_k else 0)
    # the curve starts at the pruned student and the teacher, as pruning measured them on the same held-out windows
    before = setup["prune_report"]
    assert s["start_perplexity"] == pytest.approx(before["after"]["perplexity"], rel=1e-6)
    assert s["teacher_perplexity"] == pytest.approx(before["before"]["perplexity"], rel=1e-6)
    assert s["final_perplexity"] == s["curve"][-1]["perplexity"] < s["start_perplexity"]
    assert set(s["recovered"]) == {"perplexity", "loss"}
    assert json.loads((out / "pruning.json").read_text())["kept"] == before["kept"]

    teacher, pruned, student = load(setup["teacher"]), load(setup["pruned"]), load(out)
    data = train_windows(setup, cfg)[:32]
    kl_before, kl_after = full_kl(teacher, pruned, data), full_kl(teacher, student, data)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    # the curve's train loss is that KL as the run saw it on its own windows (with top 64, over those and the
    # rest: a coarser KL, never more than the full one), falling
    assert s["curve"][2]["train_loss"] < s["curve"][1]["train_loss"]
    if top_k:
        assert 0 < s["curve"][1]["train_loss"] < kl_before
    else:
        assert s["curve"][1]["train_loss"] == pytest.approx(kl_before, rel=0.5)
    # the student's embeddings came from the teacher: frozen (the tied head with them)
    assert s["embeddings_frozen"] is True
    torch.testing.assert_close(student.model.embed_tokens.weight, pruned.model.embed_tokens.weight, atol=0, rtol=0)
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight)


def count_teacher_rows(monkeypatch) -> list[int]:
    """Rows the teacher's forward is called on, from a hook on the model load_models returns."""
    rows = [0]
    real = distill_module.load_models

    def load_models(*args):
        teacher, student, record = real(*args)
        teacher.register_forward_pre_hook(lambda m, a, kw: rows.__setitem__(0, rows[0] + kw["input_ids"].shape[0]),
                                          with_kwargs=True)
        return teacher, student, record

    monkeypatch.setattr(distill_module, "load_models", load_models)
    return rows


@pytest.mark.parametrize("batch_size, steps", [(2, 15), (4, 7)])
def test_top_k_cache_runs_the_teacher_once_per_window(batch_size, steps, setup, tmp_path, monkeypatch):
    """Over several epochs of a 10-window train split the teacher runs on a global batch only while one of its
    windows is not cached yet: with batches of 2 that is each window once (15 steps: 3 epochs); with batches of
    4 (8 windows an epoch, a different 2 left out each time) a batch with a new window runs whole again."""
    cfg = small(setup, batch_size=batch_size, max_steps=steps)
    n = len(train_windows(setup, cfg))
    assert n == 10
    filled, want = set(), 0
    for rows in itertools.islice(index_batches(n, batch_size, cfg.seed), steps):
        if not filled.issuperset(rows):
            want += len(rows)
        filled.update(rows)
    assert want < steps * batch_size  # the cache is used
    calls = count_teacher_rows(monkeypatch)
    s = distill(setup["teacher"], setup["pruned"], tmp_path / "s", cfg, progress=False)
    assert s["teacher_windows_run"] == want and s["cached_windows"] == len(filled)
    if batch_size == 2:
        assert want == n
    held_out = 3  # the teacher's perplexity at the start: its only other forward calls
    assert calls[0] == want + held_out


@pytest.mark.parametrize("top_k", [0, 64])
def test_resume_continues_exactly(top_k, setup, tmp_path, monkeypatch):
    """8 steps straight, and 4 steps, an interruption after the checkpoint, then a resume to 8: the same student.
    On 10 windows in batches of 2 the run passes an epoch, so the resumed half reads the cache the first half
    filled."""
    cfg = small(setup, batch_size=2, max_steps=8, checkpoint_every=4, eval_every=4, top_k=top_k)
    a = distill(setup["teacher"], setup["pruned"], tmp_path / "a", cfg, progress=False)

    real = distill_module.save_state

    def save_then_stop(path, *args):
        real(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distill(setup["teacher"], setup["pruned"], tmp_path / "b", cfg, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()
    state = torch.load(work_dir(tmp_path / "b") / "state.pt", weights_only=False)
    assert state["step"] == 4
    with pytest.raises(UserError, match="belongs to another distillation"):
        distill(setup["teacher"], setup["pruned"], tmp_path / "b", small(setup, batch_size=4, resume=True),
                progress=False)
    b = distill(setup["teacher"], setup["pruned"], tmp_path / "b", DistillConfig(**{**cfg.__dict__, "resume": True}),
                progress=False)

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0, msg=name)
    pruned = load_file(setup["pruned"] + "/model.safetensors")
    assert any(not torch.equal(wa[k], pruned[k]) for k in wa)  # it trained
    for key in ("steps", "tokens_seen", "teacher_windows_run", "cached_windows", "start_perplexity",
                "teacher_perplexity"):
        assert b[key] == a[key], key
    assert [p["step"] for p in b["curve"]] == [p["step"] for p in a["curve"]] == [0, 4, 8]
    for pa, pb in zip(a["curve"], b["curve"]):
        for key in ("perplexity", "train_loss", "kl"):  # train_loss: the mean of the last 20 steps, across the resume
            assert pb[key] == pytest.approx(pa[key], rel=1e-6), key
    assert not work_dir(tmp_path / "b").exists()


def test_resume_without_state_refused(setup, tmp_path):
    with pytest.raises(UserError, match="nothing to resume: .*state.pt does not exist"):
        distill(setup["teacher"], setup["pruned"], tmp_path / "s", small(setup, resume=True), progress=False)


def test_hidden_loss_run_needs_the_teacher_every_step(setup, tmp_path):
    s = distill(setup["teacher"], setup["pruned"], tmp_path / "s", small(setup, hidden_weight=1.0, max_steps=3),
                progress=False)
    assert s["steps"] == 3 and s["teacher_windows_run"] == 12 and s["cached_windows"] == 0
    assert all(math.isfinite(p["perplexity"]) for p in s["curve"])


def test_builtin_student_with_the_teachers_vocabulary(setup, tmp_path):
    s = distill(setup["teacher"], "builtin", tmp_path / "s", small(setup, max_steps=2), progress=False)
    assert s["steps"] == 2 and s["embeddings_frozen"] is False and "recovered" not in s
    assert not (tmp_path / "s" / "pruning.json").exists() and not work_dir(tmp_path / "s").exists()
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["vocab_size"] == setup["tok"].vocab_size and cfg["hidden_size"] == 128
    assert s["final_perplexity"] < 2 * setup["tok"].vocab_size  # a real, finite number, near chance


def test_student_with_another_vocabulary_refused(setup, tmp_path):
    tok = setup["tok"]
    save_teacher(family_config("llama", tok.vocab_size + 8, tok.eos_id), tok, tmp_path / "other")
    with pytest.raises(UserError, match=rf"the student's vocabulary \({tok.vocab_size + 8}\) is not the "
                                        rf"teacher's \({tok.vocab_size}\)"):
        distill(setup["teacher"], str(tmp_path / "other"), tmp_path / "s", small(setup, max_steps=1),
                progress=False)
    assert not (tmp_path / "s").exists()


def test_hidden_weight_without_pruning_record_refused(setup, tmp_path):
    shutil.copytree(setup["teacher"], tmp_path / "copy")  # a student of the teacher's own shape, not from prune
    with pytest.raises(UserError, match="--hidden-weight needs a student made by `pipeline prune`"):
        distill(setup["teacher"], str(tmp_path / "copy"), tmp_path / "s", small(setup, hidden_weight=1.0),
                progress=False)
    assert not (tmp_path / "s").exists()
