"""4-bit MatMulNBits blocks with zero points, and 5- to 7-bit codes in 8-bit blocks: the packer's layout is
onnxruntime's, GPTQ's rounding on each grid survives packing exactly, and onnxruntime computes the packed weight."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.gptq import gptq_blockwise
from exporters.quantization.nbits import asymmetric_codes, asymmetric_grid, fake_nbits, pack, pack_asymmetric


def dequantized(p, k: int, block: int) -> np.ndarray:
    """(K, N) float64 of a 4-bit Packed with zero points, unpacked by hand."""
    n = p.packed.shape[0]
    codes = np.stack([p.packed & 15, p.packed >> 4], -1).reshape(n, -1).T.astype(np.float64)
    blocks = codes.shape[0] // block
    zeros = np.stack([p.zero_points & 15, p.zero_points >> 4], -1).reshape(n, -1)[:, :blocks].T
    return ((codes.reshape(blocks, block, n) - zeros[:, None]) * p.scales.T[:, None]).reshape(-1, n)[:k]


@pytest.mark.parametrize("k,block", [(64, 32), (96, 32), (128, 64), (48, 16)])
def test_asymmetric_blocks_are_what_onnxruntimes_quantizer_packs(k, block):
    """Same codes, scales and zero points as onnxruntime's C++ asymmetric block quantizer (an odd block count pads
    the last zero-point byte with 8, as it does)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n = 16
    w = np.random.default_rng(k).standard_normal((k, n)).astype(np.float32)
    mine = pack_asymmetric(w, 4, block)
    blocks = k // block
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, -(-blocks // 2)), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zeros, block, n, k, False)
    np.testing.assert_array_equal(mine.packed, packed)
    np.testing.assert_allclose(mine.scales, scales, rtol=1e-6)
    np.testing.assert_array_equal(mine.zero_points, zeros)
    # every value within half a step of its block's grid, and a block's min and max on it
    step = np.repeat(mine.scales.T, block, axis=0)
    assert np.all(np.abs(dequantized(mine, k, block) - w) <= step / 2 + 1e-6)


def test_gptq_on_the_asymmetric_grid_keeps_its_codes_and_beats_nearest_rounding():
    rng = np.random.default_rng(0)
    k, n, block = 256, 48, 32
    x = rng.standard_normal((1024, k)) * rng.gamma(1.0, 1.0, k)  # inputs of uneven energy
    h = x.T @ x
    w = rng.standard_normal((k, n))
    grid = asymmetric_grid(w, 4, block)
    rounded = gptq_blockwise(w, h, 4, block, grid=grid)
    packed = pack_asymmetric(rounded, 4, block, grid)
    np.testing.assert_allclose(dequantized(packed, k, block), rounded, atol=1e-6)

    def output_error(wq: np.ndarray) -> float:
        d = w - wq
        return float(np.trace(d.T @ h @ d) / np.trace(w.T @ h @ w))
    nearest = (asymmetric_codes(w, *grid, 4, block).reshape(-1, block, n) - grid[1][:, None]) * grid[0][:, None]
    assert output_error(rounded) < 0.95 * output_error(nearest.reshape(k, n))
    # the grid with zero points fits these weights closer than the symmetric one (16 levels over [min, max])
    assert output_error(nearest.reshape(k, n)) < output_error(fake_nbits(w.astype(np.float32), 4, block))


def test_onnxruntime_multiplies_by_the_packed_weight_with_its_zero_points():
    rng = np.random.default_rng(1)
    k, n, block = 192, 64, 32
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    p = pack(w, 4, block, zero_points=True)
    assert p.zero_points is not None and pack(w, 8, block, zero_points=True).zero_points is None  # 8-bit: symmetric
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(a, name) for a, name in
                               ((p.packed, "B"), (p.scales, "S"), (p.zero_points, "Z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = x.astype(np.float64) @ dequantized(p, k, block)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def nbits_product(p, x: np.ndarray, block: int) -> np.ndarray:
    """onnxruntime's MatMulNBits (fp32 compute) of `x` by the Packed weight `p` (no zero points)."""
    k, n = p.k, p.packed.shape[0]
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=p.bits,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n])],
                              [numpy_helper.from_array(p.packed, "B"), numpy_helper.from_array(p.scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_narrow_codes_in_8_bit_blocks_are_the_narrow_grid(bits):
    """5 to 7 bits: 8-bit MatMulNBits blocks whose codes span 2^bits levels around 128, each block's peak on
    -2^(bits-1); onnxruntime computes exactly the weight rounded to that grid."""
    rng = np.random.default_rng(bits)
    k, n, block = 96, 24, 32
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    p = pack(w, bits, block)
    top = 2 ** (bits - 1)
    assert p.bits == 8 and p.packed.shape == (n, k // block, block) and p.zero_points is None
    q = p.packed.astype(np.int32) - 128
    assert q.min() >= -top and q.max() <= top - 1 and (q.min(axis=2) == -top).all()  # every block's peak at -top
    grid = fake_nbits(w, bits, block)
    unpacked = (q * p.scales[..., None]).reshape(n, k).T
    np.testing.assert_allclose(unpacked, grid, rtol=1e-6, atol=1e-9)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(nbits_product(p, x, block), x.astype(np.float64) @ grid, rtol=1e-4, atol=1e-5)
    # finer than 4 bits and coarser than 8, by about 2x per bit
    errors = {b: np.abs(fake_nbits(w, b, block) - w).mean() for b in (4, bits, 8)}
    assert errors[8] * 2 ** (8 - bits) * 0.7 < errors[bits] < errors[4] / 2 ** (bits - 4) * 1.4


def test_gptq_at_6_bits_keeps_its_codes_in_8_bit_blocks():
    """GPTQ's 6-bit rounding, packed, is exactly what MatMulNBits unpacks: no code moves in the store."""
    rng = np.random.default_rng(6)
    k, n, block = 128, 16, 32
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((512, k))
    rounded = gptq_blockwise(w, x.T @ x, 6, block)
    p = pack(rounded, 6, block)
    unpacked = ((p.packed.astype(np.float64) - 128) * p.scales[..., None]).reshape(n, k).T
    np.testing.assert_allclose(unpacked, rounded, rtol=1e-6, atol=1e-9)
    assert (np.abs(p.packed.astype(np.int32) - 128) <= 32).all()


def test_a_narrow_tied_head_is_judged_against_the_table_s_own_blocks_at_its_width():
    """share_tied_table's guard for a rotated tie (E = W^T X): a 6-bit head's rows are as good as the table's own
    6-bit blocks (what storing it once at 6 bits asks), though 4x coarser than its own int8 blocks would be."""
    from exporters.quantization.embedding import SHARE_ERROR_RATIO, block_row_errors, code_width

    rng = np.random.default_rng(0)
    e = rng.standard_normal((512, 64)).astype(np.float32)
    x = np.linalg.qr(rng.standard_normal((64, 64)))[0].astype(np.float32)  # a rotation: W^T X = E
    w = np.ascontiguousarray((e @ x.T).T)
    narrow, full = pack(w, 6, 32), pack(w, 8, 32)
    assert code_width(narrow.packed) == 6 and code_width(full.packed) == 8
    shared6, own6 = block_row_errors(narrow.packed, narrow.scales, x, e)
    shared8, own8 = block_row_errors(full.packed, full.scales, x, e)
    assert shared6 <= SHARE_ERROR_RATIO * own6 and shared8 <= SHARE_ERROR_RATIO * own8
    assert own6 == pytest.approx(4 * own8, rel=0.15) and shared6 > SHARE_ERROR_RATIO * own8
