"""ONNX -> ONNX graph fusion: every layer's attention becomes one GroupQueryAttention, norms are fused.

Order of work:
  1. `FuseGroupQueryAttention` (ours): onnxruntime.transformers has no fusion for a KV-cache decoder exported
     from PyTorch with rotary inside attention, so each layer's attention subgraph — found by the exporter's
     node scopes `/model/layers.{i}/attn/` — is replaced by com.microsoft.GroupQueryAttention with the rotary
     embedding computed inside it (do_rotary=1, cos/sin caches rebuilt from the contract's rope parameters).
  2. onnxruntime.transformers' optimizer: RMSNorm -> SimplifiedLayerNormalization, residual add + RMSNorm ->
     SkipSimplifiedLayerNormalization (LayerNorm / SkipLayerNormalization and FastGelu for GPT-2).
  3. Dead nodes (mask and rotary tables the fused ops no longer need) are removed; op counts are checked:
     a layer whose attention was not fused is an error, never a silent slow graph.
  4. `--fp16`: float16 weights, activations and KV cache (for the CUDA/TensorRT providers).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD, load_onnx, move_model, save_model
from models.errors import UserError
from models.files import staging_dir
from models.rope import long_context, rope_attention_factor, rope_inv_freq
from runtimes.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, Contract, past_key, past_names,
                               past_value, present_key, present_names, present_value, read_contract, write_contract)

FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "LayerNormalization", "SkipLayerNormalization",
             "FastGelu", "Gelu", "BiasGelu", "RotaryEmbedding")
SEQLENS_K = "gqa.seqlens_k"
TOTAL_SEQ_LEN = "gqa.total_sequence_length"
COS_CACHE = "gqa.cos_cache"
SIN_CACHE = "gqa.sin_cache"
TRACED_FUSION_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")  # the attention FuseGroupQueryAttention knows
LOCAL_CACHES = ("gqa.cos_cache_local", "gqa.sin_cache_local")  # sliding layers with a rotary base of their own


@dataclass(frozen=True)
class OptimizeConfig:
    fp16: bool = False  # float16 weights/activations/KV cache: halves size, for GPU providers
    check_parity: bool = True  # compare fused and unfused outputs on a prefill and a decode step after fusing


class FuseGroupQueryAttention:
    """Replace one layer's attention subgraph with com.microsoft.GroupQueryAttention.

    Matched, per layer i (names from the exporter's module scopes):

        h --q_proj/MatMul(+Add)--> q --Reshape-Transpose-[rotary: Mul,Slice,Neg,Concat,Add]--+
        h --k_proj/MatMul(+Add)--> k --Reshape-Transpose-[rotary]--Concat(past_key)--> present_key(i)
        h --v_proj/MatMul(+Add)--> v --Reshape-Transpose-----------Concat(past_value)-> present_value(i)
        q, k --MatMul-Mul(scale)-Add(mask)-Softmax--MatMul(v)--Transpose-Reshape--> o_proj/MatMul

    Rewritten to:

        q, k, v, past_key, past_value, seqlens_k, total_seq_len, cos, sin
            --GroupQueryAttention(do_rotary)--> (o_proj/MatMul input, present_key(i), present_value(i))

    Everything else in the layer's `attn/` scope except the four projections is removed.
    """

    def __init__(self, model: onnx.ModelProto, contract: Contract):
        self.model, self.contract = model, contract
        self.nodes_by_name = GraphIndex(model).nodes

    def projection_output(self, layer: int, proj: str) -> str:
        """Output of the projection's MatMul, or of its bias Add when it has one."""
        scope = f"/model/layers.{layer}/attn/{proj}/"
        matmul = self.nodes_by_name.get(scope + "MatMul")
        if matmul is None:
            raise UserError(f"layer {layer}: no {proj} MatMul in the graph: was it exported by `pipeline export`?")
        bias = self.nodes_by_name.get(scope + "Add")
        return (bias or matmul).output[0]

    def fuse(self, layer: int) -> bool:
        scope = f"/model/layers.{layer}/attn/"
        o_proj = self.nodes_by_name.get(scope + "o_proj/MatMul")
        if o_proj is None:
            return False
        q, k, v = (self.projection_output(layer, p) for p in ("q_proj", "k_proj", "v_proj"))
        producers = GraphIndex(self.model).producers
        for name in (present_key(layer), present_value(layer)):  # safety: present must come from this scope
            if name not in producers or not producers[name].name.startswith(scope):
                return False
        keep = {scope + f"{p}/{op}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for op in ("MatMul", "Add")}
        doomed = [n for n in self.model.graph.node if n.name.startswith(scope) and n.name not in keep]
        attn_out = f"{scope}GroupQueryAttention_output_0"
        rope = self.contract.rope_theta is not None
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q, k, v, past_key(layer), past_value(layer), SEQLENS_K, TOTAL_SEQ_LEN,
             COS_CACHE if rope else "", SIN_CACHE if rope else ""],
            [attn_out, present_key(layer), present_value(layer)],
            name=scope + "GroupQueryAttention", domain="com.microsoft",
            num_heads=self.contract.num_heads, kv_num_heads=self.contract.num_kv_heads,
            do_rotary=int(rope), rotary_interleaved=0)
        for n in doomed:
            self.model.graph.node.remove(n)
        o_proj.input[0] = attn_out
        self.model.graph.node.append(gqa)
        return True


class PackProjections:
    """Pack each layer's q/k/v projections into one MatMul feeding GroupQueryAttention's packed-QKV form, and
    SwiGLU's gate/up projections into one MatMul followed by a Split.

        h --q_proj/MatMul--> q --+                      h --qkv_proj/MatMul--> qkv --GQA(query=qkv, key='', value='')
        h --k_proj/MatMul--> k --GQA          becomes
        h --v_proj/MatMul--> v --+

        h --gate_proj/MatMul--> g                       h --gate_up_proj/MatMul--Split--> g, u (same tensor names)
        h --up_proj/MatMul----> u             becomes

    At decode (one token) every MatMul is a matrix-vector product bound by weight reads and per-op overhead:
    three or two small products become one wider one, and an int8 graph quantizes the shared input once.
    Projections with a bias Add are packed with their biases concatenated.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        index = GraphIndex(model)
        self.nodes, self.inits = index.nodes, index.inits

    def _proj(self, scope: str, proj: str):
        mm = self.nodes.get(f"{scope}{proj}/MatMul")
        if mm is None or mm.input[1] not in self.inits:
            return None
        return mm, self.nodes.get(f"{scope}{proj}/Add")

    def _packed(self, scope: str, projs: list[str], name: str):
        """One MatMul (+ Add) over the concatenated weights; None when the projections do not match."""
        parts = [self._proj(scope, p) for p in projs]
        if any(p is None for p in parts) or len({p[0].input[0] for p in parts}) != 1:
            return None
        if len({p[1] is None for p in parts}) != 1:
            return None
        weights = [numpy_helper.to_array(self.inits[mm.input[1]]) for mm, _ in parts]
        w = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{scope}{name}.weight")
        nodes = [helper.make_node("MatMul", [parts[0][0].input[0], w.name], [f"{scope}{name}/MatMul_output_0"],
                                  name=f"{scope}{name}/MatMul")]
        inits = [w]
        out = nodes[0].output[0]
        if parts[0][1] is not None:
            bias_names = [a.input[1] if a.input[0] == mm.output[0] else a.input[0] for mm, a in parts]
            if any(b not in self.inits for b in bias_names):
                return None
            b = numpy_helper.from_array(np.concatenate([numpy_helper.to_array(self.inits[n]) for n in bias_names]),
                                        f"{scope}{name}.bias")
            inits.append(b)
            nodes.append(helper.make_node("Add", [out, b.name], [f"{scope}{name}/Add_output_0"],
                                          name=f"{scope}{name}/Add"))
            out = nodes[-1].output[0]
        widths = [wt.shape[1] for wt in weights]
        old_outputs = [(a or mm).output[0] for mm, a in parts]
        doomed = [n for p in parts for n in p if n is not None]
        return nodes, inits, out, widths, old_outputs, doomed

    def _apply(self, nodes, inits, doomed) -> None:
        for n in doomed:
            self.model.graph.node.remove(n)
        self.model.graph.node.extend(nodes)
        self.model.graph.initializer.extend(inits)

    def pack_qkv(self, layer: int) -> bool:
        scope = f"/model/layers.{layer}/attn/"
        gqa = self.nodes.get(scope + "GroupQueryAttention")
        packed = self._packed(scope, ["q_proj", "k_proj", "v_proj"], "qkv_proj")
        if gqa is None or packed is None:
            return False
        nodes, inits, out, _, old, doomed = packed
        if list(gqa.input[:3]) != old:
            return False
        gqa.input[0], gqa.input[1], gqa.input[2] = out, "", ""
        self._apply(nodes, inits, doomed)
        return True

    def pack_gate_up(self, layer: int) -> bool:
        scope = f"/model/layers.{layer}/mlp/"
        packed = self._packed(scope, ["gate_proj", "up_proj"], "gate_up_proj")
        if packed is None:
            return False
        nodes, inits, out, widths, old, doomed = packed
        split = numpy_helper.from_array(np.array(widths, np.int64), f"{scope}gate_up_proj.split")
        nodes.append(helper.make_node("Split", [out, split.name], old, axis=-1, name=f"{scope}gate_up_proj/Split"))
        self._apply(nodes, inits + [split], doomed)
        return True


def add_gqa_inputs(model: onnx.ModelProto, contract: Contract) -> None:
    """seqlens_k = sum(attention_mask) - 1 (int32), total_sequence_length = attention_mask.shape[1]; rotary
    cos/sin caches (max_position_embeddings, head_dim/2) rebuilt from the rope parameters."""
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa.axis1"),
                          numpy_helper.from_array(np.array(1, np.int64), "gqa.scalar1")])
    g.node.extend([
        helper.make_node("ReduceSum", [ATTENTION_MASK, "gqa.axis1"], ["gqa.mask_sum"], keepdims=0, name="gqa/ReduceSum"),
        helper.make_node("Sub", ["gqa.mask_sum", "gqa.scalar1"], ["gqa.seqlens_k64"], name="gqa/Sub"),
        helper.make_node("Cast", ["gqa.seqlens_k64"], [SEQLENS_K], to=TensorProto.INT32, name="gqa/CastSeqlens"),
        helper.make_node("Shape", [ATTENTION_MASK], ["gqa.mask_shape"], name="gqa/Shape"),
        helper.make_node("Gather", ["gqa.mask_shape", "gqa.scalar1"], ["gqa.total64"], axis=0, name="gqa/Gather"),
        helper.make_node("Cast", ["gqa.total64"], [TOTAL_SEQ_LEN], to=TensorProto.INT32, name="gqa/CastTotal"),
    ])
    tables = [(contract.rope_theta, contract.rope_scaling, (COS_CACHE, SIN_CACHE))]
    if contract.rope_local_theta is not None:
        tables.append((contract.rope_local_theta, None, LOCAL_CACHES))
    for theta, scaling, names in tables if contract.rope_theta is not None else ():
        add_rotary_caches(model, contract, theta, scaling, names)


def rotary_table(contract: Contract, theta: float, scaling: dict | None, long: bool = False) -> list[np.ndarray]:
    """[cos, sin], (max_position_embeddings, rotary_dim / 2) float32, as models.decoder computes them."""
    inv_freq = rope_inv_freq(contract.rotary_dim or contract.head_dim, theta, scaling, long).astype(np.float64)
    freqs = np.outer(np.arange(contract.max_position_embeddings, dtype=np.float64), inv_freq)
    factor = rope_attention_factor(scaling)
    return [(f(freqs) * factor).astype(np.float32) for f in (np.cos, np.sin)]


def rotary_nodes(model: onnx.ModelProto, contract: Contract, theta: float, scaling: dict | None,
                 names: tuple[str, str], long: bool = False) -> None:
    """Nodes computing `rotary_table`'s [cos, sin] as `names`, the same float64 products and functions cast to
    float32, from the frequencies alone: the file stores rotary_dim / 2 numbers instead of two tables of
    max_position_embeddings rows (67 MB for Gemma 3's four at 32k positions), and onnxruntime folds them into
    constants when the session is created, so each run reads the same tables as before."""
    g = model.graph
    prefix = names[0]
    inv_freq = rope_inv_freq(contract.rotary_dim or contract.head_dim, theta, scaling, long).astype(np.float64)
    factor = rope_attention_factor(scaling)
    g.initializer.extend([
        numpy_helper.from_array(np.array(0.0), f"{prefix}/start"),
        numpy_helper.from_array(np.array(float(contract.max_position_embeddings)), f"{prefix}/rows"),
        numpy_helper.from_array(np.array(1.0), f"{prefix}/step"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis1"),
        numpy_helper.from_array(inv_freq[None, :], f"{prefix}/inv_freq")])
    if factor != 1.0:
        g.initializer.append(numpy_helper.from_array(np.array(factor, np.float64), f"{prefix}/factor"))
    g.node.extend([
        helper.make_node("Range", [f"{prefix}/start", f"{prefix}/rows", f"{prefix}/step"], [f"{prefix}/positions"],
                         name=f"gqa/{prefix}/Range"),
        helper.make_node("Unsqueeze", [f"{prefix}/positions", f"{prefix}/axis1"], [f"{prefix}/column"],
                         name=f"gqa/{prefix}/Unsqueeze"),
        helper.make_node("Mul", [f"{prefix}/column", f"{prefix}/inv_freq"], [f"{prefix}/freqs"],
                         name=f"gqa/{prefix}/Freqs")])
    for op, name in zip(("Cos", "Sin"), names):
        wave = f"{name}/{op.lower()}64"
        g.node.append(helper.make_node(op, [f"{prefix}/freqs"], [wave], name=f"gqa/{name}/{op}"))
        if factor != 1.0:
            g.node.append(helper.make_node("Mul", [wave, f"{prefix}/factor"], [f"{wave}_scaled"],
                                           name=f"gqa/{name}/Factor"))
            wave = f"{wave}_scaled"
        g.node.append(helper.make_node("Cast", [wave], [name], to=TensorProto.FLOAT, name=f"gqa/{name}/Cast"))


def add_rotary_caches(model: onnx.ModelProto, contract: Contract, theta: float, scaling: dict | None,
                      names: tuple[str, str]) -> None:
    """The cos/sin caches `names` (computed in the graph, `rotary_nodes`); with LongRoPE the short-factor table
    and the long-factor one are stacked, and each run slices the rows of the one its total sequence length calls
    for (longer than the pretraining context: long), as transformers switches per forward call."""
    g = model.graph
    switch = long_context(scaling)
    if switch is None:
        rotary_nodes(model, contract, theta, scaling, names)
        return
    rows = contract.max_position_embeddings
    parts = [tuple(f"{n}.{kind}" for n in names) for kind in ("short", "long")]
    for part, long in zip(parts, (False, True)):
        rotary_nodes(model, contract, theta, scaling, part, long=long)
    g.node.extend(helper.make_node("Concat", [s, l_], [f"{n}.short_long"], axis=0, name=f"gqa/Stack_{n}")
                  for s, l_, n in zip(*parts, names))
    g.initializer.extend([numpy_helper.from_array(np.array([switch], np.int64), "gqa.long_after"),
                          numpy_helper.from_array(np.array([rows], np.int64), "gqa.long_rows"),
                          numpy_helper.from_array(np.array([0], np.int64), "gqa.axis0"),
                          numpy_helper.from_array(np.array([0], np.int64), "gqa.zero_rows")])
    g.node.extend([
        helper.make_node("Reshape", ["gqa.total64", "gqa.axis1"], ["gqa.total_1d"], name="gqa/TotalAs1D"),
        helper.make_node("Greater", ["gqa.total_1d", "gqa.long_after"], ["gqa.is_long"], name="gqa/IsLong"),
        helper.make_node("Where", ["gqa.is_long", "gqa.long_rows", "gqa.zero_rows"], ["gqa.rope_start"],
                         name="gqa/RopeStart"),
        helper.make_node("Add", ["gqa.rope_start", "gqa.total_1d"], ["gqa.rope_end"], name="gqa/RopeEnd"),
    ])
    g.node.extend(helper.make_node("Slice", [f"{n}.short_long", "gqa.rope_start", "gqa.rope_end", "gqa.axis0"], [n],
                                   name=f"gqa/Slice_{n}") for n in names)


def limit_context(model: onnx.ModelProto, context: int) -> Contract:
    """Size a graph for `context` positions (prompt + new tokens) in place; returns its new contract.

    The rotary tables `rotary_nodes` computes when the session is created get `context` rows instead of
    max_position_embeddings (Gemma 3's four tables: 67 MB of every session at 32,768 positions, 4 MB at 2,048;
    LongRoPE's short and long tables alike), and the contract's max_position_embeddings becomes `context`, so the
    runtime refuses a longer request with one line and the bundle's configs state it. Graphs without computed
    tables (traced, learned positions) change their contract only."""
    contract = read_contract(model)
    if not 1 <= context <= contract.max_position_embeddings:
        raise UserError(f"context {context}: give a number of positions from 1 to the model's "
                        f"{contract.max_position_embeddings}")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Range" and node.name.startswith("gqa/") and node.input[1] in inits:
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.array(float(context)), node.input[1]))
    if "gqa.long_rows" in inits:  # where the long-factor table starts in the stacked pair
        inits["gqa.long_rows"].CopyFrom(numpy_helper.from_array(np.array([context], np.int64), "gqa.long_rows"))
    contract = replace(contract, max_position_embeddings=context)
    write_contract(model, contract)
    return contract


def write_with_context(source: Path, target: Path, context: int) -> Contract:
    """`source` model.onnx sized for `context` positions (`limit_context`) as the graph `target`, written beside
    it: the weights stay in the source's external data file, which the new graph names as the source does (a
    link or a copy would cost the file system or the time; onnx refuses hard-linked data)."""
    if target.parent.resolve() != source.parent.resolve():
        raise ValueError(f"{target} must be beside {source}: it reads the same external data")
    model = onnx.load(str(source), load_external_data=False)
    contract = limit_context(model, context)
    onnx.save(model, str(target))
    return contract


def rotary_caches(contract: Contract, layer: int) -> tuple[str, str]:
    """The cos/sin cache inputs of a layer's GroupQueryAttention ("" without rotary)."""
    if contract.rope_theta is None:
        return "", ""
    if contract.rope_local_theta is not None and contract.attention_windows[layer] is not None:
        return LOCAL_CACHES
    return COS_CACHE, SIN_CACHE


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes and initializers that no graph output depends on; returns how many nodes went.
    The nodes must be in topological order."""
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    removed = len(g.node) - len(kept)
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    return removed


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (fusion appends nodes at the end)."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        progressed = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                progressed.append(n)
        if len(progressed) == len(pending):
            raise UserError(f"graph has a cycle or a missing input at node {pending[0].name!r}")
        pending = progressed
    del g.node[:]
    g.node.extend(ordered)


def ort_fusions(model: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    """onnxruntime.transformers' own fusions (norms, skip-norms, Gelu) on a model that already holds GQA."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("gpt2")
    opts.enable_attention = False  # attention is ours (GroupQueryAttention) already
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimizer.optimize_model(model, model_type="gpt2", num_heads=contract.num_heads,
                                   hidden_size=contract.hidden_size, optimization_options=opts,
                                   opt_level=0)
    return opt.model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 everywhere a float is (inputs, outputs, KV cache), int inputs untouched."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(model)
    m.convert_float_to_float16(keep_io_types=False, use_symbolic_shape_infer=False)
    return m.model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def fuse(model: onnx.ModelProto, contract: Contract) -> tuple[onnx.ModelProto, dict]:
    """A traced export's attention fused into GroupQueryAttention, projections packed, ORT's norm fusions."""
    if contract.family not in TRACED_FUSION_FAMILIES or any(w is not None for w in contract.attention_windows):
        windowed = " with sliding-window attention" if contract.family in TRACED_FUSION_FAMILIES else ""
        raise UserError(f"fusing a traced {contract.family} graph{windowed} is not supported: export it with "
                        "--graph built (the default), which writes the fused graph itself")
    if contract.head_dim % 16:
        raise UserError(f"head_dim {contract.head_dim} is not a multiple of 16, which onnxruntime's "
                        f"GroupQueryAttention requires: use the unfused export for this model")
    fuser = FuseGroupQueryAttention(model, contract)
    fused_layers = [i for i in range(contract.num_layers) if fuser.fuse(i)]
    missing = sorted(set(range(contract.num_layers)) - set(fused_layers))
    if missing:
        raise UserError(f"attention was not fused in layer(s) {missing}: the graph does not have the exported "
                        f"attention pattern (was it already optimized or quantized?)")
    packer = PackProjections(model)
    packed = {"qkv": sum(packer.pack_qkv(i) for i in range(contract.num_layers)),
              "gate_up": sum(packer.pack_gate_up(i) for i in range(contract.num_layers))}
    add_gqa_inputs(model, contract)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    topological_sort(model)
    remove_dead_nodes(model)
    model = ort_fusions(model, contract)
    remove_dead_nodes(model)
    return model, packed


def optimize(in_path: str | Path, out_path: str | Path, config: OptimizeConfig = OptimizeConfig()) -> dict:
    """Fuse `in_path` into `out_path`; returns {fused op counts, node counts, parity} for the manifest."""
    in_path, out_path = Path(in_path), Path(out_path)
    model = load_onnx(in_path)
    contract = read_contract(model, in_path)
    nodes_before = len(model.graph.node)
    packed = {"qkv": 0, "gate_up": 0}
    if contract.fused_attention:  # built fused by `pipeline export`: only the float16 conversion is left
        if not config.fp16:
            raise UserError(f"{in_path} is fused already (built by `pipeline export`): nothing to fuse; "
                            "--fp16 converts it to float16")
    else:
        model, packed = fuse(model, contract)
    contract = replace(contract, fused_attention=True)
    if config.fp16:
        model = to_fp16(model)
        contract = replace(contract, kv_dtype="float16")
    write_contract(model, contract)
    counts = op_counts(model)
    gqa = counts.get("GroupQueryAttention", 0)
    if gqa != contract.num_layers:
        raise UserError(f"expected {contract.num_layers} GroupQueryAttention ops after fusion, found {gqa}")
    with staging_dir(out_path) as tmp:
        staged = tmp / out_path.name
        save_model(model, staged, external=model.ByteSize() >= EXTERNAL_DATA_THRESHOLD)
        parity = fused_parity(in_path, staged, contract) if config.check_parity else None
        move_model(staged, out_path)
    return {"fused_ops": {k: v for k, v in counts.items() if k in FUSED_OPS},
            "nodes_before": nodes_before, "nodes_after": len(model.graph.node), "packed_layers": packed,
            "fp16": config.fp16, "parity_max_abs_logit_diff": parity}


def fused_parity(ref_path: Path, fused_path: Path, contract: Contract, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| of fused vs unfused on a prefill (7 tokens) and one decode step, batch 1."""
    from exporters.calibration import cpu_session  # errors only: a default-valued input is not news

    rng = np.random.default_rng(seed)
    ref, new = cpu_session(ref_path), cpu_session(fused_path)
    kv_np = np.dtype(contract.kv_dtype)
    outputs = [LOGITS, *present_names(contract.num_layers)]
    out = {}
    past = dict.fromkeys(past_names(contract.num_layers),
                         np.zeros((1, contract.num_kv_heads, 0, contract.head_dim), np.float32))
    seq = rng.integers(0, contract.vocab_size, (1, 8))
    for step, (start, stop) in (("prefill", (0, 7)), ("decode", (7, 8))):
        feeds = {INPUT_IDS: seq[:, start:stop], ATTENTION_MASK: np.ones((1, stop), np.int64),
                 POSITION_IDS: np.arange(start, stop)[None]}
        feeds.update(past)
        r = ref.run(outputs, {k: v for k, v in feeds.items() if k in {i.name for i in ref.get_inputs()}})
        n = new.run(outputs, {k: (v.astype(kv_np) if v.dtype == np.float32 else v) for k, v in feeds.items()
                              if k in {i.name for i in new.get_inputs()}})
        out[step] = float(np.max(np.abs(r[0] - n[0].astype(np.float32))))
        past = dict(zip(past_names(contract.num_layers), r[1:]))
    return out
