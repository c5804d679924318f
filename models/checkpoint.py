"""Save a `Decoder` as a Hugging Face Llama checkpoint, so any HF-aware tool (and our own loader) can read it.

Only Llama-shaped decoders (RMSNorm, rotary positions, gated SiLU MLP, no biases) have an exact
LlamaForCausalLM twin; anything else would load in transformers with silently different maths, so it is refused.
The directory appears all at once: it is written beside `out_dir` under a temporary name and renamed into place,
so a crash or Ctrl-C never leaves a half-written checkpoint that a later `load_model` would trust.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.decoder import Decoder, DecoderConfig
from models.errors import UserError
from models.files import publish, staging_dir

# HF module inside model.layers.{i}. -> our module inside layers.{i}. (models/hf.py reads with the same table)
LLAMA_LAYER_MODULES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attn_norm",
}
QK_NORM_MODULES = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}  # Qwen3, Gemma 3
# Gemma's four norms: HF's post_attention_layernorm norms the attention *output*; the MLP's input norm is
# pre_feedforward_layernorm (ours: post_attn_norm, the name Llama's layout gives the MLP's input norm)
SANDWICH_NORM_MODULES = {"input_layernorm": "input_norm", "post_attention_layernorm": "attn_out_norm",
                         "pre_feedforward_layernorm": "post_attn_norm", "post_feedforward_layernorm": "mlp_out_norm"}


def fused_parts(cfg: DecoderConfig) -> dict[tuple[str, tuple[int, int]], str]:
    """Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj: (HF module, (first, end) row) -> ours."""
    if cfg.family != "phi3":
        return {}
    q, kv, m = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {("self_attn.qkv_proj", (0, q)): "attn.q_proj", ("self_attn.qkv_proj", (q, q + kv)): "attn.k_proj",
            ("self_attn.qkv_proj", (q + kv, q + 2 * kv)): "attn.v_proj",
            ("mlp.gate_up_proj", (0, m)): "mlp.gate_proj", ("mlp.gate_up_proj", (m, 2 * m)): "mlp.up_proj"}


def layer_modules(cfg: DecoderConfig) -> dict[str, str]:
    """HF module inside model.layers.{i}. -> ours, for the modules `cfg` has (weights; biases follow them), but
    for the packed ones of `fused_parts`."""
    packed = set(fused_parts(cfg).values())
    mods = {k: v for k, v in LLAMA_LAYER_MODULES.items()
            if not (cfg.sandwich_norm and v.endswith("_norm")) and v not in packed}
    if cfg.sandwich_norm:
        mods.update(SANDWICH_NORM_MODULES)
    if cfg.qk_norm:
        mods.update(QK_NORM_MODULES)
    return mods


def check_llama_shaped(cfg: DecoderConfig) -> None:
    """Refuse configs whose maths LlamaForCausalLM cannot reproduce exactly."""
    wrong = []
    if cfg.norm != "rms":
        wrong.append(f"norm={cfg.norm!r}")
    if cfg.positions != "rope":
        wrong.append(f"positions={cfg.positions!r}")
    if cfg.activation != "silu" or not cfg.gated_mlp:
        wrong.append(f"activation={cfg.activation!r} gated_mlp={cfg.gated_mlp}")
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.norm_bias:
        wrong.append("biases")
    if wrong:
        raise UserError(f"cannot save a {cfg.family} decoder as a Llama checkpoint ({', '.join(wrong)}); "
                        "only Llama-shaped models (rms norm, rope, gated silu, no biases) can be saved")


def hf_config(cfg: DecoderConfig, extra: dict) -> dict:
    """config.json for LlamaForCausalLM; the "pipeline" key keeps our own config for provenance and reload."""
    out = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "pipeline": {"decoder": cfg.to_dict(), "extra": extra},
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if extra.get(key) is not None:
            out[key] = extra[key]
    return out


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Our parameter names -> HF Llama names, float32 and contiguous (safetensors refuses shared/strided views)."""
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(model.config.num_layers):
        for hf_name, ours in LLAMA_LAYER_MODULES.items():
            out[f"model.layers.{i}.{hf_name}.weight"] = sd[f"layers.{i}.{ours}.weight"]
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def generation_config(extra: dict) -> dict:
    """Minimal generation_config.json: HF generate() reads bos/eos/pad from here, not from config.json."""
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if extra.get(key) is not None:
            gen[key] = extra[key]
    return gen


def tokenizer_config(tokenizer_json: Path, extra: dict, max_length: int) -> dict:
    """tokenizer_config.json for AutoTokenizer: a plain fast tokenizer over tokenizer.json, with the special tokens
    named by the bos/eos ids in `extra` (without it, the llama model_type would pick LlamaTokenizerFast and its
    <s>/</s> defaults, which this vocabulary does not have)."""
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    names = {t["id"]: t["content"] for t in vocab}
    cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                 "clean_up_tokenization_spaces": False}
    for key in ("bos", "eos", "pad"):
        tid = extra.get(f"{key}_token_id")
        if tid in names:
            cfg[f"{key}_token"] = names[tid]
    return cfg


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(model: Decoder, out_dir: str | Path, tokenizer_json: str | Path | None = None,
                    extra: dict | None = None) -> Path:
    """Write `model` as an HF LlamaForCausalLM checkpoint directory at `out_dir` and return its path.

    `extra` (JSON-serialisable) is stored under config.json's "pipeline" key; bos/eos/pad_token_id found in it
    also become the HF config's and generation config's token ids.
    """
    cfg = model.config
    check_llama_shaped(cfg)
    extra = dict(extra or {})
    out = Path(out_dir).resolve()
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise UserError(f"tokenizer file {tokenizer_json} does not exist; pass an existing tokenizer.json or none")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output directory")
    with staging_dir(out) as staging:
        tmp = staging / out.name
        tmp.mkdir()
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(cfg, extra))
        write_json(tmp / "generation_config.json", generation_config(extra))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            write_json(tmp / "tokenizer_config.json", tokenizer_config(Path(tokenizer_json), extra,
                                                                           cfg.max_position_embeddings))
        publish(tmp, out)
    return out
