"""The fused ONNX graph, built straight from a decoder's config and weights: no model in memory, no tracing.

As onnxruntime-genai's model builder and llama.cpp do, the graph is written op by op from `DecoderConfig`, and
each weight is read from the checkpoint (models/weights.py), laid out for its op and appended to the external
data file at once: peak memory is about one tensor, whatever the model's size. The graph is the one
`pipeline optimize` makes of a traced export (exporters/optimize.py), with the same tensor and node names, so
every quantization pass, the native-kernel rewrite and the runtime read it alike:

    input_ids --Gather(embed)(--Mul(embed_scale))--> x
    per layer i:  [Skip]SimplifiedLayerNormalization(x) -> qkv_proj/MatMul(+Add) [-> Split -> q/k norms, each
                  head's RMSNorm] -> GroupQueryAttention(rotary inside, cos/sin caches of the layer's rope,
                  local_window_size for a sliding layer, scale) -> o_proj/MatMul(+Add) [-> attn_out_norm]
                  -> SkipSimplifiedLayerNormalization -> gate_up_proj/MatMul -> Split -> SiLU or GELU-tanh
                  (gate) * up -> down_proj/MatMul(+Add) [-> mlp_out_norm]
    SkipSimplifiedLayerNormalization(final norm) -> lm_head/MatMul -> logits

The bracketed steps are the switches of models/decoder.py (Qwen3's and Gemma 3's q/k norms, Gemma's sandwich
norms and scaled embeddings, Mistral's and Gemma's sliding windows): each family is a few overrides of one graph.

The traced export (exporters/export.py) stays as the independent oracle: the built graph is checked against
PyTorch on a prefill and a decode step through the KV cache, in full for models that fit the check's memory,
else on its first layers (built alone) and by running the full graph once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.optimize import COS_CACHE, SEQLENS_K, SIN_CACHE, TOTAL_SEQ_LEN, add_gqa_inputs, rotary_caches
from models.decoder import DecoderConfig
from models.errors import UserError
from models.weights import WeightSource
from runtimes.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, Contract, past_key, past_value,
                               present_key, present_value, write_contract)

OPSET = 17
# each layer's weight MatMuls: (scope inside /model/layers.{i}/, name) -> our modules stacked into its weight
LAYER_LINEARS = {("attn/", "qkv_proj"): ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                 ("attn/", "o_proj"): ("attn.o_proj",),
                 ("mlp/", "gate_up_proj"): ("mlp.gate_proj", "mlp.up_proj"),
                 ("mlp/", "down_proj"): ("mlp.down_proj",)}
HEAD = "/model/lm_head/MatMul"
INLINE_BYTES = 1024  # smaller tensors stay in the .onnx file (onnx's own save threshold)
ALIGN = 64           # external data offsets, so onnxruntime can map tensors aligned


def contract_for_config(c: DecoderConfig, fused: bool) -> Contract:
    """Every field of the contract, from the decoder's config."""
    rope = c.positions == "rope"
    return Contract(num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                    head_dim=c.head_dim, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                    max_position_embeddings=c.max_position_embeddings,
                    attention_windows=tuple(c.window(i) for i in range(c.num_layers)),
                    kv_dtype="float32", family=c.family, rope_theta=c.rope_theta if rope else None,
                    rope_scaling=c.rope_scaling, fused_attention=fused,
                    rope_local_theta=c.rope_local_theta if rope else None,
                    rotary_dim=c.rotary_dim if rope and c.rotary_dim != c.head_dim else None)


def refusal(c: DecoderConfig) -> str | None:
    """Why the builder cannot emit this config (it needs the Llama shape and GroupQueryAttention's limits)."""
    if c.norm != "rms" or c.positions != "rope" or not c.gated_mlp or c.activation not in ("silu", "gelu_tanh"):
        return f"the graph builder emits RMSNorm + rotary + gated-MLP decoders; {c.family} is not one"
    if c.head_dim % 16:
        return (f"head_dim {c.head_dim} is not a multiple of 16, which onnxruntime's GroupQueryAttention "
                "requires")
    if c.rotary_dim % 16:
        return (f"the rotated width {c.rotary_dim} (partial_rotary_factor {c.partial_rotary_factor} of head_dim "
                f"{c.head_dim}) is not a multiple of 16, which onnxruntime's GroupQueryAttention requires")
    return None


class ExternalData:
    """Append tensors to `<model>.data` as they are made; the TensorProtos only point into it."""

    def __init__(self, model_path: Path):
        self.location = model_path.name + ".data"
        self.file = open(model_path.with_name(self.location), "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        t = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        if array.nbytes < INLINE_BYTES:
            t.raw_data = array.tobytes()
            return t
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(memoryview(array).cast("B"))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        self.offset += array.nbytes
        return t

    def close(self) -> None:
        self.file.close()


class Builder:
    """Emits the nodes and initializers of one decoder graph in order; `weights.tensor(name)` supplies each
    weight in our naming (models/decoder.py), read only when its op is emitted."""

    def __init__(self, weights: WeightSource, data: ExternalData, num_layers: int, contract: Contract):
        self.w, self.c, self.data, self.contract = weights, weights.config, data, contract
        self.num_layers = num_layers
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.data.tensor(name, array))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def linear(self, x: str, i: int, scope: str, name: str, bias: bool) -> str:
        """x @ W (+ b), W = the parts' (out, in) weights stacked on `out` and transposed to MatMul's (in, out)."""
        parts = [f"layers.{i}.{m}" for m in LAYER_LINEARS[scope, name]]
        scope = f"/model/layers.{i}/{scope}"
        w = np.concatenate([self.w.tensor(f"{p}.weight") for p in parts], axis=0).T
        out = self.node("MatMul", [x, self.init(f"{scope}{name}.weight", w)], [f"{scope}{name}/MatMul_output_0"],
                        f"{scope}{name}/MatMul")[0]
        if bias:
            b = np.concatenate([self.w.tensor(f"{p}.bias") for p in parts])
            out = self.node("Add", [out, self.init(f"{scope}{name}.bias", b)], [f"{scope}{name}/Add_output_0"],
                            f"{scope}{name}/Add")[0]
        return out

    def norm(self, residual: str, delta: str | None, weight: str, scope: str) -> tuple[str, str]:
        """RMSNorm of residual (+ delta): (normed, new residual); the first norm has no skip input. The sum is an
        output even after the last layer, where nothing reads it: the layer-wise check does."""
        gamma = self.init(weight, self.w.tensor(weight))
        normed = f"{scope}/Mul_1_output_0"
        if delta is None:
            self.node("SimplifiedLayerNormalization", [residual, gamma], [normed], f"{scope}/SimplifiedLayerNorm",
                      epsilon=self.c.norm_eps, axis=-1, stash_type=1)
            return normed, residual
        total = f"{scope}/Add_output_0"
        self.node("SkipSimplifiedLayerNormalization", [residual, delta, gamma], [normed, "", "", total],
                  f"{scope}/SkipSimplifiedLayerNorm", domain="com.microsoft", epsilon=self.c.norm_eps)
        return normed, total

    def plain_norm(self, x: str, weight: str, scope: str) -> str:
        """RMSNorm of x over its last axis (a sublayer's output, or each head's vector)."""
        return self.node("SimplifiedLayerNormalization", [x, self.init(weight, self.w.tensor(weight))],
                         [f"{scope}/Mul_1_output_0"], f"{scope}/SimplifiedLayerNorm", epsilon=self.c.norm_eps,
                         axis=-1, stash_type=1)[0]

    def head_norm(self, x: str, heads: int, weight: str, scope: str) -> str:
        """Each head's RMSNorm (Qwen3, Gemma 3): (B, S, heads * head_dim) viewed as heads, normed, flattened."""
        hd = self.c.head_dim
        split = self.init(f"{scope}.heads", np.array([0, 0, heads, hd], np.int64))
        flat = self.init(f"{scope}.flat", np.array([0, 0, heads * hd], np.int64))
        x = self.node("Reshape", [x, split], [f"{scope}/Reshape_output_0"], f"{scope}/Reshape")[0]
        x = self.plain_norm(x, weight, scope)
        return self.node("Reshape", [x, flat], [f"{scope}/Reshape_1_output_0"], f"{scope}/Reshape_1")[0]

    def attention_inputs(self, i: int, qkv: str, attn: str) -> list[str]:
        """GroupQueryAttention's query/key/value inputs: the packed projection, or with q/k norms its three parts,
        normed per head (the op takes packed or separate inputs alike)."""
        c, p = self.c, f"layers.{i}."
        if not c.qk_norm:
            return [qkv, "", ""]
        sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        split = self.init(f"{attn}qkv_proj.split", np.array(sizes, np.int64))
        q, k, v = self.node("Split", [qkv, split], [f"{attn}q_proj/MatMul_output_0", f"{attn}k_proj/MatMul_output_0",
                                                    f"{attn}v_proj/MatMul_output_0"], f"{attn}qkv_proj/Split", axis=-1)
        return [self.head_norm(q, c.num_heads, f"{p}attn.q_norm.weight", f"{attn}q_norm"),
                self.head_norm(k, c.num_kv_heads, f"{p}attn.k_norm.weight", f"{attn}k_norm"), v]

    def gqa_attributes(self, i: int) -> dict:
        c = self.c
        attrs = dict(num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, do_rotary=int(c.positions == "rope"),
                     rotary_interleaved=0)
        if c.attention_scale is not None:
            attrs["scale"] = float(c.attention_scale)
        if c.attn_softcap is not None:
            attrs["softcap"] = float(c.attn_softcap)
        if c.window(i) is not None:  # onnxruntime counts the query itself in the window, as transformers does
            attrs["local_window_size"] = c.window(i)
        return attrs

    def layer(self, i: int, residual: str, delta: str | None) -> tuple[str, str]:
        c, p = self.c, f"layers.{i}."
        scope = f"/model/layers.{i}/"
        h, residual = self.norm(residual, delta, f"{p}input_norm.weight", f"{scope}input_norm")
        attn = f"{scope}attn/"
        qkv = self.linear(h, i, "attn/", "qkv_proj", c.qkv_bias)
        cos, sin = rotary_caches(self.contract, i)
        y = self.node("GroupQueryAttention",
                      [*self.attention_inputs(i, qkv, attn), past_key(i), past_value(i), SEQLENS_K, TOTAL_SEQ_LEN,
                       cos, sin],
                      [f"{attn}GroupQueryAttention_output_0", present_key(i), present_value(i)],
                      f"{attn}GroupQueryAttention", domain="com.microsoft", **self.gqa_attributes(i))[0]
        a = self.linear(y, i, "attn/", "o_proj", c.o_bias)
        if c.sandwich_norm:
            a = self.plain_norm(a, f"{p}attn_out_norm.weight", f"{scope}attn_out_norm")
        h, residual = self.norm(residual, a, f"{p}post_attn_norm.weight", f"{scope}post_attn_norm")
        mlp = f"{scope}mlp/"
        gu = self.linear(h, i, "mlp/", "gate_up_proj", c.mlp_bias)
        split = self.init(f"{mlp}gate_up_proj.split", np.array([c.intermediate_size] * 2, np.int64))
        gate, up = self.node("Split", [gu, split], [f"{mlp}gate_proj/MatMul_output_0", f"{mlp}up_proj/MatMul_output_0"],
                             f"{mlp}gate_up_proj/Split", axis=-1)
        if c.activation == "gelu_tanh":
            act = self.node("FastGelu", [gate], [f"{mlp}Mul_output_0"], f"{mlp}FastGelu", domain="com.microsoft")[0]
        else:
            sig = self.node("Sigmoid", [gate], [f"{mlp}Sigmoid_output_0"], f"{mlp}Sigmoid")[0]
            act = self.node("Mul", [gate, sig], [f"{mlp}Mul_output_0"], f"{mlp}Mul")[0]
        prod = self.node("Mul", [act, up], [f"{mlp}Mul_1_output_0"], f"{mlp}Mul_1")[0]
        m = self.linear(prod, i, "mlp/", "down_proj", c.mlp_bias)
        if c.sandwich_norm:
            m = self.plain_norm(m, f"{p}mlp_out_norm.weight", f"{scope}mlp_out_norm")
        return m, residual

    def embedding(self) -> tuple[str, str]:
        """(the embedded tokens, lm_head's weight). A tied head's table is stored once, as lm_head's (hidden,
        vocab) MatMul weight, and the tokens are gathered from its columns (Gather on axis 1, then a Transpose
        of the few gathered values); exporters/quantization/embedding.untie_embeddings splits it again for the
        quantizers, which give the two readers different forms."""
        out = residual(0)
        scale = self.c.embed_scale
        rows = out + "_unscaled" if scale != 1.0 else out
        if not self.c.tie_word_embeddings:
            table = self.init("model.embed_tokens.weight", self.w.tensor("embed_tokens.weight"))
            self.node("Gather", [table, INPUT_IDS], [rows], "/model/embed_tokens/Gather")
            head = self.init("model.lm_head.weight", self.w.tensor("lm_head.weight").T)
        else:
            head = self.init("model.lm_head.weight", self.w.tensor("lm_head.weight").T)
            columns = self.node("Gather", [head, INPUT_IDS], [out + "_columns"], "/model/embed_tokens/Gather",
                                axis=1)
            self.node("Transpose", columns, [rows], "/model/embed_tokens/Transpose", perm=[1, 2, 0])
        if scale != 1.0:  # Gemma: sqrt(hidden_size), rounded to float32 as transformers does
            factor = self.init("/model/embed_tokens/scale", np.array(scale, np.float32))
            self.node("Mul", [rows, factor], [out], "/model/embed_tokens/Mul")
        return out, head

    def graph(self, on_layer: Callable[[int], None] | None = None) -> None:
        x, head = self.embedding()
        residual, delta = x, None
        for i in range(self.num_layers):
            delta, residual = self.layer(i, residual, delta)
            if on_layer is not None:
                on_layer(i)
        residual, delta = self.keep_last(residual, delta)
        h, _ = self.norm(residual, delta, "norm.weight", "/model/norm")
        cap = self.c.final_softcap
        out = self.node("MatMul", [h, head], [LOGITS if cap is None else "/model/lm_head/MatMul_output_0"],
                        HEAD)[0]
        if cap is not None:  # Gemma 2: cap * tanh(logits / cap)
            c = self.init("/model/softcap/cap", np.array(cap, np.float32))
            scaled = self.node("Div", [out, c], ["/model/softcap/Div_output_0"], "/model/softcap/Div")[0]
            t = self.node("Tanh", [scaled], ["/model/softcap/Tanh_output_0"], "/model/softcap/Tanh")[0]
            self.node("Mul", [t, c], [LOGITS], "/model/softcap/Mul")

    def keep_last(self, residual: str, delta: str) -> tuple[str, str]:
        """The last `logits_to_keep` positions of the stream (all when 0, its default), before the final norm:
        a prefill that generates needs one row of logits, not one per prompt token (at a 151,936-token vocabulary
        and 1,536 prompt tokens those are 0.9 GB and most of the prefill's lm_head FLOPs)."""
        s = "/model/keep/"
        zero = self.init(f"{s}zero", np.array(0, np.int64))
        end = self.init(f"{s}end", np.array([np.iinfo(np.int64).max], np.int64))
        axis = self.init(f"{s}axis", np.array([1], np.int64))
        first = self.init(f"{s}axis0", np.array([0], np.int64))
        start = self.node("Where", [self.node("Greater", [LOGITS_TO_KEEP, zero], [f"{s}some"], f"{s}Greater")[0],
                                    self.node("Neg", [LOGITS_TO_KEEP], [f"{s}neg"], f"{s}Neg")[0], zero],
                          [f"{s}start"], f"{s}Where")[0]
        start = self.node("Unsqueeze", [start, first], [f"{s}starts"], f"{s}Unsqueeze")[0]
        return tuple(self.node("Slice", [x, start, end, axis], [f"{s}{which}"], f"{s}Slice_{which}")[0]
                     for x, which in ((residual, "residual"), (delta, "delta")))


def weight_parts(c: DecoderConfig) -> dict[str, list[str]]:
    """Each weight MatMul of the built graph -> the parameters (our names) stacked into its weight, in order."""
    out = {f"/model/layers.{i}/{scope}{name}/MatMul": [f"layers.{i}.{m}.weight" for m in modules]
           for i in range(c.num_layers) for (scope, name), modules in LAYER_LINEARS.items()}
    out[HEAD] = ["lm_head.weight"]
    return out


def io_value(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def build_graph(weights: WeightSource, out_path: str | Path,
                on_layer: Callable[[int], None] | None = None) -> Contract:
    """Write the fused graph of `weights` to `out_path` + `out_path.data`; returns its contract. `on_layer(i)`
    is called as each layer is done (progress)."""
    out_path = Path(out_path)
    why = refusal(weights.config)
    if why:
        raise UserError(why)
    n = weights.config.num_layers
    contract = contract_for_config(weights.config, fused=True)
    data = ExternalData(out_path)
    try:
        b = Builder(weights, data, n, contract)
        b.graph(on_layer)
    finally:
        data.close()
    c = contract

    def kv(length: str) -> list:
        return ["batch_size", c.num_kv_heads, length, c.head_dim]

    inputs = [io_value(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]),
              io_value(ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              io_value(LOGITS_TO_KEEP, TensorProto.INT64, [])]  # with a default: the initializer below
    outputs = [io_value(LOGITS, TensorProto.FLOAT, ["batch_size", "kept_sequence_length", c.vocab_size])]
    for i in range(n):
        inputs += [io_value(name(i), TensorProto.FLOAT, kv("past_sequence_length")) for name in (past_key, past_value)]
        outputs += [io_value(name(i), TensorProto.FLOAT, kv("total_sequence_length"))
                    for name in (present_key, present_value)]
    keep_default = helper.make_tensor(LOGITS_TO_KEEP, TensorProto.INT64, [], [0])
    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, b.inits + [keep_default])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="pipeline", ir_version=8)
    add_gqa_inputs(model, contract)
    gqa_first = [nd for nd in model.graph.node if nd.name.startswith("gqa/")]  # seqlens before their readers
    rest = [nd for nd in model.graph.node if not nd.name.startswith("gqa/")]
    del model.graph.node[:]
    model.graph.node.extend(gqa_first + rest)
    write_contract(model, contract)
    onnx.save_model(model, str(out_path))
    return contract


# Sources up to this size are also compared in full with the model transformers loads (the independent route; it
# costs a second for them). Every source is checked layer by layer; `pipeline check` compares any variant with
# the transformers model later, so at export the full comparison would only repeat it at the cost of two more
# copies of the model.
ORACLE_PARAMETERS = 32_000_000


def residual(i: int) -> str:
    """The residual stream entering layer i (i = -1: the final norm), as the graph names it."""
    if i == 0:
        return "/model/embed_tokens/Gather_output_0"
    return "/model/norm/Add_output_0" if i < 0 else f"/model/layers.{i}/input_norm/Add_output_0"


def check_built(weights: WeightSource, built: Path, contract: Contract, reference=None, atol: float = 1e-4) -> dict:
    """The built graph against PyTorch on a prefill (6 tokens) and one decode step through the KV cache it
    returned. With `reference` (a Decoder loaded by transformers: the independent route), the logits and cache
    of the whole model; without, layer by layer: each layer of our decoder, its weights read from the source one
    layer at a time, is run on the graph's own input to that layer and compared with the graph's output of it,
    then the final norm and head with the logits, so memory stays near one layer. Returns {"how",
    "max_abs_diff": {step: max relative difference}}; one over `atol` is a UserError naming where."""
    from exporters.export import parity

    if reference is not None:
        results = {"layer by layer": max(check_layerwise(weights, built, contract, atol).values())}
        for step, seq, past in (("prefill", 6, 0), ("decode", 1, 7)):
            name, diff = parity(reference, built, contract, batch=1, seq=seq, past=past).worst
            if not diff <= 10 * atol:
                raise UserError(f"the built graph differs from PyTorch at {step}: output {name!r} by {diff:.3g} "
                                f"(tolerance {10 * atol}); please report it with the checkpoint's config.json")
            results[step] = diff
        return {"how": "full and layer by layer", "max_abs_diff": results}
    return {"how": "layer by layer", "max_abs_diff": check_layerwise(weights, built, contract, atol)}


def graph_steps(built: Path, contract: Contract, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Every residual, the logits and the presents of a prefill of tokens[:-1] and a decode step of the last one,
    from a copy of the graph that also outputs the residuals (beside the model: same external data)."""
    from exporters.calibration import cpu_session  # errors only: a default-valued input is not news

    n = contract.num_layers
    streams = [residual(i) for i in range(n)] + [residual(-1)]
    proto = onnx.load(str(built), load_external_data=False)
    proto.graph.output.extend(helper.make_empty_tensor_value_info(s) for s in streams)
    probe = built.with_name(f".probe-{built.name}")
    try:
        onnx.save_model(proto, str(probe))
        sess = cpu_session(probe)
    finally:
        probe.unlink(missing_ok=True)
    names = [o.name for o in sess.get_outputs()]
    past = {k: np.zeros((1, contract.num_kv_heads, 0, contract.head_dim), np.float32)
            for i in range(n) for k in (past_key(i), past_value(i))}
    steps = []
    for start, stop in ((0, len(tokens) - 1), (len(tokens) - 1, len(tokens))):
        feeds = {INPUT_IDS: tokens[None, start:stop], ATTENTION_MASK: np.ones((1, stop), np.int64), **past}
        out = dict(zip(names, sess.run(names, feeds)))
        steps.append({"past": past, "start": start, **out})
        past = {k: out[k.replace("past_key_values", "present")] for k in past}
    return steps


def as_torch(a: np.ndarray):
    """A tensor over `a`, copied only when `a` is read-only (a cached weight)."""
    import torch

    return torch.from_numpy(a if a.flags.writeable else a.copy())


def check_layerwise(weights: WeightSource, built: Path, contract: Contract, atol: float) -> dict[str, float]:
    import torch

    from models.decoder import Block, RMSNorm, attention_inputs

    cfg = weights.config
    tokens = np.random.default_rng(0).integers(0, contract.vocab_size, 7)
    steps = graph_steps(built, contract, tokens)
    worst = {"prefill": 0.0, "decode": 0.0}

    def compare(step: str, where: str, ref, got) -> None:
        ref = ref.detach().numpy() if hasattr(ref, "detach") else ref
        diff = float(np.abs(ref - got).max() / max(1.0, float(np.abs(ref).max())))
        if not diff <= atol:
            raise UserError(f"the built graph differs from PyTorch at {step}, {where}, by {diff:.3g} relative "
                            f"(tolerance {atol}); please report it with the checkpoint's config.json")
        worst[step] = max(worst[step], diff)

    def per_layer(step: dict) -> list[tuple]:
        s, start = step[residual(0)].shape[1], step["start"]
        positions = torch.arange(start, start + s)[None]
        return attention_inputs(cfg, positions, start, torch.ones(1, start + s, dtype=torch.int64))

    geometry = [per_layer(step) for step in steps]
    with torch.no_grad():
        for i in range(contract.num_layers):
            block = Block(cfg).eval()
            block.load_state_dict({k: as_torch(weights.tensor(f"layers.{i}.{k}")) for k in block.state_dict()})
            for (name, step), layers in zip((("prefill", steps[0]), ("decode", steps[1])), geometry):
                cos, sin, mask = layers[i]
                past = None
                if step["start"]:
                    past = tuple(torch.from_numpy(step["past"][k(i)]) for k in (past_key, past_value))
                out, (k, v) = block(torch.from_numpy(step[residual(i)]), cos, sin, mask, past)
                after = residual(i + 1 if i + 1 < contract.num_layers else -1)
                compare(name, f"layer {i}", out, step[after])
                compare(name, f"layer {i} keys", k, step[present_key(i)])
                compare(name, f"layer {i} values", v, step[present_value(i)])
        norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        norm.weight.data = as_torch(weights.tensor("norm.weight"))
        head = as_torch(weights.tensor("lm_head.weight"))
        for name, step in (("prefill", steps[0]), ("decode", steps[1])):
            logits = norm(torch.from_numpy(step[residual(-1)])) @ head.T
            if cfg.final_softcap is not None:
                logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
            compare(name, "the logits", logits, step[LOGITS])
    return worst
