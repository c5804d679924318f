"""A checkpoint's config and weights, one tensor at a time: what the graph builder reads instead of a whole model.

`open_weights(path)` reads only the config (transformers' AutoConfig, which for a GGUF file reads its metadata)
and an index of where each tensor lives; `WeightSource.tensor(name)` then reads that one tensor, in our
decoder's naming and layout (models/decoder.py: a Linear's weight is (out, in)), as float32, whatever the file
holds: float32, float16 or bfloat16 safetensors (single or sharded through `model.safetensors.index.json`),
pytorch_model.bin (memory-mapped), or any GGUF type the gguf package dequantizes (F32/F16/BF16, Q8_0, Q4_0/1,
K-quants). Peak memory is one tensor, not the model.

The mapping is the one models/hf.py applies to a transformers model (its tests hold the two together): the
RMSNorm + rotary + gated-MLP families of BUILDER_FAMILIES, whose graph exporters/builder.py emits directly
(Phi-3's packed qkv_proj and gate_up_proj are read as their parts). GGUF files of llama.cpp's "llama" architecture store q/k rows permuted for
its rotary layout; they are put back as transformers does. Gemma's norms multiply by (1 + weight): safetensors
hold the weight, GGUF files 1 + weight; either way the reader gives the multiplier.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.checkpoint import fused_parts, layer_modules
from models.decoder import DecoderConfig
from models.errors import UserError
from models.gguf_grid import Grid, read_grid

BUILDER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
GGUF_CACHE_BYTES = 1 << 30  # a 135M model's float32 weights (0.54 GB) fit; a 1B one's are re-read instead

# our module inside layers.{i}. -> llama.cpp's tensor inside blk.{i}.
GGUF_LAYER_MODULES = {
    "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_norm": "attn_norm", "post_attn_norm": "ffn_norm", "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm", "attn_out_norm": "post_attention_norm", "mlp_out_norm": "post_ffw_norm",
}
GGUF_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
HF_GLOBAL = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}


class NotBuildable(UserError):
    """The checkpoint is readable, but of a family the graph builder does not emit (the traced route takes it)."""


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf q/k row permutation (each head's two rotary halves interleaved)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@dataclass
class WeightSource:
    """A checkpoint opened for streaming: its decoder config, provenance and per-tensor readers."""
    config: DecoderConfig
    source: dict                      # {"path", "format", "family", "architecture"} as models.hf.load_model gives
    bos_token_id: int | None
    eos_token_id: int | None
    storage_dtype: str                # what the files hold: "bfloat16", "float16", "float32" or a GGUF type
    _reader: object = field(repr=False, default=None)
    # dequantized GGUF tensors kept for their second read (the export's check, a tied head), up to this many
    # bytes: dequantizing is the slow part of reading a GGUF; safetensors reads are cheap and never kept
    cache_bytes: int = 0
    _cache: dict = field(repr=False, default_factory=dict)
    _grid: object = field(repr=False, default=None)  # GGUF sources: our name -> the tensor's own blocks

    def grid(self, name: str) -> Grid:
        """A GGUF source's quantized blocks of one weight (models/gguf_grid.py), in our (out, in) layout; the
        tied head reads the embedding's. One-line UserError for a source that is not a GGUF file."""
        if self._grid is None:
            raise UserError(f"{self.source['path']} is not a GGUF file: it has no quantized blocks to keep")
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "embed_tokens.weight"
        g = self._grid(name)
        if g.codes.shape != expected_shape(self.config, name):
            raise UserError(f"{self.source['path']}: {gguf_name(name)} has shape {g.codes.shape}, the config says "
                            f"{expected_shape(self.config, name)}")
        return g

    def names(self) -> list[str]:
        """Every parameter the decoder has, in our naming (lm_head only when untied)."""
        c = self.config
        out = ["embed_tokens.weight"]
        for i in range(c.num_layers):
            for mod in layer_modules(c).values():
                out.append(f"layers.{i}.{mod}.weight")
            if c.qkv_bias:
                out += [f"layers.{i}.attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
            if c.o_bias:
                out.append(f"layers.{i}.attn.o_proj.bias")
            if c.mlp_bias:
                out += [f"layers.{i}.mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")]
        out.append("norm.weight")
        if not c.tie_word_embeddings:
            out.append("lm_head.weight")
        return out

    def tensor(self, name: str) -> np.ndarray:
        """One weight, float32, in our layout; the tied head reads the embedding."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "embed_tokens.weight"
        if name in self._cache:
            return self._cache[name]
        w = np.ascontiguousarray(self._reader(name), dtype=np.float32)
        if w.nbytes <= self.cache_bytes - sum(t.nbytes for t in self._cache.values()):
            w.flags.writeable = False  # shared between readers
            self._cache[name] = w
        return w

    def parameters(self) -> int:
        """The parameter count (tied weights once), from the config alone."""
        c = self.config
        hd, kv = c.head_dim, c.num_kv_heads * c.head_dim
        attn = c.hidden_size * (c.num_heads * hd + 2 * kv) + c.num_heads * hd * c.hidden_size
        mlp = 3 * c.hidden_size * c.intermediate_size
        biases = (c.num_heads * hd + 2 * kv) * c.qkv_bias + c.hidden_size * c.o_bias \
            + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
        norms = (4 if c.sandwich_norm else 2) * c.hidden_size + (2 * hd if c.qk_norm else 0)
        layer = attn + mlp + biases + norms
        head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
        return c.vocab_size * c.hidden_size + c.num_layers * layer + c.hidden_size + head


class SafetensorsReader:
    """Tensors by Hugging Face name across one or many .safetensors files (or a memory-mapped .bin)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        index = directory / "model.safetensors.index.json"
        files = sorted(directory.glob("*.safetensors"))
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a safetensors index (no weight_map): re-download it") from e
            self.where = {k: directory / v for k, v in weight_map.items()}
            missing = sorted({p for p in self.where.values() if not p.is_file()})
            if missing:
                raise UserError(f"{index} names {missing[0].name}, which is missing: the sharded checkpoint is "
                                "incomplete, copy every shard")
        elif files:
            for f in files:
                try:
                    with safe_open(str(f), "pt") as h:
                        self.where.update(dict.fromkeys(h.keys(), f))
                except Exception as e:
                    raise UserError(f"cannot read the weights in {f}: {str(e).splitlines()[0] if str(e) else e}; "
                                    "the file is corrupt or truncated, re-download or re-export it") from e
        self.bins = sorted(directory.glob("pytorch_model*.bin")) if not self.where else []
        self._bin: dict | None = None

    def keys(self) -> set[str]:
        return set(self.where) if self.where else set(self._bin_dict())

    def _bin_dict(self) -> dict:
        if self._bin is None:
            import torch

            self._bin = {}
            for f in self.bins:
                try:
                    self._bin.update(torch.load(str(f), map_location="cpu", mmap=True, weights_only=True))
                except Exception as e:
                    raise UserError(f"cannot read the weights in {f}: {e}; re-download or re-export it") from e
        return self._bin

    def dtype(self, hf_name: str) -> str:
        """The stored element type of one tensor, read from the file header ("BF16", "F32", ...)."""
        from safetensors import safe_open

        if not self.where:
            return str(self._bin_dict()[hf_name].dtype).removeprefix("torch.")
        with safe_open(str(self.where[hf_name]), "pt") as h:
            return h.get_slice(hf_name).get_dtype()

    def read(self, hf_name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        if self.where:
            with safe_open(str(self.where[hf_name]), "pt") as h:
                t = h.get_tensor(hf_name)
        else:
            t = self._bin_dict()[hf_name]
        return t.to(torch.float32).numpy()


@contextmanager
def one_gguf_parse(path: str | Path) -> Iterator[None]:
    """Within it, every GGUFReader of `path` (transformers' config and tokenizer readers, ours) is one parsed
    instance: parsing a GGUF's metadata (its vocabulary) costs seconds each time."""
    path = Path(path).resolve()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        yield
        return
    import gguf

    real = gguf.GGUFReader
    cache: dict = {}

    def reader(p, *args, **kwargs):
        if Path(p).resolve() != path or args or kwargs:
            return real(p, *args, **kwargs)
        if "r" not in cache:
            cache["r"] = real(str(path))
        return cache["r"]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


class GGUFTensors:
    """Tensors by GGUF name, dequantized to float32 by the gguf package as they are read."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:
            raise UserError(f"cannot read the GGUF file {path}: {e}; it is corrupt or truncated") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.reader.fields.get("general.architecture")
        if arch is None:
            raise UserError(f"{path} has no general.architecture: not a llama.cpp GGUF file")
        # llama.cpp permutes q/k rows only for its llama architecture (Llama and Mistral)
        self.permuted = bytes(arch.parts[arch.data[0]]).decode() == "llama"
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    def types(self) -> set[str]:
        return {t.tensor_type.name for t in self.tensors.values()}

    def grid(self, gguf_name: str) -> Grid:
        """The tensor's own quantized blocks (models/gguf_grid.py), rows in transformers' order."""
        t = self.tensors[gguf_name]
        g = read_grid(t.tensor_type.name, t.data, tuple(int(d) for d in reversed(t.shape)))
        heads = self.num_heads if ".attn_q." in gguf_name else self.num_kv_heads if ".attn_k." in gguf_name else 0
        if self.permuted and heads:
            g = g.rows(unpermute_rotary(np.arange(g.codes.shape[0]), heads))
        return g

    def read(self, gguf_name: str) -> np.ndarray:
        from gguf import dequantize

        t = self.tensors[gguf_name]
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if self.permuted and ".attn_q." in gguf_name:
            w = unpermute_rotary(w, self.num_heads)
        elif self.permuted and ".attn_k." in gguf_name:
            w = unpermute_rotary(w, self.num_kv_heads)
        return w


def file_name(ours: str, globals_: dict, layer_prefix: str, modules: dict) -> str:
    """Our parameter name -> the file's: a global tensor by table, a layer's as `{prefix}{i}.{module}.{kind}`."""
    if ours in globals_:
        return globals_[ours]
    _, i, rest = ours.split(".", 2)
    mod, kind = rest.rsplit(".", 1)
    return f"{layer_prefix}{i}.{modules[mod]}.{kind}"


def hf_namer(cfg: DecoderConfig):
    """Our parameter name -> the Hugging Face checkpoint's, for this config's family (for a part of a packed
    tensor, the packed one: `packed_rows` says which rows)."""
    modules = {ours: hf for hf, ours in layer_modules(cfg).items()}
    modules.update({ours: hf for (hf, _), ours in fused_parts(cfg).items()})
    return lambda ours: file_name(ours, HF_GLOBAL, "model.layers.", modules)


def packed_rows(cfg: DecoderConfig, ours: str) -> tuple[int, int] | None:
    """(first, end) rows of `ours` inside the packed tensor that holds it (Phi-3's qkv_proj, gate_up_proj)."""
    parts = {mod: rows for (_, rows), mod in fused_parts(cfg).items()}
    if not ours.startswith("layers."):
        return None
    return parts.get(ours.split(".", 2)[2].rsplit(".", 1)[0])


def gguf_name(ours: str) -> str:
    return file_name(ours, GGUF_GLOBAL, "blk.", GGUF_LAYER_MODULES)


def generation_token(directory: Path, hf_cfg, name: str) -> int | None:
    """bos/eos id from config.json, else generation_config.json; for a list, the first."""
    value = getattr(hf_cfg, name, None)
    gen = directory / "generation_config.json"
    if value is None and gen.is_file():
        try:
            value = json.loads(gen.read_text()).get(name)
        except ValueError:
            value = None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def open_weights(path: str | Path) -> WeightSource:
    """The checkpoint at `path` (HF directory, ours, or .gguf) opened for streaming; one-line UserError when its
    family is not one the builder emits, or its files are incomplete."""
    from models.hf import UNIT_OFFSET_NORMS, llama_like_config, read_config, resolve_source

    src = resolve_source(path)
    hf_cfg = read_config(src)
    if hf_cfg.model_type not in BUILDER_FAMILIES:
        raise NotBuildable(f"the graph builder emits {', '.join(BUILDER_FAMILIES)}; {src.path} is "
                           f"{hf_cfg.model_type}: export it with --graph traced")
    num_heads = hf_cfg.num_attention_heads
    num_kv = getattr(hf_cfg, "num_key_value_heads", None) or num_heads
    offset = 0.0  # added to every norm weight
    if src.gguf_file and hf_cfg.model_type == "phi3":
        raise UserError(f"{src.path}: Phi-3 GGUF files (packed attn_qkv, LongRoPE factors as tensors) are not "
                        "read yet; pass the Hugging Face checkpoint directory")
    if src.gguf_file:
        gguf_path = src.directory / src.gguf_file
        tensors = GGUFTensors(gguf_path, num_heads, num_kv)
        available = set(tensors.tensors)
        cfg = llama_like_config(hf_cfg, tied="output.weight" not in available)
        to_file, read = gguf_name, tensors.read
        storage = ",".join(sorted(tensors.types()))
        fmt = "gguf"
    else:
        files = SafetensorsReader(src.directory)
        if not files.where and not files.bins:
            raise UserError(f"{src.path} has no weights (model.safetensors or pytorch_model.bin); "
                            "copy the weight files next to config.json")
        available = files.keys()
        tied = bool(getattr(hf_cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in available
        cfg = llama_like_config(hf_cfg, tied)
        to_file, read = hf_namer(cfg), files.read
        storage = files.dtype(to_file("embed_tokens.weight"))
        fmt = "pipeline" if isinstance(getattr(hf_cfg, "pipeline", None), dict) else "hf"
        offset = 1.0 if cfg.family in UNIT_OFFSET_NORMS else 0.0
    architecture = (hf_cfg.architectures or [f"{hf_cfg.model_type.capitalize()}ForCausalLM"])[0]
    source = {"path": str(src.path), "format": fmt, "family": cfg.family, "architecture": architecture}
    ws = WeightSource(cfg, source, generation_token(src.directory, hf_cfg, "bos_token_id"),
                      generation_token(src.directory, hf_cfg, "eos_token_id"), storage)
    missing = [n for n in ws.names() if to_file(n) not in available]
    if missing:
        raise UserError(f"{src.path} lacks {len(missing)} weights (first: {to_file(missing[0])}); "
                        "the checkpoint is incomplete, re-download or re-export it")
    if fmt == "pipeline":
        cfg.extra["pipeline"] = hf_cfg.pipeline.get("extra", {})

    def reader(name: str) -> np.ndarray:
        w = read(to_file(name))
        rows = packed_rows(cfg, name) if not src.gguf_file else None
        if rows is not None:
            w = w[rows[0]:rows[1]]
        expected = expected_shape(cfg, name)
        if tuple(w.shape) != expected:
            raise UserError(f"{src.path}: {to_file(name)} has shape {tuple(w.shape)}, the config says {expected}; "
                            "the checkpoint and its config do not belong together")
        if offset and name.endswith("norm.weight"):
            w = w + np.float32(offset)
        return w

    ws._reader = reader
    if src.gguf_file:
        ws.cache_bytes = GGUF_CACHE_BYTES
        ws._grid = lambda name: tensors.grid(gguf_name(name))
    return ws


def expected_shape(cfg: DecoderConfig, name: str) -> tuple[int, ...]:
    """The (out, in) shape (or (n,) of a norm or bias) that `cfg` implies for a parameter."""
    h, hd = cfg.hidden_size, cfg.head_dim
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if name == "norm.weight":
        return (h,)
    mod, kind = name.split(".", 2)[2].rsplit(".", 1)
    out_in = {"attn.q_proj": (cfg.num_heads * hd, h), "attn.k_proj": (cfg.num_kv_heads * hd, h),
              "attn.v_proj": (cfg.num_kv_heads * hd, h), "attn.o_proj": (h, cfg.num_heads * hd),
              "mlp.gate_proj": (cfg.intermediate_size, h), "mlp.up_proj": (cfg.intermediate_size, h),
              "mlp.down_proj": (h, cfg.intermediate_size), "input_norm": (h,), "post_attn_norm": (h,),
              "attn_out_norm": (h,), "mlp_out_norm": (h,), "attn.q_norm": (hd,), "attn.k_norm": (hd,)}[mod]
    return out_in if kind == "weight" else out_in[:1]
