"""A float16 KV cache for a fused graph: GroupQueryAttention runs in float16, everything around it as before.

llama.cpp keeps its KV cache in f16 by default; onnxruntime's CPU GroupQueryAttention takes float16 too. The
rewrite casts each attention op's query/key/value inputs and rotary tables to float16 and its output back to
float32, and declares the past and present tensors float16, so the cache (the memory that grows with the
context) is half the size. The weights, their quantization and every other op are untouched: it applies to any
fused variant (fused, w8a8, w8a8-native, w4, ...).

The cost is measured, not assumed (docs/benchmarks.md, "Memory at long prompts"): on x86 onnxruntime's float16
attention is slower at long contexts and keeps more scratch, so it is an option, not the default. Quantized
variants keep their accuracy against the float model, though their logits move against their source's (their
int8 activations round afresh under any perturbation; `pipeline optimize` judges those against the float model).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from exporters.onnx_io import load_onnx, model_files, move_model, save_model
from models.files import staging_dir
from models.errors import UserError
from runtimes.contract import read_contract, write_contract

GQA = "GroupQueryAttention"
FLOAT_INPUTS = (0, 1, 2, 7, 8)  # query, key, value, cos_cache, sin_cache (3, 4: the past, a graph input)
PAST_INPUTS = (3, 4)
PRESENT_OUTPUTS = (1, 2)


def kv_to_fp16(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place; returns the number of attention ops now running in float16."""
    graph = model.graph
    contract = read_contract(model)
    if not contract.fused_attention:
        raise UserError("a float16 KV cache needs a fused graph (GroupQueryAttention): export it with --graph "
                        "built, or fuse it with `pipeline optimize`")
    if contract.kv_dtype != "float32":
        raise UserError(f"the KV cache is {contract.kv_dtype} already")
    attention = [n for n in graph.node if n.op_type == GQA]
    past_names = {n.input[i] for n in attention for i in PAST_INPUTS}
    present_names = {n.output[i] for n in attention for i in PRESENT_OUTPUTS}
    for node in graph.node:
        if node.op_type != GQA and past_names & set(node.input):
            raise UserError(f"{node.name} reads the KV cache besides GroupQueryAttention: cannot store it in float16")
    for node in attention:
        if any(name for name in node.input[9:]):
            raise UserError(f"{node.name} has inputs past the rotary tables: not supported in float16")

    casts: dict[str, str] = {}  # float32 tensor -> its float16 cast (the rotary tables are shared by layers)
    new_nodes = []
    for node in graph.node:
        if node.op_type != GQA:
            new_nodes.append(node)
            continue
        for i in FLOAT_INPUTS:
            name = node.input[i] if i < len(node.input) else ""
            if not name:
                continue
            if name not in casts:
                casts[name] = f"{name}/fp16"
                new_nodes.append(helper.make_node("Cast", [name], [casts[name]], f"{node.name}/cast_in_{i}",
                                                  to=TensorProto.FLOAT16))
            node.input[i] = casts[name]
        out = node.output[0]
        node.output[0] = f"{out}/fp16"
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], f"{node.name}/cast_out",
                                          to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(new_nodes)
    for value in [*graph.input, *graph.output]:
        if value.name in past_names | present_names:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    write_contract(model, replace(contract, kv_dtype="float16"))
    return len(attention)


def write_kv16(source: Path, target: Path) -> dict:
    """source model.onnx -> target model.onnx with a float16 KV cache (staged, then renamed into place)."""
    model = load_onnx(source)
    count = kv_to_fp16(model)
    with staging_dir(target) as staging:
        # weights stay in external data when the source kept them there: inline, onnxruntime holds the protobuf's
        # copy of them too while it loads (SmolLM2 fp32: 200 MB more peak memory)
        save_model(model, staging / target.name, external=len(model_files(source)) > 1)
        move_model(staging / target.name, target)
    return {"kv_dtype": "float16", "attention_ops": count}
