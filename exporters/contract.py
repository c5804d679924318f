"""The one place the ONNX I/O contract is defined: names, axes, dtypes.

Names follow Optimum and onnxruntime-genai (`past_key_values.{i}.key` in, `present.{i}.key` out). Export,
fusion, quantization and check read this module; the contract is also written into every exported model's
metadata (key `pipeline.contract`) so that runtimes/ — which ships to the device and imports nothing from
here — reads it from the file instead of rebuilding names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import onnx

METADATA_KEY = "pipeline.contract"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


@dataclass(frozen=True)
class Contract:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: str = "float32"      # "float32" | "float16": the KV cache's element type
    family: str = "llama"
    max_position_embeddings: int = 2048
    rope_theta: float | None = None  # None: no rotary (learned positions); else fusion rebuilds cos/sin caches
    rope_scaling: dict | None = None
    fused_attention: bool = False  # set by `pipeline optimize`: the KV cache feeds GroupQueryAttention ops

    def input_names(self) -> list[str]:
        names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
        for i in range(self.num_layers):
            names += [past_key(i), past_value(i)]
        return names

    def output_names(self) -> list[str]:
        names = [LOGITS]
        for i in range(self.num_layers):
            names += [present_key(i), present_value(i)]
        return names

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Every dynamic axis, by name: batch, sequence (new tokens), past and total length."""
        axes = {
            INPUT_IDS: {0: "batch_size", 1: "sequence_length"},
            ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"},
            POSITION_IDS: {0: "batch_size", 1: "sequence_length"},
            LOGITS: {0: "batch_size", 1: "sequence_length"},
        }
        for i in range(self.num_layers):
            for n in (past_key(i), past_value(i)):
                axes[n] = {0: "batch_size", 2: "past_sequence_length"}
            for n in (present_key(i), present_value(i)):
                axes[n] = {0: "batch_size", 2: "total_sequence_length"}
        return axes

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Contract":
        return cls(**json.loads(s))


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set one metadata_props entry, replacing any previous one under the same key."""
    keep = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=key, value=value)


def write_contract(model: onnx.ModelProto, contract: Contract) -> None:
    """Store the contract in the model's metadata_props (replacing any previous one)."""
    set_metadata(model, METADATA_KEY, contract.to_json())


def read_contract(model: onnx.ModelProto) -> Contract:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return Contract.from_json(p.value)
    raise ValueError("the ONNX model carries no pipeline contract metadata: was it written by `pipeline export`?")
