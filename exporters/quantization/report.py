"""What `quantize` reports, read back from the written graph, not assumed from what was asked."""

from __future__ import annotations

import json

from dataclasses import asdict, dataclass

import onnx

from exporters.quantization.config import QuantConfig
from exporters.quantization.embedding import SHARED_TABLE_KEY
from exporters.quantization.nbits import nbits_quantized
from exporters.quantization.qdq import qdq_quantized


@dataclass
class QuantReport:
    recipe: str                         # the recipe asked
    weight_bits: int                    # bits of the recipe's weights (8 for static int8)
    activation_bits: int | None         # 8 for static int8; None: weight-only
    quantized_matmuls: list[str]        # in the recipe's own form (QDQ int8, or MatMulNBits of weight_bits)
    fallback_matmuls: dict[str, str]    # kept at 8-bit weight-only instead, with why
    float_matmuls: dict[str, str]       # everything else, with why
    activation_matmuls: list[str]       # of those, the MatMuls of two activations (attention), never quantized
    quantized_flop_share: float         # share of weight-MatMul FLOPs (K*N per token) of quantized_matmuls
    fallback_flop_share: float          # ... of fallback_matmuls
    embedding: dict                     # {"bits", "block_size", "tables"}
    details: dict                       # the passes' sections: ppl, calibration, rotation, smoothing, gptq, search
    config: QuantConfig                 # what was asked
    size_before: int = 0                # bytes on disk of the float model
    size_after: int = 0                 # ... of the quantized model

    def to_dict(self) -> dict:
        """The flat dict the run manifest and the CLI read (keys as they have always been)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("details", "config", "size_before", "size_after")}
        return {**out, **self.details, "config": asdict(self.config),
                "size_before": self.size_before, "size_after": self.size_after}


def read_report(shapes: dict[str, tuple[int, int]], activation_matmuls: list[str], staged, config: QuantConfig,
                details: dict, reasons_by_pass: dict[str, str]) -> QuantReport:
    """quantized_*: the recipe's own form (QDQ int8 for static/w8a8, MatMulNBits for w8/w4); fallback_*: the
    MatMuls kept at 8-bit weight-only instead (w8a8's and w4's sensitive ones, w4's output projection);
    float_matmuls: everything else, with the reason."""
    after = onnx.load(str(staged), load_external_data=False)
    bits = config.weight_only_bits
    done = (nbits_quantized(after, bits) if bits else qdq_quantized(after)) & set(shapes)
    fallback = (set() if bits == 8 else nbits_quantized(after, 8)) & set(shapes)
    tables = [n.input[0].removesuffix("_Q8") for n in after.graph.node if n.op_type == "GatherBlockQuantized"]
    reasons = {name: "multiplies two activations (attention)" for name in activation_matmuls}
    reasons.update(reasons_by_pass)
    reasons.update({n: "onnxruntime did not quantize it" for n in shapes if n not in done | fallback
                    and n not in reasons})
    flops = {name: k * n for name, (k, n) in shapes.items()}
    total = max(sum(flops.values()), 1)
    return QuantReport(config.recipe, bits or 8, None if bits else 8, sorted(done),
                       {n: reasons[n] for n in sorted(fallback)},
                       {n: why for n, why in sorted(reasons.items()) if n not in fallback}, sorted(activation_matmuls),
                       sum(flops[n] for n in done) / total, sum(flops[n] for n in fallback) / total,
                       embedding_form(after, tables, config.block_size), details, config)


def embedding_form(model: onnx.ModelProto, tables: list[str], block_size: int) -> dict:
    """The token table's form: int8 blocks of its own (`tables`), the head's 8-bit weights it reads (a tied table
    stored once, exporters/quantization/embedding.py), or float."""
    shared = any(n.name.endswith(("/shared/GatherColumns", "/shared/GatherBlocks")) for n in model.graph.node)
    form = {"bits": 8 if tables or shared else 32, "block_size": block_size if tables else None, "tables": tables,
            "shared_with_head": shared}
    measured = next((p.value for p in model.metadata_props if p.key == SHARED_TABLE_KEY), None)
    return {**form, "static_head_share": json.loads(measured)} if measured else form
