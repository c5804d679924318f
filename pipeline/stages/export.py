"""Stage `export`: a checkpoint (ours, a Hugging Face directory or a .gguf file) -> variants/fp32/model.onnx.

The graph is validated against PyTorch before it becomes visible: until then it lives in the run's staging
directory, so an interrupted or failed export leaves the run as it was. An export of another model replaces the
run's source, and every variant made from the old one is removed with it (the same model's export is the same
bytes, and keeps them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import progress
from pipeline.manifest import RunDir
from pipeline.options import check_options, option


@dataclass(frozen=True)
class ExportConfig:
    model: str = option(str, dataclasses.MISSING, "Checkpoint directory (Hugging Face or ours) or .gguf file; "
                        "nothing is downloaded.")

    def __post_init__(self):
        check_options(self)


def export(run: RunDir, config: ExportConfig) -> dict:
    from exporters.export import export_onnx, validate_export
    from models.hf import export_tokenizer, load_model
    from runtimes.bench import model_bytes

    with progress.phases("export", ["load checkpoint", "trace to ONNX", "validate against PyTorch", "tokenizer",
                                    "publish"]) as phase, run.transaction() as tx:
        phase("load checkpoint")
        loaded = load_model(config.model)
        model_path = Path(config.model).resolve()
        own_checkpoint = (model_path == (run.root / "checkpoint").resolve()  # trained here: derived from it
                          and "checkpoint" in run.load()["artifacts"])
        if own_checkpoint:
            tx.read("checkpoint")
        phase("trace to ONNX")
        out = tx.variant_path("fp32")
        contract = export_onnx(loaded.model, out, validate=False)
        phase("validate against PyTorch")
        parity = validate_export(loaded.model, out, contract)
        phase("tokenizer")
        tokenizer = export_tokenizer(config.model, tx.staging)
        results = {"contract": {"num_layers": contract.num_layers, "num_kv_heads": contract.num_kv_heads,
                                "head_dim": contract.head_dim, "vocab_size": contract.vocab_size},
                   "parameters": loaded.model.num_parameters(),
                   "parity_max_abs_diff": {p.step: p.worst[1] for p in parity},
                   "size_bytes": model_bytes(out)}
        source = {**loaded.source, "kind": "source", "path": str(model_path),
                  "parent": "checkpoint" if own_checkpoint else None,
                  "bos_token_id": loaded.bos_token_id, "eos_token_id": loaded.eos_token_id}
        outputs = {"source": source, "fp32": {"kind": "onnx", "path": "variants/fp32/model.onnx", "parent": "source"}}
        if tokenizer is not None:
            outputs["tokenizer"] = {"kind": "tokenizer", "path": "tokenizer.json", "parent": "source"}
        tx.record("export", asdict(config), {"model": config.model}, outputs, results)
        phase("publish")
    return results
