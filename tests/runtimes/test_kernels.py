"""runtimes/kernels: the native StaticInt8MatMul against onnxruntime's own QDQ int8 path, its build and its errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtimes import kernels
from runtimes.errors import RuntimeUserError

FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl {}\n"


def test_cpu_support_reads_the_flags():
    assert kernels.flavor(FLAGS.format("fma avx512_vnni"), "x86_64") == "x86_64"           # Cascade Lake, Zen 4
    assert kernels.flavor(FLAGS.format("fma avx_vnni"), "x86_64") == "x86_64-avx2"         # AVX-VNNI: 256-bit only
    assert kernels.flavor("flags\t\t: fpu sse2 avx avx2 fma\n", "x86_64") == "x86_64-avx2"  # Zen 2, Intel N100
    assert not kernels.cpu_supported("flags\t\t: fpu sse2 sse4_2 avx\n", "x86_64")     # Sandy Bridge: no AVX2
    assert not kernels.cpu_supported(FLAGS.format("fma avx512_vnni"), "aarch64")
    assert not kernels.cpu_supported("processor : 0\n", "x86_64")
    # each CPU gets the build it runs; a cpuinfo naming neither gets the AVX512 one (built for another machine)
    assert "-mavx512vnni" in kernels.cflags("x86_64", FLAGS.format("fma avx512_vnni"))
    assert kernels.cflags("x86_64", "flags\t\t: avx2 fma\n")[-2:] == ["-mavx2", "-mfma"]
    assert "-mavx512vnni" in kernels.cflags("x86_64", "processor : 0\n")


ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid {}\n"


def test_cpu_support_reads_the_aarch64_features():
    assert kernels.cpu_supported(ARM.format("asimdrdm lrcpc dcpop asimddp"), "aarch64")  # Cortex-A76 (Pi 5)
    assert not kernels.cpu_supported(ARM.format(""), "aarch64")  # Cortex-A53/A72: no dot product
    assert not kernels.cpu_supported(FLAGS.format("avx512_vnni"), "arm64")
    assert kernels.cflags("aarch64")[-1] == "-march=armv8.2-a+dotprod"


HARNESS = Path(__file__).with_name("kernel_harness.c")


def harness_build(cc: str, flags: list[str], out: Path) -> Path:
    headers = kernels.find_headers()
    built = subprocess.run([cc, *flags, "-std=c11", "-Wall", "-Werror", f"-I{headers}",
                            f"-I{kernels.SOURCE.parent}", str(HARNESS), "-lm", "-o", str(out)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return out


@pytest.mark.parametrize("build", ["x86_64", "x86_64-avx2"])
def test_the_x86_kernel_is_exact_against_the_scalar_reference(tmp_path, build):
    """The harness's reference is the arithmetic the onnxruntime comparison above checks; here without
    onnxruntime, so every build (AVX512-VNNI, AVX2, AArch64 below) is held to the same reference. A CPU with
    AVX512-VNNI runs both x86-64 builds."""
    if kernels.flavor() not in (build, "x86_64"):
        pytest.skip(f"this CPU cannot run the {build} build")
    try:
        kernels.find_headers()
    except RuntimeUserError as e:
        pytest.skip(str(e))
    exe = harness_build(shutil.which("cc") or "gcc", ["-O3", *kernels.ARCH_CFLAGS[build]], tmp_path / "harness")
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    # and the 5-bit (x86-64) and 4-bit rows kept narrow, against their bytes; GluRotate; CacheAttention
    want = "ok 198\nok 5-bit 36\nok 4-bit 36\nok gated 20\nok attention 15\n"
    assert run.returncode == 0 and run.stdout == want, run.stdout


def test_the_aarch64_kernel_is_exact_under_qemu(tmp_path):
    """The sdot path (activations minus 128, zero point corrected by 128 * colsum) computes every output bit
    for bit as the reference does: decode and prefill rows, panel remainders, K tails, saturation, NaN and
    infinities, zero points 0/37/128/255, every chunking. On an emulated CPU without the dot product the same
    binary dies of an illegal instruction: the sdot path is what ran."""
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64-static") or \
        shutil.which("qemu-aarch64")
    if not (cc and qemu):
        pytest.skip("needs a cross compiler and qemu (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross "
                    "qemu-user-static)")
    try:
        kernels.find_headers()
    except RuntimeUserError as e:
        pytest.skip(str(e))
    exe = harness_build(cc, ["-O3", "-static", *kernels.ARCH_CFLAGS["aarch64"]], tmp_path / "harness")
    run = subprocess.run([qemu, "-cpu", "max", str(exe)], capture_output=True, text=True, timeout=600)
    want = "ok 198\nok 4-bit 36\nok gated 20\nok attention 15\n"
    assert run.returncode == 0 and run.stdout == want, run.stdout + run.stderr
    old = subprocess.run([qemu, "-cpu", "cortex-a53", str(exe)], capture_output=True, text=True, timeout=600)
    assert old.returncode != 0 and "ok" not in old.stdout


def test_building_without_headers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_supported", lambda *a: True)
    with pytest.raises(RuntimeUserError, match="onnxruntime_c_api.h is not in .*libonnxruntime-dev"):
        kernels.build(include_dir=tmp_path, out=tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()


def pair(m: int, k: int, n: int, seed: int) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """The same static int8 MatMul as onnxruntime's QDQ graph and as StaticInt8MatMul; and an input that also
    drives some activations past the uint8 range (saturation, even past int32 and to -inf) and onto exact .5
    steps (rounding). Weights are full 8-bit where onnxruntime's own int8 GEMM is exact, 7-bit where it
    saturates (x86 without VNNI: the reference itself would be wrong; the harness holds the kernel to full
    8-bit weights everywhere)."""
    from exporters.cpu_kernels import rewrite
    from runtimes.providers import int8_gemm_saturates

    rng = np.random.default_rng(seed)
    bound = 64 if int8_gemm_saturates() else 128
    w = rng.integers(-bound, bound, (k, n), dtype=np.int8)
    scale, zero = np.float32(0.03), np.uint8(rng.integers(0, 256))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.uniform(1e-3, 2e-2, n).astype(np.float32),
                                                                      "w_scale"),
             numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"), numpy_helper.from_array(scale, "x_scale"),
             numpy_helper.from_array(zero, "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])], inits)
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    native = onnx.ModelProto()
    native.CopyFrom(qdq)
    assert rewrite(native) == 1
    x = rng.standard_normal((1, m, k)).astype(np.float32) * 3
    x.flat[::7] = (np.round(x.flat[::7] / scale) + 0.5) * scale  # ties
    x.flat[::11] *= 100  # far outside [0, 255] after quantization
    x.flat[1::13] = 1e12  # past int32 once divided by the scale
    x.flat[2::17] = -np.inf
    return qdq, native, x


def run(model: onnx.ModelProto, x: np.ndarray, library=None, threads: int = 2) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (1, 36, 48), (5, 64, 64), (8, 100, 16), (3, 1536, 80)])
def test_static_int8_matmul_computes_what_onnxruntime_qdq_does(native_kernels, m, k, n):
    """Decode rows (1), prefill rows in blocks of 4 and a remainder, panel counts that are not a multiple of
    4, K with a quantization tail: the same integer products and epilogue as QuantizeLinear +
    MatMulIntegerToFloat, up to float rounding of the last step."""
    qdq, native, x = pair(m, k, n, seed=m * 1000 + k + n)
    want = run(qdq, x)
    for threads in (1, 2):
        got = run(native, x, native_kernels, threads)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_the_weight_bound_is_recorded_and_a_graph_without_it_computes_the_same(native_kernels):
    """The rewrite records max |W| (the AVX2 build sums 7-bit weights' products in int16 pairs); a graph written
    without the attribute is taken as full 8-bit and gives the same outputs."""
    from runtimes.providers import int8_gemm_saturates

    qdq, native, x = pair(3, 64, 32, seed=9)
    node = next(n for n in native.graph.node if n.op_type == kernels.OP)
    bound = next(a.i for a in node.attribute if a.name == "weight_max_abs")
    w = next(numpy_helper.to_array(t) for t in qdq.graph.initializer if t.name == "w")
    assert bound == np.abs(w.astype(np.int16)).max() == (64 if int8_gemm_saturates() else 128)
    with_bound = run(native, x, native_kernels)
    del node.attribute[:]
    np.testing.assert_array_equal(run(native, x, native_kernels), with_bound)


def test_the_rewrite_says_when_onnxruntime_is_left_no_int8_gemm():
    """`pipeline.int8_gemm` = native where every static int8 MatMul went onto the kernel (8-bit weights then run
    exactly on any CPU the kernel builds for); a MatMul the kernel cannot take (N not a multiple of 16) keeps it
    off, and is the one named."""
    from exporters.cpu_kernels import INT8_GEMM_KEY, rewrite, static_int8_matmuls

    _, native, _ = pair(2, 64, 32, seed=3)
    assert {p.key: p.value for p in native.metadata_props}[INT8_GEMM_KEY] == "native"
    assert static_int8_matmuls(native) == []
    qdq, _, _ = pair(2, 64, 32, seed=3)
    rng = np.random.default_rng(3)
    qdq.graph.initializer.extend([numpy_helper.from_array(rng.integers(-64, 64, (32, 24), dtype=np.int8), "w2"),
                                  numpy_helper.from_array(np.full(24, 0.01, np.float32), "w2_scale")])
    qdq.graph.node.extend([helper.make_node("DequantizeLinear", ["w2", "w2_scale"], ["w2d"], axis=1),
                           helper.make_node("MatMul", ["y", "w2d"], ["z"], name="narrow")])
    qdq.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 24]))
    assert rewrite(qdq) == 1
    assert INT8_GEMM_KEY not in {p.key for p in qdq.metadata_props} and static_int8_matmuls(qdq) == ["narrow"]


def test_full_8bit_weights_on_the_kernel_open_and_compute_the_qdq_graph_on_any_cpu(tiny_model, tmp_path,
                                                                                     native_kernels):
    """A static model quantized with full 8-bit weights (as on a VNNI machine), every MatMul on the kernel: the
    session opens it on this CPU whatever it is (it says it needs no int8 GEMM of onnxruntime's) and its logits
    are the QDQ graph's computed in float (onnxruntime without graph optimizations: DequantizeLinear and a float
    MatMul, no int8 GEMM to saturate), to float rounding."""
    from exporters.cpu_kernels import INT8_GEMM_KEY, specialize
    from exporters.quantize import QuantConfig, quantize
    from runtimes.generate import Generator
    from runtimes.session import open_session

    ids = np.random.default_rng(0).integers(0, 128, 40).tolist()
    quantize(tiny_model, tmp_path / "static.onnx", [ids],
             QuantConfig(recipe="static", num_prefill=1, seq_len=16, num_decode_steps=1, reduce_range=False))
    specialize(tmp_path / "static.onnx", tmp_path / "native" / "model.onnx")
    meta = onnx.load(str(tmp_path / "native" / "model.onnx"), load_external_data=False).metadata_props
    assert {p.key: p.value for p in meta}[INT8_GEMM_KEY] == "native"
    native = Generator(open_session(tmp_path / "native" / "model.onnx", threads=2)).prefill(ids[:12])
    want = unoptimized_prefill(tmp_path / "static.onnx", ids[:12])
    np.testing.assert_allclose(native, want, rtol=0, atol=1e-4 * np.abs(want).max())


def unoptimized_prefill(path: Path, ids: list[int]) -> np.ndarray:
    """The last position's logits of a prefill of `ids` through onnxruntime without graph optimizations: a QDQ
    graph's DequantizeLinear and float MatMul, no int8 GEMM to saturate."""
    from runtimes.generate import Generator
    from runtimes.providers import cpu
    from runtimes.session import DecoderSession, _describe

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    contract, inputs, outputs = _describe(plain, path)
    session = DecoderSession(ort=plain, spec=cpu(), path=path, contract=contract, input_names=inputs,
                             output_names=outputs, kv_dtype=np.dtype(np.float32))
    return Generator(session, io_binding=False).prefill(ids)


def test_full_8bit_weights_open_exactly_in_float_as_the_native_rewrites_reference(tiny_model, tmp_path,
                                                                                    native_kernels, monkeypatch):
    """On a CPU whose int8 GEMM saturates, `open_session(..., exact_int8=True)` runs a full 8-bit static model as
    its QDQ graph says (float DequantizeLinear and MatMul) where a plain open refuses it, so `optimize
    --native-int8` can check its rewrite there: logits to float rounding of onnxruntime's unoptimized graph, and
    the native rewrite within optimize's tolerance of them. Saturation is forced, so every CPU takes the path."""
    from exporters.cpu_kernels import specialize
    from exporters.quantize import QuantConfig, quantize
    from pipeline.stages.optimize import NATIVE_TOLERANCE, logit_parity
    from runtimes import session as session_module
    from runtimes.generate import Generator
    from runtimes.session import open_session

    ids = np.random.default_rng(1).integers(0, 128, 40).tolist()
    quantize(tiny_model, tmp_path / "static.onnx", [ids],
             QuantConfig(recipe="static", num_prefill=1, seq_len=16, num_decode_steps=1, reduce_range=False))
    monkeypatch.setattr(session_module, "int8_gemm_saturates", lambda: True)
    with pytest.raises(RuntimeUserError, match="full 8-bit int8 weights"):
        open_session(tmp_path / "static.onnx")
    exact = Generator(open_session(tmp_path / "static.onnx", threads=1, exact_int8=True)).prefill(ids[:12])
    want = unoptimized_prefill(tmp_path / "static.onnx", ids[:12])
    np.testing.assert_allclose(exact, want, rtol=0, atol=1e-5 * np.abs(want).max())
    specialize(tmp_path / "static.onnx", tmp_path / "native" / "model.onnx")
    assert logit_parity(tmp_path / "static.onnx", tmp_path / "native" / "model.onnx") <= NATIVE_TOLERANCE


def test_a_native_graph_without_the_kernel_is_one_line_error(tiny_model, tmp_path, monkeypatch):
    """A model from `pipeline optimize --native-int8` on a machine where the kernel is not built."""
    from exporters.cpu_kernels import specialize
    from exporters.quantize import QuantConfig, quantize
    from runtimes.session import open_session

    ids = [np.random.default_rng(0).integers(0, 128, 40).tolist()]
    quantize(tiny_model, tmp_path / "static.onnx", ids,
             QuantConfig(recipe="static", num_prefill=1, seq_len=16, num_decode_steps=1))
    specialize(tmp_path / "static.onnx", tmp_path / "native" / "model.onnx")
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(tmp_path / "not-built.so"))
    with pytest.raises(RuntimeUserError, match=f"native int8 kernel \\({kernels.OP}\\).*portable variant") as e:
        open_session(tmp_path / "native" / "model.onnx")
    assert "\n" not in str(e.value)


def test_a_native_op_this_build_lacks_is_one_line_error(tmp_path, native_kernels):
    """A -native file written by another version (an op this library does not register): name it, say what to
    do, no traceback."""
    from onnx import TensorProto, helper

    from runtimes.session import open_session

    node = helper.make_node("RetiredOp", ["x"], ["y"], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid(kernels.DOMAIN, 1)]), str(path))
    with pytest.raises(RuntimeUserError, match="native int8 kernel \\(RetiredOp\\).*have no RetiredOp.*"
                                               "pipeline optimize --native-int8") as e:
        open_session(path)
    assert "\n" not in str(e.value)


def test_a_library_that_does_not_load_is_one_line_error(tiny_model, tmp_path, monkeypatch):
    """A truncated or foreign file where the library should be: say so and how to rebuild, no traceback."""
    from runtimes.session import open_session

    monkeypatch.setattr(kernels, "cpu_supported", lambda *a: True)
    broken = tmp_path / "libpipeline_int8.so"
    broken.write_bytes(b"\x7fELF truncated")
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(broken))
    with pytest.raises(RuntimeUserError, match="does not load .*rebuild it") as e:
        open_session(tiny_model)
    assert "\n" not in str(e.value)
