"""`pipeline package`: the bundle, its manifest and archives, atomic replacement, and the bundle running where
no torch is installed: our runtime alone in a fresh virtual environment, and onnxruntime-genai."""

from __future__ import annotations

import dataclasses
from collections import Counter
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.errors import UserError
from pipeline.manifest import RunDir, sha256
from pipeline.stages import package as package_stage
from pipeline.loaders import genai_config
from pipeline.stages.package import PackageConfig, choose_variant, package
from runtimes.__main__ import main as runtime_main
from runtimes.bundle import verify_bundle
from runtimes.contract import Contract, past_key, present_value, read_contract
from runtimes.errors import RuntimeUserError
from runtimes.generate import greedy_tokens, load_tokenizer
from runtimes.session import open_session
from tests.pipeline.conftest import make_built_run, make_hf_checkpoint
from tests.pipeline.test_cli import invoke, manifest_results, one_line_error

REPO = Path(__file__).resolve().parents[2]
PROMPT = "def function_1(x, y):"
NEW_TOKENS = 24
EOS = 0  # make_hf_checkpoint's eos_token_id


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    invoke("export", "--model", llama_dir, "--graph", "traced", "--out", out)
    invoke("optimize", out)
    return out


@pytest.fixture(scope="module")
def bundles(run_dir, tmp_path_factory) -> dict[str, Path]:
    """One bundle per variant, packaged through the CLI ("default" is the one chosen with no --variant)."""
    root = tmp_path_factory.mktemp("bundles")
    out = {"default": root / "default"}
    invoke("package", run_dir, "--out", out["default"])
    for variant in ("fp32", "fused"):
        out[variant] = root / variant
        invoke("package", run_dir, "--out", out[variant], "--variant", variant)
    return out


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def prompt_ids(bundle: Path) -> list[int]:
    return load_tokenizer(bundle / "tokenizer.json").encode(PROMPT).ids


def main_env_tokens(run_dir: Path, variant: str) -> list[int]:
    """Greedy tokens of the run's own variant file through runtimes/ in this (full) environment."""
    ids = load_tokenizer(run_dir / "tokenizer.json").encode(PROMPT).ids
    return greedy_tokens(open_session(RunDir(run_dir).variant_path(variant)), ids, NEW_TOKENS)


def pipeline_text(run_dir: Path, variant: str) -> str:
    return invoke("generate", run_dir, "--variant", variant, "--prompt", PROMPT,
                  "--max-new-tokens", NEW_TOKENS).output


def runtime_text(capsys, model: Path) -> str:
    capsys.readouterr()
    assert runtime_main(["generate", str(model), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return capsys.readouterr().out


# ---- the bundle --------------------------------------------------------------------------------------------

def test_package_writes_a_verified_bundle_with_lineage_and_genai_config(bundles, run_dir):
    bundle = bundles["default"]
    manifest = verify_bundle(bundle)
    assert manifest["variant"] == "fused"  # check never ran: fused before fp32
    assert sorted(p.name for p in bundle.iterdir()) == [
        "config.json", "genai_config.json", "generation_config.json", "manifest.json", "model.onnx",
        "tokenizer.json", "tokenizer_config.json"]
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(bundle / name), "size": (bundle / name).stat().st_size}
    assert manifest["files"]["model.onnx"]["sha256"] == sha256(run_dir / "variants/fused/model.onnx")
    assert [step["artifact"] for step in manifest["lineage"]] == ["fused", "fp32", "source"]
    assert manifest["source"]["family"] == "llama" and manifest["source"]["eos_token_id"] == EOS
    assert manifest["check"] is None and manifest["bench"] is None
    assert json.loads((bundle / "generation_config.json").read_text())["eos_token_id"] == EOS
    memory, c = manifest["memory"], read_contract(onnx.load(str(bundle / "model.onnx")))
    assert memory["kv_bytes_per_token"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    whole = memory["at_context"][-1]
    assert whole["context"] == c.max_position_embeddings and whole["weights_bytes"] == (bundle / "model.onnx").stat().st_size
    assert whole["kv_cache_bytes"] == c.max_position_embeddings * memory["kv_bytes_per_token"]
    assert whole["total_bytes"] == sum(v for k, v in whole.items() if k.endswith("_bytes") and k != "total_bytes")
    assert RunDir.open(run_dir).load()["artifacts"]["source"]["intermediate_size"] == 128  # the activation estimate's MLP

    genai = json.loads((bundle / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["type"] == "llama" and decoder["filename"] == "model.onnx"
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 64, 4, 2, 2)
    assert (genai["model"]["vocab_size"], genai["model"]["context_length"]) == (256, 512)
    assert decoder["inputs"]["past_key_names"] % 1 == past_key(1)  # genai fills %d with the layer
    assert decoder["outputs"]["present_value_names"] % 0 == present_value(0)
    assert genai["search"]["past_present_share_buffer"] is True  # GroupQueryAttention shares past and present
    fp32 = json.loads((bundles["fp32"] / "genai_config.json").read_text())
    assert fp32["search"]["past_present_share_buffer"] is False  # Concat cannot write into a shared buffer

    recorded = RunDir(run_dir).results("package")
    assert recorded["manifest_sha256"] in {sha256(b / "manifest.json") for b in bundles.values()}


def test_the_runtime_generates_from_the_bundle_what_pipeline_generate_does(capsys, bundles, run_dir):
    assert runtime_text(capsys, bundles["default"]) == pipeline_text(run_dir, "fused")
    tokens = greedy_tokens(open_session(bundles["fused"]), prompt_ids(bundles["fused"]), NEW_TOKENS)
    assert tokens == main_env_tokens(run_dir, "fused") and len(set(tokens)) > 1


@pytest.mark.parametrize("recipe", ["w8a8", "w4"])
def test_a_quantized_variant_with_an_int8_embedding_table_packages_and_runs(capsys, run_dir, text_file, tmp_path,
                                                                             recipe):
    """The quantized recipes gather token rows from a blockwise-int8 table (GatherBlockQuantized): the bundle's
    geometry is read through it (this used to fail: no float Gather of input_ids)."""
    run = copy_run(run_dir, tmp_path / "run")
    invoke("quantize", run, "--recipe", recipe, "--calib-text", text_file, "--calib-windows", "2", "--window", "32",
           "--max-ppl-increase", "1.0", "--w4-max-ppl-increase", "1.0")
    ops = {n.op_type for n in onnx.load(str(RunDir(run).variant_path(recipe)), load_external_data=False).graph.node}
    assert "GatherBlockQuantized" in ops
    invoke("package", run, "--out", tmp_path / "b", "--variant", recipe)
    decoder = json.loads((tmp_path / "b" / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["hidden_size"] == read_hidden_size(RunDir(run).variant_path("fused"))
    assert runtime_text(capsys, tmp_path / "b") == pipeline_text(run, recipe)


def read_hidden_size(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    table = next(n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    return next(t.dims[1] for t in model.graph.initializer if t.name == table)


def test_package_json_output(run_dir, tmp_path):
    result = json.loads(invoke("package", run_dir, "--out", tmp_path / "b", "--json").output)
    assert result["variant"] == "fused" and result["archive"] is None and result["genai_type"] == "llama"
    assert result["size_bytes"] == sum(result["files"].values())
    assert result["manifest_sha256"] == sha256(tmp_path / "b" / "manifest.json")


def test_check_and_bench_figures_of_the_variant_go_into_the_manifest(run_dir, text_file, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    invoke("check", run, "--variant", "fp32", "--variant", "fused", "--text", text_file, "--windows", "1",
           "--window", "32", "--steps", "4")
    invoke("bench", run, "--variant", "fused", "--compare", "none", "--repeats", "1", "--new-tokens", "4",
           "--prompt-len", "4")
    invoke("package", run, "--out", tmp_path / "b")
    manifest = verify_bundle(tmp_path / "b")
    assert manifest["variant"] == "fused"  # both passed; no int8 variant in this run
    assert manifest["check"]["passed"] and manifest["check"]["variant"] == "fused"
    assert manifest["check"]["top1"] == 1.0 and manifest["check"]["config"]["steps"] == 4
    assert manifest["bench"]["decode_ms_p50"] > 0 and manifest["bench"]["new_tokens"] == 4


def stage(name: str, results: dict | None = None, outputs: tuple[str, ...] = ()) -> dict:
    return {"stage": name, "config": {}, "results": results or {}, "outputs": list(outputs)}


def checked(*rows: tuple[str, bool]) -> dict:
    return stage("check", {"variants": [{"variant": v, "failed": [] if ok else ["top1"]} for v, ok in rows]})


MADE = [stage("export", outputs=("fp32", "source")), stage("optimize", outputs=("fused",)),
        stage("quantize", outputs=("w8a8",)), stage("quantize", outputs=("static",))]
ALL = ["fp32", "fused", "w8a8", "static"]


@pytest.mark.parametrize("have, stages, expected", [
    (ALL, MADE, "fused"),                                                           # check never ran
    (["fp32"], MADE[:1], "fp32"),
    (ALL, [*MADE, checked(("fp32", True), ("fused", True), ("w8a8", True), ("static", True))], "w8a8"),
    (ALL, [*MADE, checked(("fp32", True), ("fused", True), ("w8a8", False), ("static", True))], "static"),
    (ALL, [*MADE, checked(("fp32", True), ("fused", True), ("w8a8", False), ("static", False))], "fused"),
    (ALL, [*MADE, checked(("fp32", True), ("fused", False))], "fp32"),
    # w8a8 was re-quantized after its check: that row is stale, and the fresh w8a8 has not passed anything
    (ALL, [*MADE, checked(("w8a8", True), ("fused", True)), stage("quantize", outputs=("w8a8",))], "fused"),
    (ALL, [*MADE, checked(("w8a8", True)), stage("quantize", outputs=("w8a8",))], "fused"),  # all stale
])
def test_default_variant_is_the_best_that_passed_check(have, stages, expected):
    assert choose_variant(Path("run"), have, stages, "") == expected


def test_no_default_when_every_checked_variant_failed():
    with pytest.raises(UserError, match="passed `pipeline check`"):
        choose_variant(Path("run"), ALL, [*MADE, checked(("fp32", False), ("fused", False))], "")


def test_unknown_variant_is_a_one_line_error(run_dir, tmp_path):
    one_line_error(invoke("package", run_dir, "--out", tmp_path / "b", "--variant", "w9", ok=False),
                   "no variant 'w9'", "fp32", "fused")
    assert not (tmp_path / "b").exists()


def test_gpt2_uses_genai_generic_decoder_type():
    """genai's "gpt2" type wants one combined past_%d tensor per layer; our graphs have separate key/value."""
    contract = Contract(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64, vocab_size=256,
                        max_position_embeddings=512, attention_windows=(None, None), family="gpt2")
    assert genai_config({}, contract)["model"]["type"] == "decoder"
    assert genai_config({}, dataclasses.replace(contract, family="qwen2"))["model"]["type"] == "qwen2"


# ---- atomic writes and archives ----------------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_failed_package_leaves_the_old_bundle_and_no_temp_files(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "b"
    invoke("package", run_dir, "--out", out, "--variant", "fp32")
    before = sha256(out / "manifest.json")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(package_stage, "write_zip", broken)
    with pytest.raises(OSError, match="disk full"):
        package(RunDir(run_dir), PackageConfig(out=str(out), variant="fused", archive="zip"))
    assert sha256(out / "manifest.json") == before and verify_bundle(out)["variant"] == "fp32"
    assert not (tmp_path / "b.zip").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()

    invoke("package", run_dir, "--out", out, "--variant", "fused")
    assert verify_bundle(out)["variant"] == "fused" and leftovers(tmp_path) == []


def test_only_an_earlier_bundle_is_replaced(run_dir, tmp_path):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    one_line_error(invoke("package", run_dir, "--out", precious, ok=False), "is not a bundle")
    one_line_error(invoke("package", run_dir, "--out", run_dir, ok=False), "is not a bundle")
    assert (precious / "notes.txt").read_text() == "keep me" and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_holds_the_bundle_folder_runs_and_is_reproducible(capsys, run_dir, tmp_path, kind):
    out = tmp_path / "bundle"
    result = json.loads(invoke("package", run_dir, "--out", out, "--archive", kind, "--json").output)
    archive = tmp_path / f"bundle.{kind}"
    assert result["archive"] == str(archive) and result["archive_bytes"] == archive.stat().st_size
    if kind == "tar.gz":
        with tarfile.open(archive) as tar:
            names = tar.getnames()
    else:
        with zipfile.ZipFile(archive) as zf:
            names = [n.rstrip("/") for n in zf.namelist()]
    assert names[0] == "bundle" and "bundle/model.onnx" in names and "bundle/manifest.json" in names
    first = sha256(archive)
    invoke("package", run_dir, "--out", out, "--archive", kind)
    assert sha256(archive) == first  # no timestamps or owners inside: same run, same bytes
    assert runtime_text(capsys, archive) == runtime_text(capsys, out)


def test_external_data_ships_beside_the_model_and_is_verified(capsys, run_dir, tmp_path):
    """Models over 2 GB keep weights in model.onnx.data; made here from the tiny fused graph."""
    run = RunDir(copy_run(run_dir, tmp_path / "run"))
    with run.transaction() as tx:
        onnx.save_model(onnx.load(str(run.variant_path("fused"))), str(tx.variant_path("fused")),
                        save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                        size_threshold=1024)
        tx.record("optimize", {"source": "fp32"}, {}, {"fused": {"kind": "onnx", "path": "variants/fused/model.onnx",
                                                                 "parent": "fp32"}}, {})
    out = tmp_path / "b"
    invoke("package", run.root, "--out", out, "--variant", "fused")
    assert "model.onnx.data" in verify_bundle(out)["files"]
    assert (out / "model.onnx").stat().st_size < 0.2 * (out / "model.onnx.data").stat().st_size
    assert runtime_text(capsys, out) == pipeline_text(run_dir, "fused")
    with open(out / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x7f")
    with pytest.raises(RuntimeUserError, match="model.onnx.data does not match its sha256"):
        verify_bundle(out)


def test_a_variant_changed_after_its_stage_is_not_shipped(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    with open(run / "variants/fp32/model.onnx", "ab") as f:
        f.write(b"\0")
    one_line_error(invoke("package", run, "--out", tmp_path / "b", "--variant", "fp32", ok=False),
                   "differs from what manifest.json recorded")
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


# ---- on a machine without torch ----------------------------------------------------------------------------

VENV_PROBE = """
import contextlib, io, json, sys
import runtimes
from runtimes.__main__ import main
from runtimes.generate import greedy_tokens, load_tokenizer
from runtimes.session import open_session

bundle, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = io.StringIO()
with contextlib.redirect_stdout(text):
    code = main(["generate", bundle, "--prompt", prompt, "--max-new-tokens", str(n)])
ids = load_tokenizer(bundle + "/tokenizer.json").encode(prompt).ids
print(json.dumps({"code": code, "text": text.getvalue(), "runtimes": runtimes.__file__,
                  "tokens": greedy_tokens(open_session(bundle), ids, n),
                  "imported": sorted(m for m in ("torch", "transformers", "onnx", "click") if m in sys.modules)}))
"""

GENAI_PROBE = """
import json, sys
import onnxruntime_genai as og

bundle, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = og.Model(bundle)
# a prompt, or its ids as a JSON list (fed as they are)
ids = json.loads(prompt) if prompt.startswith("[") else [int(i) for i in og.Tokenizer(model).encode(prompt)]
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + n, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens([ids])
tokens = []
while not generator.is_done():
    generator.generate_next_token()
    tokens.append(int(generator.get_next_tokens()[0]))
print(json.dumps({"ids": ids, "tokens": tokens}))
"""


def clean_env() -> dict[str, str]:
    """No PYTHONPATH or virtualenv of ours leaking into the venv's interpreter."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def venv_run(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=clean_env(),
                          timeout=timeout)


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = (p.stderr or p.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {p.returncode}"


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment (no system site packages) with the runtime distribution installed the way
    the README says, its dependencies pinned to this environment's versions so tokens compare exactly."""
    root = tmp_path_factory.mktemp("device")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=300)
    python = venv / "bin" / "python"
    pins = [f"{d}=={importlib.metadata.version(d)}" for d in ("onnxruntime", "numpy", "tokenizers")]
    deps = venv_run([python, "-m", "pip", "install", "-q", *pins], root)
    if deps.returncode != 0:
        pytest.skip(f"cannot install {', '.join(pins)} from the package index (offline?): {last_line(deps)}")
    source = root / "runtimes"  # a copy, so pip's in-tree build leaves nothing in the checkout
    shutil.copytree(REPO / "runtimes", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    install = venv_run([python, "-m", "pip", "install", "-q", source], root)
    assert install.returncode == 0, install.stderr
    return python


def test_the_runtime_alone_generates_the_pipelines_tokens_without_torch(runtime_venv, bundles, run_dir):
    venv_bin = runtime_venv.parent
    cwd = runtime_venv.parents[2]
    requires = venv_run([runtime_venv, "-I", "-c", "import importlib.metadata as m; "
                         "print('\\n'.join(m.requires('edge-pipeline-runtime')))"], cwd)
    assert sorted(r.split(">")[0] for r in requires.stdout.split("\n") if r and "extra" not in r) == [
        "numpy", "onnxruntime", "tokenizers"]
    absent = venv_run([runtime_venv, "-I", "-c", "import importlib.util as u; "
                       "print([m for m in ('torch', 'transformers', 'onnx') if u.find_spec(m)])"], cwd)
    assert absent.stdout.strip() == "[]", absent.stdout

    probe = venv_run([runtime_venv, "-I", "-c", VENV_PROBE, bundles["fused"], PROMPT, NEW_TOKENS], cwd)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["runtimes"].startswith(str(venv_bin.parent)), got["runtimes"]  # the installed copy, not the repo
    assert got["imported"] == []
    assert got["code"] == 0 and got["text"] == pipeline_text(run_dir, "fused")
    assert got["tokens"] == main_env_tokens(run_dir, "fused")

    script = venv_run([venv_bin / "edge-generate", bundles["default"], "--prompt", PROMPT,
                       "--max-new-tokens", NEW_TOKENS], cwd)
    assert script.returncode == 0 and script.stdout == pipeline_text(run_dir, "fused"), script.stderr
    verified = venv_run([venv_bin / "edge-runtime", "verify", bundles["default"]], cwd)
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stderr
    (bundles["fp32"] / "stray.onnx").write_bytes(b"")
    try:
        refused = venv_run([venv_bin / "edge-generate", bundles["fp32"], "--prompt", PROMPT], cwd)
    finally:
        (bundles["fp32"] / "stray.onnx").unlink()
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "stray.onnx" in refused.stderr


@pytest.fixture(scope="module")
def genai_python(runtime_venv) -> Path:
    install = venv_run([runtime_venv, "-m", "pip", "install", "-q", "onnxruntime-genai"], runtime_venv.parents[2])
    if install.returncode != 0:
        pytest.skip(f"onnxruntime-genai is not installable here: {last_line(install)}")
    return runtime_venv


def until_eos(tokens: list[int]) -> list[int]:
    """genai stops after emitting end-of-sequence (and returns it); the reference here never stops."""
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def genai_tokens(python: Path, bundle: Path) -> list[int]:
    probe = venv_run([python, "-I", "-c", GENAI_PROBE, bundle, PROMPT, NEW_TOKENS], python.parents[2])
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["ids"] == prompt_ids(bundle)  # genai's tokenizer reads our tokenizer(_config).json
    return got["tokens"]


@pytest.mark.parametrize("variant", ["fused", "fp32"])
def test_onnxruntime_genai_loads_the_bundle_and_agrees(genai_python, bundles, run_dir, variant):
    expected = until_eos(main_env_tokens(run_dir, variant))
    assert genai_tokens(genai_python, bundles[variant]) == expected and len(expected) > 1


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("qwen3", True), ("gemma3_text", True),
                                         ("gemma2", True), ("mistral", False), ("phi3", False)])
def test_onnxruntime_genai_loads_a_built_bundle_and_agrees(genai_python, tmp_path, family, tied):
    """The built graph (export's default): its logits_to_keep input has a default genai never feeds, and a tied
    table is stored once; genai's greedy tokens equal ours, whose prefill keeps only the last logits. Gemma 3 and
    Mistral run past their 8-token windows, and Phi-3 past LongRoPE's 8-token switch (the prompt and new tokens
    are longer)."""
    checkpoint = make_hf_checkpoint(tmp_path / "ckpt", family, tied=tied)
    run = tmp_path / "run"
    invoke("export", "--model", checkpoint, "--out", run)
    invoke("package", run, "--out", tmp_path / "b")
    expected = until_eos(main_env_tokens(run, "fused"))
    assert genai_tokens(genai_python, tmp_path / "b") == expected and len(expected) > 1
    context = json.loads((tmp_path / "b" / "genai_config.json").read_text())["model"]["context_length"]
    assert context == 512  # the checkpoint's, not its window


def test_onnxruntime_genai_runs_a_w8a8_with_its_first_token_pinned_and_agrees(genai_python, tmp_path, text_file):
    """A tokenizer that opens every text with its token 0 (as Gemma's does with <bos>): w8a8 takes that token's
    keys and values at position 0 as constants (Where ops before the attention), which genai runs as it runs any
    graph. The prompt ids are fed as they are: genai's own tokenizer does not put the BOS before a prompt."""
    run = tmp_path / "run"
    invoke("export", "--model", make_hf_checkpoint(tmp_path / "ckpt", "gemma3_text", tied=True, bos=True),
           "--out", run)
    invoke("quantize", run, "--recipe", "w8a8", "--calib-text", text_file, "--calib-windows", "4", "--window", "32",
           "--valid-windows", "0", "--online-hadamard", "32")
    assert manifest_results(run, "quantize")["pinned_first_token"]["token"] == 0
    ids = load_tokenizer(run / "tokenizer.json").encode(PROMPT).ids
    assert ids[0] == 0
    expected = until_eos(greedy_tokens(open_session(RunDir(run).variant_path("w8a8")), ids, NEW_TOKENS))
    probe = venv_run([genai_python, "-I", "-c", GENAI_PROBE, run / "variants" / "w8a8", json.dumps(ids), NEW_TOKENS],
                     genai_python.parents[2])
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["ids"] == ids and got["tokens"] == expected and len(expected) > 1


def test_onnxruntime_genai_runs_a_gpt2_bundle_as_a_generic_decoder(genai_python, tmp_path):
    checkpoint = make_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    run = tmp_path / "run"
    invoke("export", "--model", checkpoint, "--graph", "traced", "--out", run)
    invoke("optimize", run)
    invoke("package", run, "--out", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "genai_config.json").read_text())["model"]["type"] == "decoder"
    assert genai_tokens(genai_python, tmp_path / "b") == until_eos(main_env_tokens(run, "fused"))


# ---- every variant folder opens in Optimum and onnxruntime-genai as it is ---------------------------------

OPTIMUM_PROBE = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = ORTModelForCausalLM.from_pretrained(folder)
inputs = tokenizer(prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
print(json.dumps({"inputs": sorted(inputs), "ids": inputs["input_ids"][0].tolist(),
                  "tokens": out[0, inputs["input_ids"].shape[1]:].tolist()}))
"""


@pytest.fixture(scope="module")
def optimum_python(tmp_path_factory) -> Path:
    """Optimum (optimum-onnx) pins transformers < 4.58, older than this project's, so it gets a virtual
    environment of its own over this one's torch and onnxruntime (about 20 s to install)."""
    root = tmp_path_factory.mktemp("optimum")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                   env=clean_env(), timeout=300)
    python = venv / "bin" / "python"
    install = venv_run([python, "-m", "pip", "install", "-q", "optimum-onnx", "transformers<4.58"], root)
    if install.returncode != 0:
        pytest.skip(f"optimum-onnx is not installable here: {last_line(install)}")
    return python


def optimum_tokens(python: Path, folder: Path) -> list[int]:
    probe = venv_run([python, "-c", OPTIMUM_PROBE, folder, PROMPT, NEW_TOKENS], python.parents[2])
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["inputs"] == ["attention_mask", "input_ids"]  # no token_type_ids: tokenizer_config names the inputs
    assert got["ids"] == load_tokenizer(folder / "tokenizer.json").encode(PROMPT).ids
    return got["tokens"]


@pytest.fixture(scope="module")
def built_run(tmp_path_factory, text_file) -> Path:
    """A tied Llama exported by the builder (its default), quantized to w8a8 and w4."""
    return make_built_run(tmp_path_factory.mktemp("built"), text_file)


LOADER_FILES = ["config.json", "generation_config.json", "genai_config.json", "tokenizer.json",
                "tokenizer_config.json"]


def test_every_variant_folder_carries_what_other_tools_load_and_the_manifest_records_it(built_run, run_dir):
    for run, variants in ((built_run, ("fused", "w8a8", "w4")), (run_dir, ("fp32", "fused"))):
        arts = json.loads((run / "manifest.json").read_text())["artifacts"]
        source_config = Path(arts["source"]["path"]) / "config.json"
        assert (run / "config.json").read_bytes() == source_config.read_bytes()
        for variant in variants:
            folder = run / "variants" / variant
            recorded = sorted(Path(rel).name for rel in arts[variant]["files"])
            assert recorded == sorted([*LOADER_FILES, "model.onnx", *(
                ["model.onnx.data"] if (folder / "model.onnx.data").exists() else [])])
            assert (folder / "config.json").read_bytes() == source_config.read_bytes()
            assert (folder / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
            tok = json.loads((folder / "tokenizer_config.json").read_text())
            assert tok["model_input_names"] == ["input_ids", "attention_mask"]
            genai = json.loads((folder / "genai_config.json").read_text())["model"]
            assert genai["decoder"]["num_hidden_layers"] == 2 and genai["eos_token_id"] == EOS
            assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == EOS


def test_a_variant_folders_edited_config_is_refused_like_its_model(built_run, tmp_path):
    run = copy_run(built_run, tmp_path / "run")
    config = run / "variants/w4/config.json"
    config.write_text(config.read_text().replace('"vocab_size": 256', '"vocab_size": 257'))
    with pytest.raises(UserError, match="config.json differs from what manifest.json recorded"):
        RunDir(run).verified("w4")
    one_line_error(invoke("package", run, "--variant", "w4", "--out", tmp_path / "b", ok=False), "config.json")


def test_a_variant_file_in_a_run_is_not_taken_for_a_bundle_without_its_manifest(built_run, capsys):
    assert runtime_text(capsys, built_run / "variants/w8a8/model.onnx") == pipeline_text(built_run, "w8a8")


def test_a_w4_variants_shared_head_on_the_native_kernel_keeps_its_logits_and_ships(built_run, tmp_path,
                                                                                     native_kernels):
    """`optimize --native-int8 --source w4`: the tied head, whose 8-bit blocks the embedding gathers, runs on
    BlockInt8MatMul reading the same stored blocks, and the 4-bit MatMuls on it as their blocks are stored;
    judged against the float model (the kernel rounds otherwise than MatMulNBits), same logits to rounding, same
    check figures, and packaged it needs the kernel on the device and gives w4's greedy tokens."""
    run = copy_run(built_run, tmp_path / "run")
    res = json.loads(invoke("optimize", run, "--native-int8", "--source", "w4", "--json").output)
    four = {name: moved for name, moved in res["packed_matmuls"].items() if moved["rows_at_bits"].keys() == {"4"}}
    assert res["shared_head_matmuls"] == 1 and res["static_matmuls"] == 0 and four
    assert res["matmuls"] == 1 + len(four) and res["drift_from_float"]["kept"]
    assert res["parity_max_abs_logit_diff"]["prefill+decode"] <= 1e-4
    assert all(m["bytes"][0] == m["bytes"][1] for m in four.values())  # the same bytes, not rewritten
    model = onnx.load(str(run / "variants/w4-native/model.onnx"), load_external_data=False)
    heads = [n for n in model.graph.node
             if n.op_type == "BlockInt8MatMul" and not any(a.name == "bits" for a in n.attribute)]
    assert len(heads) == 1 and not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert any(n.op_type == "Gather" and n.input[0] == heads[0].input[1] for n in model.graph.node)
    r = invoke("check", run, "--variant", "w4", "--variant", "w4-native", "--text", REPO / "README.md", "--json",
               "--steps", "4", "--window", "64", ok=False)
    rows = {row["variant"]: row for row in json.loads(r.output)["variants"]}
    for key in ("top1", "kl", "ppl"):
        assert rows["w4-native"][key] == pytest.approx(rows["w4"][key], rel=1e-3, abs=1e-5), key
    bundle = tmp_path / "bundle"
    invoke("package", run, "--out", bundle, "--variant", "w4-native")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert any("native kernel" in need for need in manifest["device_needs"])
    ids = list(range(3, 11))
    assert greedy_tokens(open_session(bundle), ids, 6) == greedy_tokens(open_session(run / "variants/w4"), ids, 6)


def test_w8a8_native_gathers_the_tied_table_from_the_packed_head(built_run, tmp_path, native_kernels):
    """The tied table that w8a8's embedding reads from the int8 head is, in w8a8-native, read from the kernel's
    packed copy (one GatherND), so the original int8 weight goes: the table is in the file and in memory once.
    optimize checks the logits against w8a8."""
    from runtimes.providers import int8_gemm_saturates

    if int8_gemm_saturates():  # quantize writes 7-bit codes here, too coarse to share the table
        pytest.skip("a w8a8 that shares the tied table has full 8-bit weights, which quantize writes only where "
                    "onnxruntime's int8 GEMM does not saturate on them (not x86 without VNNI)")
    run = copy_run(built_run, tmp_path / "run")
    res = json.loads(invoke("optimize", run, "--native-int8", "--json").output)
    assert res["parity_max_abs_logit_diff"]["prefill+decode"] <= 1e-4
    source = onnx.load(str(run / "variants/w8a8/model.onnx"), load_external_data=False)
    columns = next(n for n in source.graph.node if n.name.endswith("/shared/GatherColumns"))
    model = onnx.load(str(run / "variants/w8a8-native/model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    gather = next(n for n in model.graph.node if n.op_type == "GatherND")
    head = next(n for n in model.graph.node if n.op_type == "StaticInt8MatMul" and "logits" in n.output)
    assert gather.input[0] == head.input[1] and columns.name not in nodes
    assert columns.input[0] not in {t.name for t in model.graph.initializer}  # the unpacked copy is gone


def test_w8a8_native_moves_a_static_head_beside_its_own_table_onto_the_tables_blocks(built_run, text_file, tmp_path,
                                                                                     native_kernels, monkeypatch):
    """A w8a8 whose static head did not share the tied table (the share refused, as on Gemma 3) keeps int8
    blocks of its own for the embedding: the table twice. w8a8-native reads the head from those blocks on the
    block kernel, the table once, checked against the portable graph to rounding and against the float model by
    its drift; --static-head keeps the head static (and the table twice)."""
    from exporters.quantization import embedding

    run = copy_run(built_run, tmp_path / "run")
    monkeypatch.setattr(embedding, "SHARE_ERROR_RATIO", 0.0)  # no static head shares the table
    invoke("quantize", run, "--recipe", "w8a8", "--calib-text", text_file, "--calib-windows", "2", "--window",
           "32", "--valid-windows", "0")
    w8a8 = onnx.load(str(run / "variants/w8a8/model.onnx"), load_external_data=False)
    assert Counter(n.op_type for n in w8a8.graph.node)["GatherBlockQuantized"] == 1
    res = json.loads(invoke("optimize", run, "--native-int8", "--json").output)
    assert res["head_on_table_blocks"]["fit_relative_residual"] < 0.05
    assert res["parity_max_abs_logit_diff"]["prefill+decode"] <= 1e-4
    drift = res["drift_from_float"]
    assert drift["reference"] == "fused" and drift["kept"] and drift["target_kl"] <= 2 * drift["source_kl"] + 1e-3
    model = onnx.load(str(run / "variants/w8a8-native/model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["BlockInt8MatMul"] == 1 and ops["GatherBlockQuantized"] == 0 and ops["StaticInt8MatMul"] > 0
    vk = read_contract(model).vocab_size * read_contract(model).hidden_size
    names = {t.name: t for t in model.graph.initializer}
    assert {"model.lm_head.weight_quantized", "model.embed_tokens.weight_Q8"} <= {t.name for t in w8a8.graph.initializer}
    assert not {"model.lm_head.weight_quantized", "model.embed_tokens.weight_Q8"} & set(names)
    blocks = [t for t in names.values() if t.name.endswith("/table_blocks/blocks")]
    assert len(blocks) == 1 and int(np.prod(blocks[0].dims)) == vk  # the table, once
    res = json.loads(invoke("optimize", run, "--native-int8", "--static-head", "--json").output)
    assert "head_on_table_blocks" not in res and res["shared_head_matmuls"] == 0


def test_a_bundle_sized_for_a_context_states_it_and_refuses_past_it(built_run, tmp_path):
    """`package --context 40`: the graph's rotary tables and contract, genai_config's context_length and the
    manifest's memory at that context; the same tokens as the variant within it, one line past it; the run's own
    variant untouched."""
    before = sha256(built_run / "variants/w4/model.onnx")
    bundle = tmp_path / "bundle"
    invoke("package", built_run, "--out", bundle, "--variant", "w4", "--context", "40")
    assert sha256(built_run / "variants/w4/model.onnx") == before
    contract = read_contract(onnx.load(str(bundle / "model.onnx"), load_external_data=False))
    assert contract.max_position_embeddings == 40
    assert json.loads((bundle / "genai_config.json").read_text())["model"]["context_length"] == 40
    assert json.loads((bundle / "generation_config.json").read_text())["max_length"] == 40
    memory = verify_bundle(bundle)["memory"]
    assert [m["context"] for m in memory["at_context"]] == [40]
    assert memory["at_context"][0]["rotary_tables_bytes"] == 2 * 40 * contract.head_dim // 2 * 4
    ids = list(range(3, 11))
    assert greedy_tokens(open_session(bundle), ids, 30) == greedy_tokens(open_session(built_run / "variants/w4"),
                                                                          ids, 30)
    with pytest.raises(RuntimeUserError, match="exceeds the model's context of 40"):
        greedy_tokens(open_session(bundle), ids, 33)
    one_line_error(invoke("package", built_run, "--out", tmp_path / "b2", "--variant", "w4", "--context", "100000",
                          ok=False), "context 100000: give a number of positions from 1 to the model's 512")
    assert not (tmp_path / "b2").exists()


@pytest.mark.parametrize("variant", ["fused", "w8a8", "w4"])
def test_optimum_loads_a_built_variant_folder_and_agrees(optimum_python, built_run, variant):
    expected = until_eos(main_env_tokens(built_run, variant))
    assert optimum_tokens(optimum_python, built_run / "variants" / variant) == expected and len(expected) > 1


def test_optimum_loads_traced_variant_folders_and_a_bundle_and_agrees(optimum_python, run_dir, bundles):
    for variant in ("fp32", "fused"):
        expected = until_eos(main_env_tokens(run_dir, variant))
        assert optimum_tokens(optimum_python, run_dir / "variants" / variant) == expected
    assert optimum_tokens(optimum_python, bundles["fused"]) == until_eos(main_env_tokens(run_dir, "fused"))


@pytest.mark.parametrize("family, shape", [("qwen3", {"head_dim": 16}), ("gemma3_text", {}), ("mistral", {})])
def test_optimum_loads_the_new_families_and_agrees(optimum_python, tmp_path, family, shape):
    """Gemma 3 (heads wider than hidden / heads) and Mistral generate past their 8-token windows. Qwen3 only
    with heads of hidden / heads (Qwen3-1.7B's shape): Optimum sizes a Qwen3's empty first cache by that ratio,
    not by head_dim, so a Qwen3-0.6B-shaped graph (1024 / 16 = 64, heads of 128) fails inside Optimum."""
    run = tmp_path / "run"
    invoke("export", "--model", make_hf_checkpoint(tmp_path / "ckpt", family, tied=True, **shape), "--out", run)
    expected = until_eos(main_env_tokens(run, "fused"))
    assert optimum_tokens(optimum_python, run / "variants/fused") == expected and len(expected) > 1


@pytest.mark.parametrize("variant", ["w8a8", "w4"])
def test_onnxruntime_genai_loads_a_variant_folder_in_place_and_agrees(genai_python, built_run, variant):
    expected = until_eos(main_env_tokens(built_run, variant))
    assert genai_tokens(genai_python, built_run / "variants" / variant) == expected and len(expected) > 1


def test_the_pipelines_own_install_brings_the_device_commands(bundles, run_dir):
    """`pip install -e .` (the README's install) puts edge-generate and edge-runtime beside `pipeline`."""
    scripts = {ep.name: ep.value for ep in importlib.metadata.distribution("edge-pipeline").entry_points
               if ep.group == "console_scripts"}
    assert scripts["edge-generate"] == "runtimes.__main__:generate_main"
    assert scripts["edge-runtime"] == "runtimes.__main__:main"
    script = Path(sys.executable).parent / "edge-generate"
    if not script.exists():
        pytest.skip(f"{script} is not installed: reinstall the checkout with pip install -e .")
    out = subprocess.run([str(script), str(bundles["fused"]), "--prompt", PROMPT, "--max-new-tokens",
                          str(NEW_TOKENS)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == pipeline_text(run_dir, "fused"), out.stderr


@pytest.mark.parametrize("target, bits, expected", [
    ("any", {"w8a8": "8", "static": "7"}, "static"),        # 8-bit static weights overflow x86 without VNNI
    ("any", {"w8a8": "8", "static": "8"}, "fused"),
    ("linux-aarch64", {"w8a8": "8", "static": "8"}, "w8a8"),  # ARM's int8 kernels widen first: exact
    ("linux-x86_64", {"w8a8": "8", "static": "8"}, "w8a8"),   # runs on VNNI CPUs, which the manifest says
    (None, {"w8a8": "8", "static": "8"}, "w8a8"),
])
def test_default_variant_runs_on_the_target(monkeypatch, target, bits, expected):
    monkeypatch.setattr(package_stage, "variant_metadata",
                        lambda root, v: {"pipeline.int8_weight_bits": bits[v]} if v in bits else {})
    stages = [*MADE, checked(("fp32", True), ("fused", True), ("w8a8", True), ("static", True))]
    assert choose_variant(Path("run"), ALL, stages, "", target) == expected


def test_eight_bit_weights_all_on_the_native_kernel_need_only_the_kernel():
    """8-bit static weights that onnxruntime's int8 GEMM never runs (`optimize --native-int8` took every one)
    need no VNNI: the kernel is exact for them on every CPU it builds for."""
    bits = {"pipeline.int8_weight_bits": "8"}
    needs, why = package_stage.device_needs("w8a8-native", {**bits, "pipeline.int8_gemm": "native"}, "linux-x86_64")
    assert needs == [package_stage.NATIVE_NEEDS] and why is None
    needs, _ = package_stage.device_needs("w8a8-native", bits, "linux-x86_64")
    assert needs == [package_stage.NATIVE_NEEDS, package_stage.EIGHT_BIT_NEEDS]


def test_the_bundle_says_what_its_device_needs_and_refuses_what_the_target_cannot_run(built_run, text_file,
                                                                                      tmp_path):
    # full 8-bit weights whatever this machine is (quantize picks 7 bits by itself where its int8 GEMM saturates)
    run = tmp_path / "run"
    shutil.copytree(built_run, run)
    invoke("quantize", run, "--recipe", "w8a8", "--no-reduce-range", "--calib-text", text_file, "--calib-windows",
           "2", "--window", "32", "--valid-windows", "0")
    one_line_error(invoke("package", run, "--out", tmp_path / "any", "--variant", "w8a8", "--target", "any",
                          ok=False), "--target any", "8 bits")
    assert not (tmp_path / "any").exists()
    invoke("package", run, "--out", tmp_path / "x86", "--variant", "w8a8", "--target", "linux-x86_64")
    x86 = json.loads((tmp_path / "x86/manifest.json").read_text())
    assert x86["target"] == "linux-x86_64" and any("VNNI" in n for n in x86["device_needs"])
    invoke("package", run, "--out", tmp_path / "arm", "--variant", "w8a8", "--target", "linux-aarch64")
    assert json.loads((tmp_path / "arm/manifest.json").read_text())["device_needs"] == []
    invoke("package", run, "--out", tmp_path / "w4", "--variant", "w4", "--target", "any")
    assert json.loads((tmp_path / "w4/manifest.json").read_text())["device_needs"] == []
    # 7-bit weights run on any x86 CPU: nothing to refuse
    invoke("quantize", run, "--recipe", "w8a8", "--reduce-range", "--calib-text", text_file, "--calib-windows",
           "2", "--window", "32", "--valid-windows", "0")
    invoke("package", run, "--out", tmp_path / "any7", "--variant", "w8a8", "--target", "any")
    assert json.loads((tmp_path / "any7/manifest.json").read_text())["device_needs"] == []


def test_a_native_variant_needs_the_kernel_everywhere_and_is_refused_for_any_cpu():
    from pipeline.stages.package import device_needs

    for target in ("linux-x86_64", "linux-aarch64", None):
        needs, refused = device_needs("w8a8-native", {"pipeline.int8_weight_bits": "8"}, target)
        assert refused is None and "native kernel built on the device" in needs[0]
    assert "native kernel" in device_needs("w8a8-native", {}, "any")[1]
    assert device_needs("w4", {}, "any") == ([], None)
