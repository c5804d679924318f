"""Stage `export`: a checkpoint (ours, a Hugging Face directory or a .gguf file) -> an ONNX variant.

Two routes (`--graph`):
- built (the default for the Llama-shaped families: llama, mistral, qwen2): exporters/builder.py writes the fused
  graph straight from the config and the weights, streamed tensor by tensor -> variants/fused. `pipeline
  optimize` then has nothing to fuse (it only converts to float16 with --fp16).
- traced: the decoder is loaded in PyTorch and captured by torch.export -> variants/fp32 (unfused; `pipeline
  optimize` fuses it).
  It is the route for GPT-2, and the independent oracle the builder is tested against.
`auto` picks built where the builder emits the family, else traced.

The graph is validated against PyTorch before it becomes visible: until then it lives in the run's staging
directory, so an interrupted or failed export leaves the run as it was. An export of another model replaces the
run's source, and every variant made from the old one is removed with it (the same model's export is the same
bytes, and keeps them).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import progress
from pipeline.loaders import CONFIG_FILE, source_config
from pipeline.manifest import RunDir
from pipeline.options import check_options, option

GRAPHS = ("auto", "built", "traced")


@dataclass(frozen=True)
class ExportConfig:
    model: str = option(str, dataclasses.MISSING, "Checkpoint directory (Hugging Face or ours) or .gguf file; "
                        "nothing is downloaded.")
    graph: str = option(str, "auto", "built: the fused graph written from the config and weights, streamed "
                        "(variants/fused; llama, mistral, qwen2); traced: captured by torch.export "
                        "(variants/fp32, fused by `optimize`); auto: built where possible.", choices=GRAPHS)

    def __post_init__(self):
        check_options(self)


def export(run: RunDir, config: ExportConfig) -> dict:
    from models.weights import NotBuildable, one_gguf_parse, open_weights

    with one_gguf_parse(config.model):  # config, weights and tokenizer read one parse of a GGUF's metadata
        if config.graph == "traced":
            return export_traced(run, config)
        try:
            weights = open_weights(config.model)
        except NotBuildable:
            if config.graph == "built":
                raise
            return export_traced(run, config)
        return export_built(run, config, weights)




def publish_export(tx, run: RunDir, config: ExportConfig, variant: str, source_info: dict, bos, eos,
                   results: dict, tokenizer: Path | None, intermediate_size: int | None) -> None:
    """The source, variant and tokenizer records: the same for both routes (the MLP width goes with the source:
    the bundle's memory estimate needs it, and quantized graphs no longer say it plainly)."""
    from pipeline.stages.prune import own_artifact

    model_path = Path(config.model).resolve()
    own = own_artifact(run, config.model)  # the run's trained, pruned or distilled checkpoint
    if own:
        tx.read(own)
    source = {**source_info, "kind": "source", "path": str(model_path), "parent": own,
              "bos_token_id": bos, "eos_token_id": eos, "intermediate_size": intermediate_size}
    outputs = {"source": source,
               variant: {"kind": "onnx", "path": f"variants/{variant}/model.onnx", "parent": "source"}}
    if tokenizer is not None:
        outputs["tokenizer"] = {"kind": "tokenizer", "path": "tokenizer.json", "parent": "source"}
    tx.path(CONFIG_FILE).write_bytes(source_config(config.model))
    outputs["hf_config"] = {"kind": "config", "path": CONFIG_FILE, "parent": "source"}
    tx.record("export", asdict(config), {"model": config.model}, outputs, results)


def export_built(run: RunDir, config: ExportConfig, weights) -> dict:
    """`weights`: the checkpoint opened by models.weights.open_weights."""
    from exporters.builder import ORACLE_PARAMETERS, build_graph, check_built
    from models.hf import export_tokenizer, load_model
    from runtimes.bench import model_bytes

    with progress.phases("export", ["build graph", "validate against PyTorch", "tokenizer",
                                    "publish"]) as phase, run.transaction() as tx:
        phase("build graph")
        out = tx.variant_path("fused")
        start = time.perf_counter()
        with progress.bar(weights.config.num_layers, "build", unit="layer") as bar:
            contract = build_graph(weights, out, on_layer=lambda i: bar.update(1))
        seconds = time.perf_counter() - start
        phase("validate against PyTorch")
        reference = None
        if weights.parameters() <= ORACLE_PARAMETERS:
            reference = load_model(config.model).model
        check = check_built(weights, out, contract, reference)
        results = {"graph": "built", "variant": "fused",
                   "contract": {"num_layers": contract.num_layers, "num_kv_heads": contract.num_kv_heads,
                                "head_dim": contract.head_dim, "vocab_size": contract.vocab_size},
                   "parameters": weights.parameters(), "source_dtype": weights.storage_dtype,
                   "build_seconds": round(seconds, 2), "parity_checked": check["how"],
                   "parity_max_abs_diff": check["max_abs_diff"], "size_bytes": model_bytes(out)}
        phase("tokenizer")
        tokenizer = export_tokenizer(config.model, tx.staging)
        publish_export(tx, run, config, "fused", weights.source, weights.bos_token_id, weights.eos_token_id, results,
                       tokenizer, weights.config.intermediate_size)
        phase("publish")
    return results


def export_traced(run: RunDir, config: ExportConfig) -> dict:
    from exporters.export import export_onnx, validate_export
    from models.hf import export_tokenizer, load_model
    from runtimes.bench import model_bytes

    with progress.phases("export", ["load checkpoint", "trace to ONNX", "validate against PyTorch", "tokenizer",
                                    "publish"]) as phase, run.transaction() as tx:
        phase("load checkpoint")
        loaded = load_model(config.model)
        phase("trace to ONNX")
        out = tx.variant_path("fp32")
        contract = export_onnx(loaded.model, out, validate=False)
        phase("validate against PyTorch")
        parity = validate_export(loaded.model, out, contract)
        phase("tokenizer")
        tokenizer = export_tokenizer(config.model, tx.staging)
        results = {"graph": "traced", "variant": "fp32",
                   "contract": {"num_layers": contract.num_layers, "num_kv_heads": contract.num_kv_heads,
                                "head_dim": contract.head_dim, "vocab_size": contract.vocab_size},
                   "parameters": loaded.model.num_parameters(),
                   "parity_max_abs_diff": {p.step: p.worst[1] for p in parity},
                   "size_bytes": model_bytes(out)}
        publish_export(tx, run, config, "fp32", loaded.source, loaded.bos_token_id, loaded.eos_token_id, results,
                       tokenizer, getattr(loaded.model.config, "intermediate_size", None))
        phase("publish")
    return results
