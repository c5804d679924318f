"""GroupQueryAttention on pipeline's own kernel (com.pipeline.CacheAttention), for the native variants.

The fused graphs' attention is onnxruntime's GroupQueryAttention (packed QKV, rotary inside, the KV cache read and
written in place). Its CPU kernel allocates temporary buffers and transposes QKV on every call, and computes a
prompt chunk's scores as one GEMM per head into a buffer that softmax and the product with V read again.
`native_attention` (`optimize --native-int8`, unless --no-native-attention) puts CacheAttention in its place where
the node is the form the kernel takes (runtimes/kernels/int8_matmul.c): packed QKV, rotary not interleaved, no extra
inputs or outputs, no smooth softmax, a head of at most 256; the same inputs (less the two empty key and value
slots), outputs and attributes. It computes the same floats up to the order of the sums and the exponential
(within 3e-5 of onnxruntime's, tests/exporters/test_native_attention.py), so the variant is judged, as the
fused MLPs are, by its distance from the float model. Anything else is left as it is. Measured (docs/
quantization.md): SmolLM2's attention in a 1536-token prefill 1.5x faster than onnxruntime's, decode unchanged;
hence the default.
"""

from __future__ import annotations

import onnx
from onnx import helper

from runtimes.kernels import ATTENTION_OP, DOMAIN

KEPT = {"num_heads", "kv_num_heads", "scale", "softcap", "local_window_size"}
MAX_HEAD = 256  # the kernel's widest head


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def takes(node: onnx.NodeProto, head: int | None) -> bool:
    """Whether CacheAttention computes this node: a packed-QKV GroupQueryAttention with rotary (not interleaved),
    its nine inputs (key and value empty), three outputs, no attribute the kernel does not know, and a head (the
    cache's last dimension) of at most MAX_HEAD."""
    attrs = _attrs(node)
    inputs = list(node.input) + [""] * (9 - len(node.input))
    return (node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and len(node.input) <= 9
            and not inputs[1] and not inputs[2] and all(inputs[i] for i in (0, 3, 4, 5, 6, 7, 8))
            and len(node.output) == 3 and all(node.output)
            and attrs.get("do_rotary") == 1 and not attrs.get("rotary_interleaved")
            and not attrs.get("smooth_softmax") and set(attrs) <= KEPT | {"do_rotary", "rotary_interleaved",
                                                                            "smooth_softmax"}
            and head is not None and 0 < head <= MAX_HEAD)


def native_attention(model: onnx.ModelProto) -> int:
    """Each GroupQueryAttention `takes` accepts -> CacheAttention, in place (same position, name + suffix);
    returns how many."""
    heads = {}  # the head width of each graph input that is a cache (B, KVH, P, H)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[3].HasField("dim_value"):
            heads[value.name] = dims[3].dim_value
    done = 0
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        if not takes(node, heads.get(node.input[3]) if len(node.input) > 3 else None):
            continue
        kept = {k: v for k, v in _attrs(node).items() if k in KEPT}
        inputs = [node.input[0], *node.input[3:9]]
        nodes[i] = helper.make_node(ATTENTION_OP, inputs, list(node.output), name=f"{node.name}/{ATTENTION_OP}",
                                    domain=DOMAIN, **kept)
        done += 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return done
