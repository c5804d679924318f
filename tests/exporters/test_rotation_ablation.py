"""benchmarks/rotation_ablation.py (docs/benchmarks.md's "The ablation behind w8a8's defaults") runs on the quantization
passes: on a tiny run directory laid out as benchmarks/smollm2.py lays one out, it prints its three lines with finite
figures, and with w8a8's defaults the float graph (rotated, smoothed, split, online Hadamard) is the fused graph's
equal in float."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.pipeline.conftest import TEXT, make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FIGURES = re.compile(r"held-out ppl ([-+]\d+\.\d\d)%, top-1 (\d\.\d{3}), KL (\d+\.\d{4})")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablation")
    run = root / "run"
    for args in (["export", "--model", str(make_hf_checkpoint(root / "ckpt", "llama")), "--out", str(run)],
                 ["optimize", str(run)]):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    (run / "text").mkdir()
    for name in ("calib.txt", "eval.txt"):
        (run / "text" / name).write_text(TEXT)
    return run


def ablation(run: Path, *args: str) -> list[str]:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/rotation_ablation.py"), "--run", str(run),
                        "--calib-windows", "4", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3, p.stdout
    for line in lines:
        figures = FIGURES.search(line)
        assert figures and all(math.isfinite(float(x)) for x in figures.groups()), line
    return lines


def test_defaults_are_w8a8s_passes_and_exact_in_float(run_dir):
    float_graph, static, down = ablation(run_dir)
    # the float passes change the float graph's perplexity by float rounding only (either sign: "-0.00%" too)
    assert re.match(r"float graph: held-out ppl [+-]0\.00%,", float_graph), float_graph
    label = "rotate r1r2, smooth down, outlier channels <= 16, online block 128, percentile ranges, "
    assert static.startswith(label) and ": all 9 MatMuls static: " in static, static
    assert down.startswith(label) and ": down_proj 8-bit weight-only: " in down, down


def test_unrotated_smoothing_of_every_group(run_dir):
    float_graph, static, down = ablation(run_dir, "--rotate", "none", "--smooth", "all", "--online-block", "0",
                                         "--weight-bits", "7")
    assert float_graph.startswith("float graph: held-out ppl "), float_graph
    label = "rotate none, smooth all, outlier channels <= 16, online block -, percentile ranges, 7-bit weights"
    assert static.startswith(label + ": all 9 MatMuls static: "), static
    assert down.startswith(label + ": down_proj 8-bit weight-only: "), down
