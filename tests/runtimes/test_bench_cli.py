"""bench_model numbers, and `python -m runtimes` as the orchestrator and a user call it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtimes.__main__ import main
from runtimes.bench import bench_model
from runtimes.errors import RuntimeUserError
from runtimes.providers import cpu

from .conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtimes", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bench_returns_sane_numbers(tiny_model):
    r = bench_model(tiny_model, cpu(), prompt_len=6, new_tokens=5, warmup=1, repeats=3, threads=1)
    assert r["provider_in_use"] == "CPUExecutionProvider" and r["kv_dtype"] == "float32"
    assert 0 < r["prefill_ms"] < 10_000 and 0 < r["decode_ms_p50"] <= r["decode_ms_p90"] < 10_000
    assert r["tokens_per_s"] > 0 and r["cold_start_ms"] >= r["session_create_ms"] > 0
    assert r["file_bytes"] == tiny_model.stat().st_size and r["peak_rss_mb"] > 10


def test_bench_rejects_bad_sizes(tiny_model):
    with pytest.raises(RuntimeUserError, match="repeats is 0"):
        bench_model(tiny_model, repeats=0)
    with pytest.raises(RuntimeUserError, match="context of 64"):
        bench_model(tiny_model, prompt_len=60, new_tokens=10)


def test_bench_json_subcommand_prints_one_json_object(tiny_model):
    out = run_cli("bench", str(tiny_model), "--provider", "cpu", "--threads", "1", "--prompt-len", "4",
                  "--new-tokens", "3", "--warmup", "0", "--repeats", "2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["threads"] == 1 and result["new_tokens"] == 3 and result["peak_rss_mb"] > 0


@pytest.mark.parametrize("command", [["bench"], ["generate", "--prompt", "hi"]])
def test_missing_model_prints_one_line_and_exits_2(tmp_path, command):
    out = run_cli(command[0], str(tmp_path / "missing.onnx"), *command[1:])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_absent_provider_from_the_cli_names_the_install_line(tiny_model, capsys):
    assert main(["bench", str(tiny_model), "--provider", "tensorrt", "--trt-fp16"]) == 2
    assert "pip install 'edge-pipeline[tensorrt]'" in capsys.readouterr().err


def test_provider_option_for_another_provider_is_rejected(tiny_model, capsys):
    assert main(["bench", str(tiny_model), "--trt-fp16"]) == 2
    assert "takes no option fp16" in capsys.readouterr().err


def test_cuda_graphs_are_a_cuda_option(tiny_model, capsys):
    assert main(["bench", str(tiny_model), "--cuda-graph"]) == 2
    assert "takes no option graph" in capsys.readouterr().err
    from runtimes.providers import CUDA_EP, available

    if not available(CUDA_EP):  # where CUDA loads, the same command benches
        assert main(["bench", str(tiny_model), "--provider", "cuda", "--cuda-graph"]) == 2
        assert "pip install 'edge-pipeline[gpu]'" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DEBUG", "1")
    with pytest.raises(RuntimeUserError):
        main(["bench", str(tmp_path / "missing.onnx")])


def test_ctrl_c_exits_130(tiny_model, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("runtimes.bench.bench_model", interrupted)
    assert main(["bench", str(tiny_model)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_generate_subcommand_streams_text(bundle, capsys):
    assert main(["generate", str(bundle / "model.onnx"), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--temperature", "0.8",
                 "--top-k", "20", "--top-p", "0.9", "--seed", "3"]) == 0
    words = capsys.readouterr().out.split()
    assert len(words) == 4


def test_peak_memory_is_the_runners_own_not_its_parents():
    """ru_maxrss survives fork+exec on Linux: a runner started by a big parent would report the parent's peak."""
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(400 << 20, dtype=np.uint8)  # touch 400 MB in this (parent) process
    out = subprocess.run([sys.executable, "-c", "from runtimes.bench import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True)
    assert ballast.sum() == 400 << 20
    assert 5 < float(out.stdout) < 300


def test_one_harness_times_every_runner_alike(monkeypatch):
    """Ours and the peers' rows come from runtimes.bench.measure: a cold run, warm-ups, then timed repeats;
    tokens/s is new tokens over the median repeat's decode time (peers once used 1000 / median step)."""
    import runtimes.bench as bench

    ticks = iter(range(10**6))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks) * 1e-3)  # every call 1 ms later
    calls = []
    result = bench.measure(lambda: calls.append("prefill"), lambda state: calls.append("step"), new_tokens=4,
                           warmup=2, repeats=3)
    assert calls.count("prefill") == 1 + 2 + 3 and calls.count("step") == 4 * 6
    assert result["prefill_ms"] == pytest.approx(1.0) and result["decode_ms_p50"] == pytest.approx(1.0)
    assert result["tokens_per_s"] == pytest.approx(4 / 4e-3) and result["first_run_ms"] == pytest.approx(5.0)


def scripted(monkeypatch, prefill_ms: list[float], step_ms: list[list[float]]):
    """(prefill, step) whose durations come from a script, one entry per run (cold, warm-ups, repeats), on a fake
    clock that only moves when they run."""
    import runtimes.bench as bench

    now, run = [0.0], [-1]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def prefill():
        run[0] += 1
        now[0] += prefill_ms[run[0]] * 1e-3
        return 0

    def step(i):
        now[0] += step_ms[run[0]][i] * 1e-3
        return i + 1

    return prefill, step


@pytest.mark.parametrize("decode,noisy", [
    ([1.00, 1.02, 1.05, 0.98, 1.00], False),  # spread 7%: steady
    ([1.00, 1.00, 1.00, 1.00, 1.30], True),   # one slow repeat: spread 30%
    ([2.00, 1.00, 1.00, 1.00, 1.00], True),   # one slow repeat first
])
def test_harness_reports_the_spread_over_repeats_and_flags_noise(monkeypatch, decode, noisy):
    """Each repeat's decode figure is its median step: a repeat of steps (d, d, 9d) counts as d, not its mean."""
    from runtimes.bench import measure

    prefill = [50.0, 40.0, 12.0, 10.0, 11.0, 14.0, 9.0]  # cold, 1 warm-up, 5 repeats
    steps = [[5.0] * 3, [5.0] * 3] + [[d, d, 9 * d] for d in decode]
    r = measure(*scripted(monkeypatch, prefill, steps), new_tokens=3, warmup=1, repeats=5)
    assert r["prefill_ms_min"] == pytest.approx(9.0) and r["prefill_ms_max"] == pytest.approx(14.0)
    assert r["prefill_ms"] == pytest.approx(11.0) and r["prefill_ms_repeats"] == pytest.approx(prefill[2:])
    assert r["decode_ms_repeats"] == pytest.approx(decode)
    assert r["decode_ms_min"] == pytest.approx(min(decode)) and r["decode_ms_max"] == pytest.approx(max(decode))
    assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
    assert r["decode_ms_min"] <= r["decode_ms_p50"] <= r["decode_ms_max"]
    assert r["decode_ms_p90"] > r["decode_ms_max"]  # the slow third steps: p90 is over every step
    assert r["first_run_ms"] == pytest.approx(65.0)
    assert r["noisy"] is noisy and (r["noisy_reason"] is not None) is noisy
    if noisy:
        assert "decode spread" in r["noisy_reason"]


def test_harness_says_fewer_than_five_repeats_are_too_few_to_judge(monkeypatch):
    from runtimes.bench import measure

    r = measure(*scripted(monkeypatch, [1.0] * 3, [[1.0, 1.0]] * 3), new_tokens=2, warmup=0, repeats=2)
    assert r["decode_ms_min"] == pytest.approx(1.0) and r["decode_ms_max"] == pytest.approx(1.0)  # no spread, yet
    assert r["noisy"] is True and r["noisy_reason"] == "fewer than 5 repeats (2)"


def test_the_spread_rule_is_over_ten_percent_of_the_median():
    from runtimes.bench import noisy_reason

    assert noisy_reason([1.0, 1.0, 1.0, 1.05, 1.099]) is None  # 9.9%
    assert noisy_reason([1.0, 1.0, 1.0, 1.05, 1.101]) == "decode spread 10.1% (over 10%)"
    assert noisy_reason([2.0, 2.0, 2.0, 2.1, 2.19]) is None  # 0.19 over a median of 2: relative, not absolute
