"""`pipeline package` takes the bundle's geometry from the model's contract metadata, never from node names: a
graph whose projection and embedding nodes are named and wired differently packages the same; a model written
by an older version is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from pipeline.manifest import RunDir, sha256
from runtimes.contract import INPUT_IDS, METADATA_KEY
from tests.pipeline.test_cli import invoke, one_line_error


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    invoke("export", "--model", llama_dir, "--graph", "traced", "--out", out)
    return out


def rewrite_variant(run_dir: Path, variant: str, change) -> None:
    """Change the variant's model file and record its new hash, as if a stage had written it so."""
    run = RunDir(run_dir)
    path = run.variant_path(variant)
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    data = run.load()
    files = data["artifacts"][variant]["files"]
    for rel in files:
        if rel.endswith("model.onnx"):
            files[rel] = sha256(run_dir / rel)
    run.manifest_path.write_text(json.dumps(data, indent=2))


def rename_projections_and_embedding(model: onnx.ModelProto) -> None:
    """q_proj nodes get other names, and input_ids reaches the embedding Gather through an Identity: the graph
    computes the same, but the old node-name guesses (layer 0's q_proj MatMul, a Gather of input_ids) fail."""
    for n in model.graph.node:
        n.name = n.name.replace("q_proj", "query")
        for i, name in enumerate(n.input):
            if name == INPUT_IDS:
                n.input[i] = "token_ids"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [INPUT_IDS], ["token_ids"], name="ids"))


def test_package_reads_geometry_from_the_contract_not_node_names(run_dir, tmp_path):
    rewrite_variant(run_dir, "fp32", rename_projections_and_embedding)
    invoke("package", run_dir, "--out", tmp_path / "b", "--variant", "fp32")
    genai = json.loads((tmp_path / "b" / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 64, 4, 2, 2)
    assert (genai["model"]["vocab_size"], genai["model"]["context_length"]) == (256, 512)


def test_package_refuses_a_model_from_an_older_version_with_one_line(run_dir, tmp_path):
    def drop_dimensions(model: onnx.ModelProto) -> None:
        entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
        entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items()
                                  if k not in ("num_heads", "hidden_size", "attention_windows")})

    rewrite_variant(run_dir, "fp32", drop_dimensions)
    one_line_error(invoke("package", run_dir, "--out", tmp_path / "b", "--variant", "fp32", ok=False),
                   "re-export", "num_heads")
    assert not (tmp_path / "b").exists()
