"""exporters/native_attention.py and the kernel's CacheAttention, against onnxruntime's GroupQueryAttention on
the same inputs: first prompts (padded rows too), prompt chunks that continue a cache, decode steps, windows,
soft-capping and scale, partial rotary, heads up to 256 wide, the cache in place and copied; then a whole
fused model rewritten."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporters.native_attention import native_attention
from runtimes.kernels import ATTENTION_OP
from tests.exporters.test_gated_mlp import library  # noqa: F401  (the fixture: this CPU's build and AVX2's)

INPUTS = ("qkv", "pk", "pv", "sk", "tot", "cos", "sin")


def attention_model(heads: int, kv_heads: int, head: int | None = 64, **attrs) -> onnx.ModelProto:
    """One GroupQueryAttention with packed QKV and rotary, as the graph builder writes it."""
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", *INPUTS[1:]], ["o", "k", "v"], name="gqa",
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, **attrs)
    types = [TensorProto.FLOAT] * 3 + [TensorProto.INT32] * 2 + [TensorProto.FLOAT] * 2
    shapes = [None, ["B", kv_heads, "P", head], ["B", kv_heads, "P", head], None, None, None, None]
    graph = helper.make_graph([node], "attention",
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(INPUTS, types, shapes)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "okv"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def session(model: onnx.ModelProto, library=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_in_place(s, feeds: dict, cache: tuple[np.ndarray, np.ndarray]):
    """Output and caches with present bound to the past's buffers (the runtime's in-place cache)."""
    import onnxruntime as ort

    keys, values = cache[0].copy(), cache[1].copy()  # kept alive while onnxruntime writes into them
    k, v = ort.OrtValue.ortvalue_from_numpy(keys), ort.OrtValue.ortvalue_from_numpy(values)
    binding = s.io_binding()
    for name, x in feeds.items():
        binding.bind_cpu_input(name, x)
    binding.bind_ortvalue_input("pk", k)
    binding.bind_ortvalue_input("pv", v)
    binding.bind_output("o")
    binding.bind_ortvalue_output("k", k)
    binding.bind_ortvalue_output("v", v)
    s.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0], keys, values


KINDS = {  # batch, new tokens, seqlens_k (total - 1 per row)
    "first prompt": (1, 7, [6]), "padded first prompt": (2, 7, [6, 3]), "chunk": (1, 40, [119]),
    "decode": (2, 1, [9, 3]), "long decode": (1, 1, [250])}
SHAPES = [(9, 3, 64, 32), (4, 1, 256, 128), (4, 2, 64, 16), (2, 2, 32, 16)]  # heads, kv heads, head, rotary / 2
ATTRS = [{}, {"local_window_size": 5}, {"softcap": 3.0, "scale": 0.3}]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("attrs", ATTRS, ids=["plain", "window", "softcap"])
def test_cache_attention_computes_what_group_query_attention_does(library, shape, attrs):
    heads, kv_heads, head, half = shape
    model = attention_model(heads, kv_heads, head, **attrs)
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert native_attention(native) == 1 and [n.op_type for n in native.graph.node] == [ATTENTION_OP]
    reference, ours = session(model), session(native, library)
    rng = np.random.default_rng(sum(shape))
    angles = rng.random((400, half)).astype(np.float32) * 6
    rotary = {"cos": np.cos(angles), "sin": np.sin(angles)}
    for kind, (batch, new, seqlens) in KINDS.items():
        total = new if "first" in kind else max(seqlens) + 1
        feeds = {"qkv": (2 * rng.standard_normal((batch, new, (heads + 2 * kv_heads) * head))).astype(np.float32),
                 "sk": np.array(seqlens, np.int32), "tot": np.array(total, np.int32), **rotary}
        cache = tuple(rng.standard_normal((batch, kv_heads, 300, head)).astype(np.float32) for _ in range(2))
        expected, got = run_in_place(reference, feeds, cache), run_in_place(ours, feeds, cache)
        for b, length in enumerate(seqlens):
            rows = length + 1 if "first" in kind else new  # a padded row's positions past its length are padding
            end = length + 1
            np.testing.assert_allclose(got[0][b, :rows], expected[0][b, :rows], atol=3e-5, err_msg=kind)
            for i in (1, 2):  # the cache as written, up to the row's length
                np.testing.assert_allclose(got[i][b, :, :end], expected[i][b, :, :end], atol=3e-5, err_msg=kind)
        if kind in ("chunk", "decode"):  # the cache not in place: the past as long as it is, present returned
            feeds.update(pk=cache[0][:, :, :total - new], pv=cache[1][:, :, :total - new])
            if kind == "decode":
                feeds.update(pk=cache[0][:, :, :max(seqlens)], pv=cache[1][:, :, :max(seqlens)])
            expected, got = reference.run(None, feeds), ours.run(None, feeds)
            assert got[1].shape == expected[1].shape
            np.testing.assert_allclose(got[0], expected[0], atol=3e-5, err_msg=f"{kind}, copied")


def test_only_the_form_the_kernel_takes_is_rewritten():
    def rewritten(model: onnx.ModelProto) -> int:
        return native_attention(model)

    assert rewritten(attention_model(4, 2)) == 1
    assert rewritten(attention_model(4, 2, rotary_interleaved=1)) == 0
    assert rewritten(attention_model(4, 2, smooth_softmax=1)) == 0
    assert rewritten(attention_model(4, 1, head=512)) == 0  # wider than the kernel's 256
    assert rewritten(attention_model(4, 1, head=None)) == 0  # a head width the graph does not state
    no_rotary = attention_model(4, 2)
    next(a for a in no_rotary.graph.node[0].attribute if a.name == "do_rotary").i = 0
    assert rewritten(no_rotary) == 0
    separate = attention_model(4, 2)
    separate.graph.node[0].input[1] = "pk"  # key and value given apart from the query
    assert rewritten(separate) == 0


def test_bad_lengths_are_an_error_not_a_read_past_the_cache(native_kernels):
    native = attention_model(4, 2)
    assert native_attention(native) == 1
    s = session(native, native_kernels)
    angles = np.zeros((16, 32), np.float32)
    feeds = {"qkv": np.zeros((1, 1, 8 * 64), np.float32), "pk": np.zeros((1, 2, 8, 64), np.float32),
             "pv": np.zeros((1, 2, 8, 64), np.float32), "sk": np.array([40], np.int32),
             "tot": np.array(41, np.int32), "cos": np.cos(angles), "sin": np.sin(angles)}
    with pytest.raises(Exception, match="out of range"):
        s.run(None, feeds)
