"""Load local Hugging Face checkpoints and GGUF files into our own `Decoder`, with exactly the same maths.

transformers does all the file reading (safetensors, pytorch_model.bin, shards, GGUF dequantisation), so every
format it understands works here; this module only maps each family's config and state_dict onto
`DecoderConfig` + `Decoder` weights, and turns every way the input can be wrong into one `UserError` line.
Nothing is ever downloaded: a path that does not exist locally is an error, even if it looks like a Hub id.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from models.checkpoint import fused_parts, layer_modules
from models.decoder import Decoder, DecoderConfig
from models.errors import UserError

SUPPORTED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# families whose RMSNorm multiplies by (1 + weight): the decoder holds the multiplier itself, so their HF weights
# get 1 added as they are read (GGUF files of them already store 1 + weight, as llama.cpp's converter writes)
UNIT_OFFSET_NORMS = ("gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # what models.rope.rope_inv_freq implements
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu": "gelu"}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """Our decoder plus what export metadata needs to know about where it came from."""
    model: Decoder        # eval mode, float32
    source: dict          # {"path", "format": "pipeline" | "hf" | "gguf", "family", "architecture"}
    bos_token_id: int | None
    eos_token_id: int | None


@dataclass(frozen=True)
class Source:
    """Where the weights are: a checkpoint directory, or a directory plus the GGUF file name inside it."""
    path: Path
    directory: Path
    gguf_file: str | None

    def loader_kwargs(self) -> dict:
        """Keyword arguments every transformers `from_pretrained` call needs for this source, offline."""
        kwargs = {"local_files_only": True}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def resolve_source(path: str | Path) -> Source:
    """Check the path is something we can read before transformers sees it, so its errors stay one clear line."""
    p = Path(path).expanduser()
    if not p.exists():
        if HUB_ID.match(str(path)):
            raise UserError(f"{path} does not exist locally; it looks like a Hub id, but nothing is downloaded: "
                            "pass a local checkpoint directory or a .gguf file")
        raise UserError(f"{path} does not exist; pass a local checkpoint directory (with config.json) or a .gguf file")
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return Source(p, p.parent, p.name)
        raise UserError(f"{p} is not a .gguf file; pass a .gguf file or a checkpoint directory "
                        f"(for weights inside a checkpoint, pass its directory {p.parent})")
    if not (p / "config.json").is_file():
        ggufs = sorted(q.name for q in p.glob("*.gguf"))
        hint = f" (to load a GGUF file here, pass {p / ggufs[0]})" if ggufs else ""
        raise UserError(f"{p} has no config.json; pass a Hugging Face checkpoint directory or a .gguf file{hint}")
    return Source(p, p, None)


def cache_keyword() -> str:
    """transformers' name for the KV cache a forward call takes and returns: `cache` since 5.x
    (`past_key_values` still works there, with a deprecation warning), `past_key_values` before."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' per-file progress bars (and the plain tqdm bar of its GGUF conversion) and its load
    reports: a load should not print screens of output, and what goes wrong is said in our one error line."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its bar is plain tqdm, not transformers'

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The loader's own reason, kept to one short line for a UserError message."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def check_family(model_type: str | None, where: str | Path) -> None:
    """Only families whose maths models/decoder.py reproduces exactly may pass."""
    if model_type == "gemma3":
        raise UserError(f"{where} is Gemma 3 with its vision tower (model_type 'gemma3'); pass a text-only "
                        "Gemma 3 checkpoint (model_type 'gemma3_text', as the 270M and 1B sizes ship)")
    if model_type not in SUPPORTED_FAMILIES:
        raise UserError(f"model_type {model_type!r} in {where} is not supported; "
                        f"supported families: {', '.join(SUPPORTED_FAMILIES)}")


def raw_model_type(config_json: Path) -> str | None:
    """model_type straight from config.json, so even types transformers has never heard of get our message."""
    try:
        raw = json.loads(config_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_json} is not a readable JSON file ({first_line(e)}); fix or re-download it") from e
    return raw.get("model_type") if isinstance(raw, dict) else None


def read_config(src: Source) -> PretrainedConfig:
    """The transformers config, checked to be a supported causal decoder before any weight is read."""
    if not src.gguf_file:
        check_family(raw_model_type(src.directory / "config.json"), src.path)
    try:
        cfg = AutoConfig.from_pretrained(str(src.directory), **src.loader_kwargs())
    except ImportError as e:
        raise UserError(f"cannot read {src.path}: {first_line(e)}") from e
    except Exception as e:
        if src.gguf_file:
            raise UserError(f"cannot read the GGUF file {src.path}: {first_line(e)}; pass an intact GGUF "
                            f"of one of: {', '.join(SUPPORTED_FAMILIES)}") from e
        raise UserError(f"cannot read {src.directory / 'config.json'}: {first_line(e)}; fix or re-download it") from e
    check_family(cfg.model_type, src.path)
    if src.gguf_file:
        gguf_head_width(cfg, src.path)
    causal = [a for a in (cfg.architectures or []) if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if cfg.architectures and not causal:
        raise UserError(f"{src.path} is a {cfg.architectures[0]}, not a causal decoder (no language-model head); "
                        "pass a ...ForCausalLM checkpoint")
    return cfg


def gguf_head_width(cfg: PretrainedConfig, path: Path) -> None:
    """transformers reads `attention.key_length` from GGUF files of some families only (Gemma, not Qwen3), and
    otherwise takes hidden_size / heads: wrong for Qwen3-0.6B (1024 / 16 = 64, its heads are 128 wide). The file
    says; set it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None:
        return
    field = reader.fields.get(f"{bytes(arch.parts[arch.data[0]]).decode()}.attention.key_length")
    if field is not None:
        cfg.head_dim = int(field.parts[field.data[0]][0])


def culprit(src: Source) -> Path:
    """The weight file that a failed load most likely choked on: the first one whose header does not check out."""
    if src.gguf_file:
        return src.path
    files = sorted(f for pattern in WEIGHT_PATTERNS for f in src.directory.glob(pattern))
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt"):
                    pass
            elif not zipfile.is_zipfile(f):
                return f
        except Exception:
            return f
    return files[0] if len(files) == 1 else src.directory


def load_transformers_model(src: Source) -> PreTrainedModel:
    """Let transformers read the weights (float32, eval), and refuse a model with any weight missing or mis-shaped."""
    config = read_config(src)
    if not src.gguf_file and not any(any(src.directory.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{src.path} has no weights (model.safetensors or pytorch_model.bin); "
                        "copy the weight files next to config.json")
    try:
        with quiet_progress():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(src.directory), config=config, dtype=torch.float32, output_loading_info=True,
                **src.loader_kwargs())
    except ImportError as e:
        raise UserError(f"cannot load {src.path}: {first_line(e)}") from e
    except Exception as e:
        if "ignore_mismatched_sizes" in str(e):  # transformers' way of saying a weight has the wrong shape
            raise UserError(f"{culprit(src)} holds weights whose shapes differ from {src.directory / 'config.json'}: "
                            "the checkpoint and its config do not belong together, re-download or re-export it") from e
        raise UserError(f"cannot read the weights in {culprit(src)}: {first_line(e)}; "
                        "the file is corrupt or truncated, re-download or re-export it") from e
    bad = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if bad:
        raise UserError(f"{src.path} lacks or mis-shapes {len(bad)} weights (first: {bad[0]}); "
                        "the checkpoint is incomplete, re-download or re-export it")
    return model.eval()  # already float32; .float() is refused on GGUF-loaded models


def rope_settings(hf_cfg: PretrainedConfig, params: dict | None = None) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 5's rope_parameters or the older separate keys."""
    if params is None:
        params = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    params = dict(params)
    theta = float(params.pop("rope_theta", None) or getattr(hf_cfg, "rope_theta", None) or 10000.0)
    params.pop("partial_rotary_factor", None)  # the decoder's own field (rotary_factor)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); "
                        "pass a checkpoint without it")
    if kind == "longrope":  # the factor transformers derives: the context over the pretraining context
        original = params.get("original_max_position_embeddings") or getattr(
            hf_cfg, "original_max_position_embeddings", None) or hf_cfg.max_position_embeddings
        params["original_max_position_embeddings"] = original
        params["factor"] = params.get("factor") or hf_cfg.max_position_embeddings / original
    return theta, (params if kind != "default" else None)


def rotary_factor(hf_cfg: PretrainedConfig) -> float:
    """The share of each head that is rotated (Phi-3/4: partial_rotary_factor, in rope_parameters in transformers 5)."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    value = params.get("partial_rotary_factor") if "full_attention" not in params else None
    return float(value or getattr(hf_cfg, "partial_rotary_factor", None) or 1.0)


def layer_rope(hf_cfg: PretrainedConfig) -> tuple[float, dict | None, float | None]:
    """(global theta, global scaling, sliding layers' theta or None): Gemma 3 keys rope_parameters by layer type."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    if "full_attention" not in params:
        return (*rope_settings(hf_cfg), None)
    theta, scaling = rope_settings(hf_cfg, params["full_attention"])
    local = params.get("sliding_attention")
    if local is None:
        return theta, scaling, None
    local_theta, local_scaling = rope_settings(hf_cfg, local)
    if local_scaling is not None:
        raise UserError("rope scaling on sliding-window layers is not supported; pass a checkpoint without it")
    return theta, scaling, local_theta


def activation(name: str) -> str:
    """transformers' activation name -> the decoder's (HF has several names for the same tanh-approximated gelu)."""
    if name not in ACTIVATIONS:
        raise UserError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def is_tied(model: PreTrainedModel) -> bool:
    """Whether lm_head really shares the embedding, as loaded (the config flag alone can disagree with the files)."""
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def sliding_window(hf_cfg: PretrainedConfig) -> tuple[int | None, list | None]:
    """(window, layer_types): the attention window if any layer uses one (Mistral; Qwen2/3 with
    use_sliding_window; Gemma 3's local layers), else (None, None); layer_types None means every layer."""
    window = getattr(hf_cfg, "sliding_window", None)
    layer_types = getattr(hf_cfg, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None, None
    if getattr(hf_cfg, "use_sliding_window", True) is False:  # Qwen2/3 keep a window they do not use
        return None, None
    return int(window), (list(layer_types) if layer_types is not None else None)


def refuse_unsupported(hf_cfg: PretrainedConfig) -> None:
    """Switches of a supported family that the decoder does not implement: one line each."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2's own; Gemma 3 dropped them
        if getattr(hf_cfg, key, None) is not None and hf_cfg.model_type != "gemma2":
            raise UserError(f"{key}={getattr(hf_cfg, key)} is not supported; pass a checkpoint without it")
    if getattr(hf_cfg, "use_bidirectional_attention", False):
        raise UserError("use_bidirectional_attention (an encoder-style Gemma) is not supported: pass a causal "
                        "decoder checkpoint")


def llama_like_config(hf_cfg: PretrainedConfig, tied: bool) -> DecoderConfig:
    """Llama, Mistral, Qwen2/3 and Gemma 3 text: the decoder's defaults, plus their biases, rope scaling, head
    width, q/k norms, attention windows and Gemma's norms, embedding scale and attention scale."""
    refuse_unsupported(hf_cfg)
    theta, scaling, local_theta = layer_rope(hf_cfg)
    n_heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_heads
    family = hf_cfg.model_type
    gemma = family in ("gemma2", "gemma3_text")
    qwen2 = family == "qwen2"
    attention_bias = bool(getattr(hf_cfg, "attention_bias", False))
    window, layer_types = sliding_window(hf_cfg)
    act = getattr(hf_cfg, "hidden_activation", None) or hf_cfg.hidden_act
    return DecoderConfig(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size, num_layers=hf_cfg.num_hidden_layers,
        num_heads=n_heads, num_kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or n_heads,
        intermediate_size=hf_cfg.intermediate_size, max_position_embeddings=hf_cfg.max_position_embeddings,
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf_cfg.rms_norm_eps, norm="rms", positions="rope",
        activation=activation(act), gated_mlp=True,
        qkv_bias=qwen2 or attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(hf_cfg, "mlp_bias", False)),
        norm_bias=False, tie_word_embeddings=tied, family=family,
        attention_head_dim=head_dim if head_dim * n_heads != hf_cfg.hidden_size else None,
        qk_norm=family in ("qwen3", "gemma3_text"), sandwich_norm=gemma,
        embed_scale=hf_cfg.hidden_size ** 0.5 if gemma else 1.0,
        attention_scale=hf_cfg.query_pre_attn_scalar ** -0.5 if gemma else None,
        sliding_window=window, layer_types=layer_types,
        rope_local_theta=local_theta if window is not None else None, partial_rotary_factor=rotary_factor(hf_cfg),
        attn_softcap=getattr(hf_cfg, "attn_logit_softcapping", None) if family == "gemma2" else None,
        final_softcap=getattr(hf_cfg, "final_logit_softcapping", None) if family == "gemma2" else None)


def llama_like_weights(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """HF model.* names -> ours; the modules match one to one, only the names differ (and Gemma's norms hold
    weight - 1: the decoder keeps the multiplier)."""
    out = {"embed_tokens.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_layers):
        for (hf_mod, part), our_mod in fused_parts(cfg).items():  # Phi-3's packed projections, split
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.{hf_mod}.{kind}"
                if name in sd:
                    out[f"layers.{i}.{our_mod}.{kind}"] = sd[name][slice(*part)]
        for hf_mod, our_mod in layer_modules(cfg).items():
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.{hf_mod}.{kind}"
                if name in sd:
                    out[f"layers.{i}.{our_mod}.{kind}"] = sd[name]
    if cfg.family in UNIT_OFFSET_NORMS:
        out = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in out.items()}
    return out


def gpt2_config(hf_cfg: PretrainedConfig, tied: bool) -> DecoderConfig:
    """GPT-2: LayerNorm with bias, learned positions, plain gelu-tanh MLP, biases everywhere, no GQA."""
    if not hf_cfg.scale_attn_weights or hf_cfg.scale_attn_by_inverse_layer_idx or hf_cfg.add_cross_attention:
        raise UserError("GPT-2 checkpoints with scale_attn_weights off, scale_attn_by_inverse_layer_idx "
                        "or cross-attention are not supported; pass a standard GPT-2 checkpoint")
    return DecoderConfig(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.n_embd, num_layers=hf_cfg.n_layer,
        num_heads=hf_cfg.n_head, num_kv_heads=hf_cfg.n_head, intermediate_size=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
        max_position_embeddings=hf_cfg.n_positions, norm_eps=hf_cfg.layer_norm_epsilon, norm="layer",
        positions="learned", activation=activation(hf_cfg.activation_function), gated_mlp=False,
        qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True, tie_word_embeddings=tied, family="gpt2")


def gpt2_weights(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D weights are stored (in, out), so each is transposed; c_attn holds q, k and v side by side."""
    out = {"embed_tokens.weight": sd["transformer.wte.weight"], "embed_positions.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_layers):
        h, ours = f"transformer.h.{i}.", f"layers.{i}."
        for hf_mod, our_mod in (("ln_1", "input_norm"), ("ln_2", "post_attn_norm")):
            out[ours + our_mod + ".weight"] = sd[h + hf_mod + ".weight"]
            out[ours + our_mod + ".bias"] = sd[h + hf_mod + ".bias"]
        q, k, v = sd[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = sd[h + "attn.c_attn.bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[ours + f"attn.{name}.weight"], out[ours + f"attn.{name}.bias"] = w, b
        for hf_mod, our_mod in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                                ("mlp.c_proj", "mlp.down_proj")):
            out[ours + our_mod + ".weight"] = sd[h + hf_mod + ".weight"].t()
            out[ours + our_mod + ".bias"] = sd[h + hf_mod + ".bias"]
    return out


def decoder_from_hf(hf_model: PreTrainedModel) -> Decoder:
    """Our `Decoder` (eval, float32) holding exactly the weights of a transformers model of a supported family."""
    hf_cfg = hf_model.config
    tied = is_tied(hf_model)
    check_family(hf_cfg.model_type, hf_cfg.name_or_path or "the given model")
    if hf_cfg.model_type == "gpt2":
        cfg, to_ours = gpt2_config(hf_cfg, tied), gpt2_weights
    else:
        cfg, to_ours = llama_like_config(hf_cfg, tied), llama_like_weights
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    try:
        weights = to_ours(sd, cfg)
    except KeyError as e:
        raise UserError(f"the {cfg.family} checkpoint has no weight {e}; it is incomplete or not a standard "
                        f"{cfg.family} layout") from e
    model = Decoder(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"the {cfg.family} weights do not fit its config ({detail[:200]}); "
                        f"it is not a standard {cfg.family} layout") from e
    return model.float().eval()


def token_id(hf_model: PreTrainedModel, name: str) -> int | None:
    """A special token id from the config or generation config; for a list (several eos ids), the first."""
    value = getattr(hf_model.config, name, None)
    if value is None and hf_model.generation_config is not None:
        value = getattr(hf_model.generation_config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def load_model(path: str | Path) -> LoadedModel:
    """Read a local HF checkpoint directory, project checkpoint or .gguf file into our `Decoder`."""
    src = resolve_source(path)
    hf_model = load_transformers_model(src)
    model = decoder_from_hf(hf_model)
    pipeline = getattr(hf_model.config, "pipeline", None)
    if src.gguf_file:
        fmt = "gguf"
    elif isinstance(pipeline, dict):
        fmt = "pipeline"
        model.config.extra["pipeline"] = pipeline.get("extra", {})
    else:
        fmt = "hf"
    source = {"path": str(src.path), "format": fmt, "family": model.config.family,
              "architecture": type(hf_model).__name__}
    return LoadedModel(model, source, token_id(hf_model, "bos_token_id"), token_id(hf_model, "eos_token_id"))


def load_hf_reference(path: str | Path) -> PreTrainedModel:
    """The transformers model itself (eval, float32): the reference implementation that checks compare against."""
    return load_transformers_model(resolve_source(path))


def gguf_has_tokenizer(path: Path) -> bool:
    """Whether the GGUF metadata embeds a vocabulary (llama.cpp writes one, but a hand-made file may not)."""
    try:
        import gguf
    except ImportError as e:
        raise UserError("reading a .gguf file needs the gguf package; pip install gguf") from e
    try:
        return "tokenizer.ggml.model" in gguf.GGUFReader(str(path)).fields
    except Exception as e:
        raise UserError(f"cannot read the GGUF file {path}: {first_line(e)}; it is corrupt or truncated") from e


def export_tokenizer(path: str | Path, out_dir: str | Path) -> Path | None:
    """Write the source's tokenizer as a fast-tokenizer `tokenizer.json` in out_dir; None if it has no tokenizer.

    A checkpoint's own tokenizer.json is copied byte for byte; otherwise transformers builds the fast tokenizer
    (GPT-2's vocab.json + merges.txt, a GGUF's embedded vocabulary) and we save its backend.
    """
    src = resolve_source(path)
    if src.gguf_file:
        if not gguf_has_tokenizer(src.path):
            return None
    elif not any((src.directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "tokenizer.json"
    own = src.directory / "tokenizer.json"
    if not src.gguf_file and own.is_file():
        if own.resolve() != dest.resolve():
            shutil.copyfile(own, dest)
        return dest
    try:
        with quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(src.directory), **src.loader_kwargs())
    except Exception as e:
        raise UserError(f"cannot build a tokenizer from {src.path}: {first_line(e)}; "
                        "add a tokenizer.json to the checkpoint") from e
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{src.path} only has a slow (Python) tokenizer; add a tokenizer.json to the checkpoint")
    backend.save(str(dest))
    return dest
