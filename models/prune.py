"""Structured pruning in the spirit of Minitron and Sheared-LLaMA: a smaller model of the same family, whose
every kept weight is the source's own.

Importance comes from activations on calibration text (the corpus's "calib" split), measured in one pass over
the source model:
- an MLP channel j: the root-mean-square of its activation (the input of down_proj) times the norm of
  down_proj's column j, i.e. how much it writes into the residual stream;
- a key/value group (grouped-query attention prunes whole groups: a key/value head with its query heads): the
  same for its heads' share of o_proj's input and columns;
- an embedding channel: the root-mean-square of that channel at the output of every norm in the model (the
  residual stream as each sublayer and the head read it);
- a layer: 1 - the mean cosine between its input and output hidden states (a layer that barely turns the stream
  matters least; ShortGPT's Block Influence).
All scores are taken on the source model, then the axes are cut together: the least important layers go, then
in each layer the least important groups and MLP channels, then the least important embedding channels from
the embeddings, every norm and every projection's input or output. Kept widths are rounded to a multiple of
`multiple` (32: the quantizers' block), so the pruned model quantizes as well as the source.

The result is a normal Hugging Face checkpoint of the source's family (config.json with the new sizes and an
explicit head_dim, model.safetensors, the tokenizer): transformers loads it and `pipeline export` builds it.
`pruning.json` beside it records what was kept (layer indices, channels, groups), which `distill` reads to map
the student's hidden states onto the teacher's.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.errors import UserError
from models.files import publish, staging_dir

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")
ROWS_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")  # read h
ROWS_OUT = ("self_attn.o_proj", "mlp.down_proj")  # write h


@dataclass(frozen=True)
class PruneConfig:
    mlp: float = 0.0          # share of each layer's MLP channels removed
    heads: float = 0.0        # share of each layer's key/value groups removed (with their query heads)
    hidden: float = 0.0       # share of the embedding channels removed
    layers: int = 0           # whole layers removed
    corpus: str | None = None  # text file or directory; None: this Python's standard library sources
    calib_windows: int = 32   # windows of the "calib" split that importance is measured on
    eval_windows: int = 32    # windows of the held-out "valid" split that perplexity is measured on
    seq_len: int = 256        # tokens per window
    multiple: int = 32        # kept MLP and embedding widths are multiples of this

    def check(self) -> None:
        for name in ("mlp", "heads", "hidden"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"--{name} {value} is not a share in [0, 1): give the fraction to remove, e.g. 0.25")
        if self.layers < 0:
            raise UserError(f"--layers {self.layers} is negative: give the number of layers to remove")
        if not (self.mlp or self.heads or self.hidden or self.layers):
            raise UserError("nothing to prune: give at least one of --mlp, --heads, --hidden, --layers")


def kept(total: int, share: float, multiple: int) -> int:
    """How many of `total` stay when `share` is removed, rounded to a multiple (at least one multiple), and
    never more than total."""
    if share == 0:
        return total
    k = max(multiple, int(round(total * (1 - share) / multiple)) * multiple)
    return min(total, k)


def parameter_counts(model) -> dict:
    """Parameters in all, outside the embeddings and head, and read per decoded token (every matrix of every
    layer, plus the head's vocab x hidden: the embedding lookup reads one row)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # a tied head counts once
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    non_embedding = total - embed - (0 if tied else head.numel())
    per_token = non_embedding + cfg.vocab_size * cfg.hidden_size
    return {"parameters": total, "non_embedding": non_embedding, "per_token": per_token,
            "bytes_per_token_fp32": 4 * per_token, "bytes_per_token_int8": per_token}


class Importance:
    """Sums of squares gathered by forward hooks over the calibration windows."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.layers = list(model.model.layers)
        n = len(self.layers)
        self.mlp = [torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in range(n)]
        width = cfg.num_attention_heads * head_dim(cfg)
        self.attn = [torch.zeros(width, dtype=torch.float64) for _ in range(n)]
        self.hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
        self.influence = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0
        self.calls = 0
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._sumsq(self.mlp, i)))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._sumsq(self.attn, i)))
            self.handles.append(layer.register_forward_hook(self._influence(i), with_kwargs=True))
            for name in LAYER_NORMS:
                if hasattr(layer, name):
                    self.handles.append(getattr(layer, name).register_forward_hook(self._hidden))
        self.handles.append(self.model.model.norm.register_forward_hook(self._hidden))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _sumsq(self, store, i):
        def hook(module, args):
            x = args[0].detach().double()
            store[i] += x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        return hook

    def _hidden(self, module, args, output):
        self.hidden += output.detach().double().pow(2).reshape(-1, output.shape[-1]).sum(0)

    def _influence(self, i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.detach().double(), y.detach().double(), dim=-1)
            self.influence[i] += (1 - cos).sum()
        return hook

    @torch.no_grad()
    def measure(self, data: torch.Tensor, batch_size: int = 4) -> None:
        for i in range(0, len(data), batch_size):
            batch = data[i:i + batch_size, :-1]
            self.model(input_ids=batch, use_cache=False)
            self.tokens += batch.numel()

    def scores(self) -> dict:
        """Per layer MLP-channel and key/value-group scores, embedding-channel scores and layer influence."""
        cfg = self.model.config
        hd = head_dim(cfg)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        mlp, groups = [], []
        for i, layer in enumerate(self.layers):
            rms = (self.mlp[i] / self.tokens).sqrt()
            mlp.append(rms * layer.mlp.down_proj.weight.detach().double().norm(dim=0))
            a = (self.attn[i] / self.tokens).sqrt() * layer.self_attn.o_proj.weight.detach().double().norm(dim=0)
            groups.append(a.reshape(cfg.num_key_value_heads, rep * hd).norm(dim=1))
        return {"mlp": mlp, "groups": groups, "hidden": (self.hidden / self.tokens).sqrt(),
                "layers": self.influence / self.tokens}


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (so kept channels keep their layout)."""
    return torch.topk(scores, k).indices.sort().values


def plan(model, scores: dict, config: PruneConfig) -> dict:
    """What stays: layer indices, embedding channels, and per kept layer its groups and MLP channels."""
    cfg = model.config
    n = cfg.num_hidden_layers
    if config.layers >= n:
        raise UserError(f"--layers {config.layers} would remove all {n} layers; remove fewer")
    layers = top(scores["layers"], n - config.layers) if config.layers else torch.arange(n)
    hidden = top(scores["hidden"], kept(cfg.hidden_size, config.hidden, config.multiple))
    n_groups = cfg.num_key_value_heads
    keep_groups = n_groups if not config.heads else max(1, round(n_groups * (1 - config.heads)))
    keep_mlp = kept(cfg.intermediate_size, config.mlp, config.multiple)
    return {"layers": layers.tolist(), "hidden": hidden.tolist(),
            "groups": [top(scores["groups"][i], keep_groups).tolist() for i in layers.tolist()],
            "mlp": [top(scores["mlp"][i], keep_mlp).tolist() for i in layers.tolist()]}


def group_rows(groups: list[int], rep: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, key/value rows) of the kept groups in q_proj and in k_proj/v_proj."""
    q = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in groups])
    kv = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
    return q, kv


def sliced_state_dict(model, keep: dict) -> dict[str, torch.Tensor]:
    """The source's tensors cut to what `keep` says, under the names of a model with only the kept layers."""
    cfg = model.config
    sd = model.state_dict()
    hd, rep = head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    H = torch.tensor(keep["hidden"])
    out = {}
    for name, t in sd.items():
        if not name.startswith("model.layers."):
            t = t.detach()
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = t[:, H]
            elif name == "model.norm.weight":
                out[name] = t[H]
            else:
                out[name] = t
    for new, old in enumerate(keep["layers"]):
        prefix = f"model.layers.{old}."
        q_rows, kv_rows = group_rows(keep["groups"][new], rep, hd)
        M = torch.tensor(keep["mlp"][new])
        for name, t in sd.items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            module, kind = local.rsplit(".", 1)
            t = t.detach()
            if module == "self_attn.q_proj":
                t = t[q_rows]
            elif module in ("self_attn.k_proj", "self_attn.v_proj"):
                t = t[kv_rows]
            elif module in ("mlp.gate_proj", "mlp.up_proj"):
                t = t[M]
            elif module == "self_attn.o_proj" and kind == "weight":
                t = t[:, q_rows]
            elif module == "mlp.down_proj" and kind == "weight":
                t = t[:, M]
            if kind == "weight" and module in ROWS_IN:
                t = t[:, H]
            elif module in ROWS_OUT:
                t = t[H] if kind == "bias" else t[H, :]
            elif module in LAYER_NORMS:
                t = t[H]
            out[f"model.layers.{new}.{local}"] = t.contiguous().clone()
    return out


def pruned_config(model, keep: dict):
    cfg = model.config
    d = cfg.to_dict()
    d.pop("quantization_config", None)  # a GGUF source's: the pruned weights are plain float32
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    d.update(hidden_size=len(keep["hidden"]), intermediate_size=len(keep["mlp"][0]),
             num_key_value_heads=len(keep["groups"][0]), num_attention_heads=len(keep["groups"][0]) * rep,
             head_dim=head_dim(cfg), num_hidden_layers=len(keep["layers"]))
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in keep["layers"]]
    if isinstance(d.get("max_window_layers"), int):
        d["max_window_layers"] = sum(1 for i in keep["layers"] if i < d["max_window_layers"])
    return type(cfg).from_dict(d)


def build_pruned(model, keep: dict):
    """A fresh model of the source's class with the pruned config, holding exactly the sliced tensors."""
    from transformers import AutoModelForCausalLM

    config = pruned_config(model, keep)
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    small.load_state_dict(sliced_state_dict(model, keep), strict=True)
    if config.tie_word_embeddings:
        small.tie_weights()
    return small.eval()


def check_family(model, config: PruneConfig) -> None:
    family = model.config.model_type
    if family not in FAMILIES:
        raise UserError(f"pruning supports {', '.join(FAMILIES)}; this checkpoint is {family!r}")
    if config.hidden and family == "gemma3_text":
        raise UserError("--hidden is refused for Gemma 3: its embeddings are scaled by sqrt(hidden_size) and its "
                        "head is tied to them, so a narrower stream cannot keep the same logits; prune --mlp, "
                        "--heads or --layers")


def prune(source: str | Path, out: str | Path, config: PruneConfig, log=None) -> dict:
    """Prune `source` (HF directory or .gguf) into the HF checkpoint directory `out` and report before/after:
    parameters, weights read per decoded token and held-out perplexity."""
    from models.hf import load_hf_reference, token_id
    from models.textdata import corpus_windows, perplexity, source_tokenizer

    config.check()
    say = log or (lambda msg: None)
    out = Path(out).resolve()
    model = load_hf_reference(source)
    check_family(model, config)
    with tempfile.TemporaryDirectory(prefix="pipeline-prune-") as tmp:
        tok = source_tokenizer(source, Path(tmp),
                               token_id(model, "eos_token_id") if token_id(model, "eos_token_id") is not None
                               else token_id(model, "bos_token_id"))
        data = corpus_windows(tok, config.corpus, config.seq_len)
    calib, held_out = data["calib"][:config.calib_windows], data["valid"][:config.eval_windows]
    say(f"importance on {len(calib)} calibration windows of {config.seq_len} tokens")
    with Importance(model) as imp:
        imp.measure(calib)
    keep = plan(model, imp.scores(), config)
    small = build_pruned(model, keep)
    say(f"perplexity on {len(held_out)} held-out windows")
    before = {**parameter_counts(model), "perplexity": perplexity(model, held_out)}
    after = {**parameter_counts(small), "perplexity": perplexity(small, held_out)}
    record = {"source": str(Path(source).resolve()), "config": asdict(config), "kept": keep,
              "shape_before": shape(model.config), "shape_after": shape(small.config),
              "before": before, "after": after,
              "non_embedding_ratio": after["non_embedding"] / before["non_embedding"],
              "per_token_ratio": after["per_token"] / before["per_token"],
              "calib_tokens": imp.tokens, "eval_tokens": int(held_out[:, 1:].numel())}
    save_pretrained_dir(small, source, out, {"pruning.json": record})
    return {**record, "out": str(out)}


def shape(cfg) -> dict:
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": head_dim(cfg)}


def save_pretrained_dir(model, tokenizer_source: str | Path, out: Path, records: dict[str, dict],
                        state_dict: dict | None = None) -> Path:
    """A transformers model as a checkpoint directory (safetensors, config, generation config, the source's
    tokenizer and our JSON records), written aside and renamed into place whole."""
    from models.hf import export_tokenizer, quiet_progress, resolve_source

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output directory")
    with staging_dir(out) as staging:
        tmp = staging / out.name
        with quiet_progress():
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            src = resolve_source(tokenizer_source)
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(str(src.directory), **src.loader_kwargs()).save_pretrained(str(tmp))
            except Exception:  # a tokenizer transformers cannot wrap: at least its tokenizer.json
                export_tokenizer(tokenizer_source, tmp)
        for name, data in records.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        publish(tmp, out)
    return out


def recovered(teacher: float, pruned: float, student: float) -> dict:
    """Share of what pruning lost that distillation won back: of the perplexity itself, and of the loss (its
    log, the stricter of the two: a perplexity halfway back is less than halfway in loss)."""
    def share(t, p, s):
        return (p - s) / (p - t) if p > t else float("nan")
    return {"perplexity": share(teacher, pruned, student),
            "loss": share(math.log(teacher), math.log(pruned), math.log(student))}
