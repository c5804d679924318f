"""exporters/gated_mlp.py: a SwiGLU product and the online rotation after it as one GluRotate node, against
onnxruntime running the nodes it replaces."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.gated_mlp import IDENTITY, fuse_gated_mlps
from exporters.rotation import online_matrix
from runtimes.kernels import GATED_OP


def mlp_model(f: int, rotation: np.ndarray | None, swap: bool = False, gelu: bool = False) -> onnx.ModelProto:
    """x (1, S, 2f) -> Split -> act(gate) * up [-> Reshape -> MatMul(rotation (1, b, b)) -> Reshape] -> y: the
    graph the export and online_hadamard write between gate_up and down_proj, act silu (Sigmoid, Mul) or GELU's
    tanh form (FastGelu) (`swap`: each Mul's inputs the other way round)."""
    def mul(a: str, b: str, out: str) -> onnx.NodeProto:
        return helper.make_node("Mul", [b, a] if swap else [a, b], [out], name=f"mul_{out}")

    act = [helper.make_node("FastGelu", ["gate"], ["act"], name="gelu", domain="com.microsoft")] if gelu else \
        [helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"), mul("gate", "sig", "act")]
    nodes = [helper.make_node("Split", ["x", "halves"], ["gate", "up"], name="split", axis=-1), *act,
             mul("act", "up", "h" if rotation is not None else "y")]
    inits = [numpy_helper.from_array(np.array([f, f], np.int64), "halves")]
    if rotation is not None:
        b = rotation.shape[-1]
        nodes += [helper.make_node("Reshape", ["h", "blocks"], ["hb"], name="reshape"),
                  helper.make_node("MatMul", ["hb", "rot"], ["hr"], name="rotate"),
                  helper.make_node("Reshape", ["hr", "flat"], ["y"], name="flat")]
        inits += [numpy_helper.from_array(rotation.astype(np.float32), "rot"),
                  numpy_helper.from_array(np.array([0, 0, f // b, b], np.int64), "blocks"),
                  numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 2 * f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", f])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def run(model: onnx.ModelProto, x: np.ndarray, library=None, threads: int = 2, every: bool = False):
    """The first output (`every`: all of them) of `model` on x, with the native library registered if given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = session.run(None, {"x": x})
    return results if every else results[0]


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    assert fuse_gated_mlps(out) == 1
    assert [n.op_type for n in out.graph.node] == [GATED_OP]
    return out


RNG = np.random.default_rng(7)


@pytest.fixture(scope="module", params=["this CPU's build", "x86_64-avx2"])
def library(request, native_kernels, tmp_path_factory):
    """The library this CPU runs, and on a CPU with AVX512-VNNI also the AVX2 build (its vectors are half as
    wide: other tiles, other shuffles), compiled with the flags `python -m runtimes.kernels build` gives it."""
    import shutil
    import subprocess

    from runtimes import kernels

    if request.param == "this CPU's build":
        return native_kernels
    if kernels.flavor() != "x86_64":
        pytest.skip("the AVX2 build is this CPU's own build, or this CPU cannot run it")
    out = tmp_path_factory.mktemp("avx2") / "libpipeline_avx2.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    built = subprocess.run([cc, *kernels.COMMON_CFLAGS, *kernels.ARCH_CFLAGS["x86_64-avx2"],
                            f"-I{kernels.find_headers()}", str(kernels.SOURCE), "-o", str(out)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return out


@pytest.mark.parametrize("name, f, rotation, gelu", [
    ("randomized Sylvester, b 128 (the fast transform)", 1536, online_matrix(128, 2)[None], False),
    ("randomized Sylvester, b 32", 96, online_matrix(32, 3)[None], False),
    ("Paley x Sylvester, b 96 (dense, 32-column tiles)", 192, online_matrix(96, 2)[None], False),
    ("Paley, b 12 (dense, no tile)", 48, online_matrix(12, 2)[None], False),
    ("a dense 2-D matrix, b 128", 256, np.linalg.qr(RNG.standard_normal((128, 128)))[0], False),
    ("no rotation", 80, None, False),
    ("GELU, randomized Sylvester, b 128", 640, online_matrix(128, 2)[None], True),
    ("GELU, no rotation (Gemma's gguf variants)", 2048, None, True),
])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 300])
def test_the_fused_op_computes_what_the_nodes_did(library, name, f, rotation, gelu, rows):
    """Decode (1 row) and prompts (tiles of 4 rows and what is left; more rows than chunks), every rotation path,
    both activations; inputs wide enough that the activation saturates both ways. Equal up to float rounding."""
    model = mlp_model(f, rotation, swap=rows == 3, gelu=gelu)
    x = (np.random.default_rng(rows).standard_normal((1, rows, 2 * f)) * 4).astype(np.float32)
    x[0, 0, :4] = [-100.0, 100.0, -1e4, 0.0]
    want = run(model, x)
    xd = x.astype(np.float64)
    gate, up = xd[..., :f], xd[..., f:]
    with np.errstate(over="ignore"):  # e^10000: the sigmoid's 0
        act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3))) if gelu else \
            gate / (1 + np.exp(-gate))
    exact = act * up
    if rotation is not None:
        b = rotation.shape[-1]
        exact = (exact.reshape(1, rows, f // b, b) @ rotation.reshape(b, b)).reshape(1, rows, f)
    native = fused(model)
    for threads in (1, 2):
        got = run(native, x, library, threads)
        assert got.shape == want.shape == (1, rows, f)
        scale = np.abs(exact).max()
        assert np.abs(got - exact).max() <= 2e-6 * scale, name
        assert np.abs(got - want).max() <= 2e-6 * scale, name


def test_the_rotation_is_stored_2d_and_absent_rotations_read_the_identity():
    rotated = mlp_model(256, online_matrix(128, 2)[None])
    fuse_gated_mlps(rotated)
    inits = {t.name: numpy_helper.to_array(t) for t in rotated.graph.initializer}
    assert list(inits) == ["rot.2d"] and inits["rot.2d"].shape == (128, 128)
    np.testing.assert_array_equal(inits["rot.2d"], online_matrix(128, 2).astype(np.float32))
    plain = mlp_model(80, None)
    fuse_gated_mlps(plain)
    assert [(t.name, list(t.dims)) for t in plain.graph.initializer] == [(IDENTITY, [1, 1])]
    assert "com.pipeline" in {o.domain for o in plain.opset_import}
    assert fuse_gated_mlps(plain) == 0 and len(plain.graph.node) == len(plain.graph.initializer) == 1  # once


def test_nodes_without_names_are_told_apart(native_kernels):
    """ONNX lets nodes go unnamed: the fusion takes exactly the pattern's nodes, not every nameless one."""
    model = mlp_model(256, online_matrix(128, 2)[None])
    model.graph.node.append(helper.make_node("Neg", ["y"], ["neg"]))
    model.graph.output.append(helper.make_tensor_value_info("neg", TensorProto.FLOAT, None))
    for n in model.graph.node:
        n.name = ""
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert fuse_gated_mlps(native) == 1 and [n.op_type for n in native.graph.node] == [GATED_OP, "Neg"]
    x = np.random.default_rng(1).standard_normal((1, 2, 512)).astype(np.float32)
    for got, want in zip(run(native, x, native_kernels, every=True), run(model, x, every=True)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def variant(change) -> onnx.ModelProto:
    model = mlp_model(256, online_matrix(128, 2)[None])
    change(model)
    return model


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    next(a for a in node.attribute if a.name == name).CopyFrom(helper.make_attribute(name, value))


@pytest.mark.parametrize("why, change", [
    ("uneven halves", lambda m: m.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.array([100, 156], np.int64), "halves"))),
    ("split along another axis", lambda m: set_attr(m.graph.node[0], "axis", 1)),
    ("the up half gated", lambda m: m.graph.node[1].input.__setitem__(0, "up")),
    ("tanh, neither silu nor FastGelu", lambda m: setattr(m.graph.node[1], "op_type", "Tanh")),
    ("the product read twice", lambda m: m.graph.output.append(
        helper.make_tensor_value_info("act", TensorProto.FLOAT, None))),
])
def test_anything_but_the_exact_pattern_is_left_alone(why, change):
    model = variant(change)
    before = [n.op_type for n in model.graph.node]
    assert fuse_gated_mlps(model) == 0, why
    assert [n.op_type for n in model.graph.node] == before


def test_a_fastgelu_with_a_bias_is_left_alone_and_an_unknown_activation_refused(native_kernels):
    model = mlp_model(80, None, gelu=True)
    model.graph.node[1].input.append("halves")  # FastGelu's optional bias: not the pattern
    assert fuse_gated_mlps(model) == 0
    fused_gelu = mlp_model(80, None, gelu=True)
    assert fuse_gated_mlps(fused_gelu) == 1
    attribute = fused_gelu.graph.node[0].attribute
    assert [(a.name, a.s) for a in attribute] == [("activation", b"gelu_tanh")]
    attribute[0].s = b"relu"
    with pytest.raises(Exception, match="GluRotate: activation is silu or gelu_tanh"):
        run(fused_gelu, np.zeros((1, 1, 160), np.float32), native_kernels)


def test_a_rotation_that_is_not_the_pattern_stays_a_matmul(native_kernels):
    """A product read by something else than the rotation's Reshape: silu(gate) * up is fused, the rotation
    nodes stay, and the result is unchanged."""
    model = mlp_model(256, online_matrix(128, 2)[None])
    model.graph.node.append(helper.make_node("Neg", ["h"], ["neg"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("neg", TensorProto.FLOAT, None))
    native = onnx.ModelProto()
    native.CopyFrom(model)
    assert fuse_gated_mlps(native) == 1
    assert [n.op_type for n in native.graph.node] == [GATED_OP, "Reshape", "MatMul", "Reshape", "Neg"]
    x = np.random.default_rng(0).standard_normal((1, 5, 512)).astype(np.float32)
    np.testing.assert_allclose(run(native, x, native_kernels), run(model, x), rtol=0, atol=1e-5)
