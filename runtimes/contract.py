"""The ONNX I/O contract of an exported decoder, declared once: names, dynamic axes, dtypes and model dimensions.

Names follow Optimum and onnxruntime-genai: `past_key_values.{i}.key` / `.value` in, `present.{i}.key` / `.value`
out, beside `input_ids`, `attention_mask`, `position_ids` and `logits`. The exporter fills a `Contract` from the
decoder's config and writes it into the model's metadata (key `pipeline.contract`); every pass that rewrites the
model keeps it there, and whoever reads the model (fusion, quantization, check, package, the device runtime)
reads the contract back from the file instead of rebuilding names or guessing dimensions from the graph.

This module lives in runtimes/ because the device needs it and imports neither torch nor onnx: a ModelProto is
only touched through its `metadata_props` field. exporters/ imports it from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from runtimes.errors import RuntimeUserError

METADATA_KEY = "pipeline.contract"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# built graphs: how many last positions get logits (transformers' logits_to_keep; 0 = all). An input with a
# default (an initializer of the same name), so callers that do not know it get every position, as before
LOGITS_TO_KEEP = "logits_to_keep"
# the KV cache names, as templates: `{}` is the layer (onnxruntime-genai's config takes them with `%d`)
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"

KV_DTYPES = ("float32", "float16")  # a float16 model (`pipeline optimize --fp16`) has float16 logits too
TOKEN_AXES = {0: "batch_size", 1: "sequence_length"}      # input_ids, position_ids, logits: the new tokens
MASK_AXES = {0: "batch_size", 1: "total_sequence_length"}  # attention_mask: past + new
PAST_AXES = {0: "batch_size", 2: "past_sequence_length"}   # (batch, kv_heads, past, head_dim)
PRESENT_AXES = {0: "batch_size", 2: "total_sequence_length"}


def past_key(i: int) -> str:
    return PAST_KEY.format(i)


def past_value(i: int) -> str:
    return PAST_VALUE.format(i)


def present_key(i: int) -> str:
    return PRESENT_KEY.format(i)


def present_value(i: int) -> str:
    return PRESENT_VALUE.format(i)


def past_names(num_layers: int) -> list[str]:
    """Every past input, layer by layer, key before value: the order the graph declares them."""
    return [n for i in range(num_layers) for n in (past_key(i), past_value(i))]


def present_names(num_layers: int) -> list[str]:
    """Every present output, in the order of `past_names`: present_names(n)[j] becomes past_names(n)[j]."""
    return [n for i in range(num_layers) for n in (present_key(i), present_value(i))]


def is_past(name: str) -> bool:
    return name.startswith(PAST_KEY.split("{}")[0])


# fields added after models were shipped, whose defaults describe every model written before them
ADDED_FIELDS = ("rope_local_theta", "rotary_dim")


@dataclass(frozen=True)
class Contract:
    """What a model file promises its caller. Every field is written into the metadata and required there."""
    num_layers: int
    num_heads: int                # query heads
    num_kv_heads: int             # key/value heads (grouped-query attention: num_heads is a multiple)
    head_dim: int
    hidden_size: int              # width of the residual stream (not always num_heads * head_dim)
    vocab_size: int
    max_position_embeddings: int  # longest sequence the rotary tables (or position table) cover
    attention_windows: tuple[int | None, ...]  # per layer: None = global attention, else sliding-window length
    kv_dtype: str = "float32"     # "float32" | "float16": the KV cache's element type
    family: str = "llama"         # the Hugging Face family the weights came from
    rope_theta: float | None = None  # None: no rotary (learned positions); else fusion rebuilds cos/sin caches
    rope_scaling: dict | None = None  # Hugging Face's rope_scaling, as the decoder applies it
    fused_attention: bool = False  # set by `pipeline optimize`: the KV cache feeds GroupQueryAttention ops
    rope_local_theta: float | None = None  # rotary base of the sliding-window layers, when theirs differs (Gemma 3)
    rotary_dim: int | None = None  # channels of each head that are rotated, when not all (Phi-3/4's partial rotary)

    def __post_init__(self):
        object.__setattr__(self, "attention_windows", tuple(self.attention_windows))  # JSON gives a list
        if len(self.attention_windows) != self.num_layers:
            raise ValueError(f"{len(self.attention_windows)} attention windows for {self.num_layers} layers")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")

    # ---- names and axes (Optimum's OnnxConfig.inputs / outputs / add_past_key_values)

    def add_past_key_values(self, axes: dict[str, dict[int, str]], direction: str) -> None:
        """Add every layer's KV tensors to `axes`: "inputs" (past) or "outputs" (present)."""
        names, kv_axes = ((past_names, PAST_AXES) if direction == "inputs" else (present_names, PRESENT_AXES))
        axes.update({n: dict(kv_axes) for n in names(self.num_layers)})

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        axes = {INPUT_IDS: dict(TOKEN_AXES), ATTENTION_MASK: dict(MASK_AXES), POSITION_IDS: dict(TOKEN_AXES)}
        self.add_past_key_values(axes, "inputs")
        return axes

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        axes = {LOGITS: dict(TOKEN_AXES)}
        self.add_past_key_values(axes, "outputs")
        return axes

    def input_names(self) -> list[str]:
        return list(self.inputs)

    def output_names(self) -> list[str]:
        return list(self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Every dynamic axis, by name: batch, sequence (new tokens), past and total length."""
        return {**self.inputs, **self.outputs}

    def dtypes(self) -> dict[str, str]:
        """Element type (numpy name) of every input and of the presents: int64 token ids, mask and positions; the
        KV cache in the KV dtype. The logits are float32, or float16 in a graph converted to float16 whole
        (fused-fp16; a float16 KV cache alone, `optimize --kv-fp16`, keeps them float32): read them as floats."""
        return {n: "int64" if n in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) else self.kv_dtype
                for n in (*self.inputs, *self.outputs) if n != LOGITS}

    # ---- metadata

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Any = "the model") -> "Contract":
        """The contract in a `pipeline.contract` entry; one-line RuntimeUserError when it is unreadable or was
        written by an older version (fields missing), saying to re-export."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise RuntimeUserError(f"{source} has an unreadable {METADATA_KEY} metadata entry ({e}): "
                                   "re-export the model") from e
        if not isinstance(raw, dict):
            raise RuntimeUserError(f"{source} has an unreadable {METADATA_KEY} metadata entry (not an object): "
                                   "re-export the model")
        missing = [f.name for f in fields(cls) if f.name not in raw and f.name not in ADDED_FIELDS]
        if missing:
            raise RuntimeUserError(f"{source} was written by an older pipeline (its {METADATA_KEY} metadata lacks "
                                   f"{', '.join(missing)}): re-export it with `pipeline export`")
        try:  # unknown keys (a newer exporter) are ignored
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (TypeError, ValueError) as e:
            raise RuntimeUserError(f"{source} has an unreadable {METADATA_KEY} metadata entry ({e}): "
                                   "re-export the model") from e

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: Any = "the model") -> "Contract":
        """From a metadata map: onnxruntime's `custom_metadata_map`, or a ModelProto's metadata_props as a dict."""
        if METADATA_KEY not in meta:
            raise RuntimeUserError(f"{source} carries no {METADATA_KEY} metadata: export it with `pipeline export`")
        return cls.from_json(meta[METADATA_KEY], source)


def set_metadata(model, key: str, value: str) -> None:
    """Set one metadata_props entry of an onnx.ModelProto, replacing any previous one under the same key."""
    keep = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=key, value=value)


def write_contract(model, contract: Contract) -> None:
    """Store the contract in an onnx.ModelProto's metadata_props (replacing any previous one)."""
    set_metadata(model, METADATA_KEY, contract.to_json())


def read_contract(model, source: Any = "the model") -> Contract:
    """The contract stored in an onnx.ModelProto's metadata_props."""
    return Contract.from_metadata({p.key: p.value for p in model.metadata_props}, source)
