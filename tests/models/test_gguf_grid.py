"""models/gguf_grid.py reads llama.cpp's blocks into MatMulNBits' form: the same values gguf's dequantize gives,
for every byte pattern (random blocks, float16 fields set to finite values)."""

import gguf
import numpy as np
import pytest

from models.errors import UserError
from models.gguf_grid import BLOCK_BYTES, GRID_TYPES, Grid, read_grid, stack

# where each type keeps its float16 fields inside a block (the rest is codes and integer sub-scales)
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208]}


def random_tensor(kind: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    per_block, size = BLOCK_BYTES[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * k // per_block, size), dtype=np.uint8)
    for at in HALF_FIELDS[kind]:
        blocks[:, at:at + 2] = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", GRID_TYPES)
def test_every_type_reads_as_gguf_dequantizes_it(kind):
    data = random_tensor(kind, 6, 512)
    grid = read_grid(kind, data, (6, 512))
    want = gguf.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(6, 512)
    got = grid.dequantize()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert grid.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8)
    assert grid.block == (16 if kind == "Q6_K" else 32)
    assert grid.codes.dtype == np.uint8 and grid.codes.max() < 2 ** grid.bits
    assert (grid.minimum is not None) == (kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))
    assert grid.scale.coarse.dtype == np.float16  # stored as the file stores it, not widened


def test_stacked_parts_of_different_types_stay_exact():
    parts = [read_grid("Q5_0", random_tensor("Q5_0", 4, 256, 1), (4, 256)),
             read_grid("Q8_0", random_tensor("Q8_0", 2, 256, 2), (2, 256)),
             read_grid("Q4_1", random_tensor("Q4_1", 3, 256, 3), (3, 256)),
             read_grid("Q6_K", random_tensor("Q6_K", 2, 256, 4), (2, 256))]
    mixed = stack(parts)
    assert (mixed.type, mixed.bits, mixed.block) == ("mixed", 8, 16) and mixed.minimum is not None
    want = np.concatenate([p.dequantize() for p in parts])
    np.testing.assert_allclose(mixed.dequantize(), want, rtol=1e-6, atol=1e-7)
    same = stack(parts[:1] * 2)  # one type: the stored float16 form is kept
    assert same.type == "Q5_0" and same.scale.coarse.dtype == np.float16
    np.testing.assert_array_equal(same.dequantize(), np.concatenate([parts[0].dequantize()] * 2))
    alike = stack(parts[:2])  # Q5_0 and Q8_0: both 8-bit codes with a float16 scale per 32, kept so
    assert alike.type == "mixed" and alike.scale.coarse.dtype == np.float16
    np.testing.assert_array_equal(alike.dequantize(), np.concatenate([p.dequantize() for p in parts[:2]]))


def test_rows_reorder_every_field():
    g = read_grid("Q4_K", random_tensor("Q4_K", 5, 256), (5, 256))
    order = np.array([3, 0, 4, 1, 2])
    np.testing.assert_array_equal(g.rows(order).dequantize(), g.dequantize()[order])


def test_unsupported_types_and_damaged_tensors_are_one_line():
    with pytest.raises(UserError, match="GGUF type Q2_K has no exact MatMulNBits form"):
        read_grid("Q2_K", np.zeros((1, 84), np.uint8), (1, 256))
    with pytest.raises(UserError, match="cannot hold 30 bytes: the file is damaged"):
        read_grid("Q8_0", np.zeros(30, np.uint8), (1, 32))
    assert isinstance(read_grid("Q8_0", np.zeros(34, np.uint8), (1, 32)), Grid)
