"""Provider specs: registry lookup, install hints for absent providers, CUDA and TensorRT options."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from runtimes import providers
from runtimes.contract import Contract, is_past, past_key, past_value
from runtimes.errors import RuntimeUserError
from runtimes.providers import (CPU_EP, CUDA_EP, TENSORRT_EP, ModelShape, TrtProfiles, available, cpu, cuda,
                                ensure_available, resolve, tensorrt)

CONTRACT = Contract(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=128,
                    max_position_embeddings=64, attention_windows=(None, None))
SHAPE = ModelShape(input_names=tuple(CONTRACT.input_names()), contract=CONTRACT)


def test_resolve_cpu_passes_threads():
    spec = resolve("cpu", threads=3)
    assert spec == cpu(threads=3)
    assert (spec.ep, spec.threads, spec.device) == (CPU_EP, 3, "cpu")
    assert spec.session_providers() == [(CPU_EP, {})]


def test_unknown_provider_lists_valid_names():
    with pytest.raises(RuntimeUserError, match="unknown execution provider 'gpu': choose one of cpu, cuda, tensorrt"):
        resolve("gpu")


def test_option_of_another_provider_is_a_user_error():
    with pytest.raises(RuntimeUserError, match="takes no option fp16: it takes threads"):
        resolve("cpu", fp16=True)


@pytest.mark.parametrize("name, ep, install", [("cuda", CUDA_EP, "pip install 'edge-pipeline[gpu]'"),
                                               ("tensorrt", TENSORRT_EP, "pip install 'edge-pipeline[tensorrt]'")])
def test_absent_provider_says_how_to_install_it(name, ep, install):
    if available(ep):
        pytest.skip(f"{ep} loads on this machine")
    with pytest.raises(RuntimeUserError) as err:
        resolve(name)
    message = str(err.value)
    assert install in message and name in message and "\n" not in message


def test_the_embedded_probe_model_runs_on_cpu():
    assert available(CPU_EP)


def test_listed_provider_that_does_not_load_counts_as_absent(monkeypatch):
    """A GPU package without its CUDA libraries lists CUDA, then falls back to CPU: that is 'absent'."""
    if available(CUDA_EP):
        pytest.skip("CUDA really loads here")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    available.cache_clear()
    try:
        assert not available(CUDA_EP)
        with pytest.raises(RuntimeUserError) as err:
            ensure_available(cuda())
        message = str(err.value)  # the reason onnxruntime gives, one line
        assert message.startswith("execution provider 'cuda' (CUDAExecutionProvider) is installed but does not "
                                  "load: ") and "pip install 'edge-pipeline[gpu]'" in message and "\n" not in message
    finally:
        available.cache_clear()


def test_cuda_options_and_cpu_fallback():
    spec = cuda(device_id=1)
    options = dict(spec.options)
    assert options == {"device_id": "1", "cudnn_conv_algo_search": "DEFAULT", "do_copy_in_default_stream": "1"}
    assert (spec.device, spec.device_id, spec.needs_nonempty_past) == ("cuda", 1, False)
    assert [ep for ep, _ in spec.session_providers()] == [CUDA_EP, CPU_EP]
    assert not spec.graph_capture


def test_cuda_graphs_are_asked_of_onnxruntime_and_marked_for_the_generation_loop():
    spec = cuda(graph=True)
    assert dict(spec.options)["enable_cuda_graph"] == "1" and spec.graph_capture


def test_tensorrt_caches_live_under_the_given_directory(tmp_path):
    spec = tensorrt(fp16=True, cache_dir=tmp_path / "trt")
    options = dict(spec.options)
    cache = str((tmp_path / "trt").resolve())
    assert spec.cache_dir == cache
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == cache
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == ("True", "False")
    assert spec.needs_nonempty_past and spec.needs_model_shape


def _profile(options: dict[str, str], kind: str) -> dict[str, list[int]]:
    entries = (e.split(":") for e in options[f"trt_profile_{kind}_shapes"].split(","))
    return {name: [int(d) for d in dims.split("x")] for name, dims in entries}


def test_tensorrt_profiles_cover_every_dynamic_input_with_min_past_one(tmp_path):
    spec = tensorrt(cache_dir=tmp_path, profiles=TrtProfiles(max_seq_len=48, opt_past_len=16, batch=2))
    (ep, options), fallback = spec.session_providers(SHAPE)
    assert ep == TENSORRT_EP and fallback == (CPU_EP, {})
    lo, opt, hi = (_profile(options, kind) for kind in ("min", "opt", "max"))
    assert set(lo) == set(opt) == set(hi) == set(SHAPE.input_names)
    for name in SHAPE.input_names:
        if is_past(name):
            assert lo[name] == [1, 2, 1, 8] and opt[name] == [2, 2, 16, 8] and hi[name] == [2, 2, 48, 8]
    assert (lo["input_ids"], opt["input_ids"], hi["input_ids"]) == ([1, 1], [2, 1], [2, 48])
    assert (lo["attention_mask"], hi["attention_mask"]) == ([1, 2], [2, 49])  # past >= 1, plus the dummy slot


def test_tensorrt_profiles_default_to_the_model_context_and_skip_dropped_inputs(tmp_path):
    fused = ModelShape(tuple(n for n in SHAPE.input_names if n != "position_ids"), CONTRACT)
    options = providers.trt_profile_options(TrtProfiles(), fused)
    hi = _profile(options, "max")
    assert "position_ids" not in hi and hi[past_value(1)] == [1, 2, 64, 8]
    assert _profile(options, "opt")[past_key(0)] == [1, 2, 64, 8]  # opt capped at the context


def test_specs_are_frozen():
    with pytest.raises(AttributeError):
        cpu().threads = 4  # type: ignore[misc]
    assert isinstance(tensorrt(cache_dir=Path("x")).options, tuple)


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", "fpu sse2 avx2 fma", True),                            # Haswell..Skylake, Zen 1-3: AVX2 only
    ("x86_64", "fpu avx2 avx512f avx512bw", True),                    # Skylake-X: AVX512 without VNNI
    ("x86_64", "fpu avx2 avx512f avx512bw avx512_vnni", False),       # Cascade Lake, Zen 4
    ("x86_64", "fpu avx2 avx_vnni", False),                           # Alder Lake
    ("aarch64", "fp asimd", False),                                   # ARM: widening kernels
])
def test_int8_gemm_saturates_exactly_on_x86_without_vnni(machine, flags, saturates):
    cpuinfo = f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert providers.int8_gemm_saturates(cpuinfo, machine) is saturates


def test_int8_gemm_saturation_unknown_flags_count_as_saturating_on_x86():
    assert providers.int8_gemm_saturates("processor\t: 0\n", "AMD64") is True
    assert providers.int8_gemm_saturates("processor\t: 0\n", "arm64") is False


def test_int8_gemm_saturation_matches_this_machine():
    """The flag test agrees with onnxruntime itself: u8 255 x s8 127 over K=64, which overflows int16 pairs."""
    import numpy as np
    from onnx import TensorProto, helper

    k = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 16])],
        [helper.make_tensor("B", TensorProto.INT8, [k, 16], [127] * (k * 16))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU_EP])
    y = session.run(None, {"A": np.full((1, k), 255, np.uint8)})[0]
    assert (int(y[0, 0]) != 255 * 127 * k) is providers.int8_gemm_saturates()
