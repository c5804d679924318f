"""The GPU check's script (benchmarks/gpu/) on the CPU: the wheel carried in parts, the arguments, and a whole
run with the CPU provider standing in for CUDA, down to the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheels = load("wheels")


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    path.write_bytes(bytes(range(256)) * 40 + b"tail")  # 10,244 bytes
    return path


def test_a_wheel_split_in_parts_joins_back_byte_for_byte(wheel, tmp_path):
    folders = wheels.split(wheel, tmp_path / "carry", 4096)
    assert [f.name for f in folders] == ["p00", "p01", "p02"]
    sizes = [(f / f"{wheel.name}.part{k:02d}").stat().st_size for k, f in enumerate(folders)]
    assert sizes == [4096, 4096, 2052]
    manifests = [json.loads((f / wheels.MANIFEST).read_text()) for f in folders]
    assert all(m == manifests[0] for m in manifests) and manifests[0]["size"] == 10244
    joined = wheels.join(tmp_path / "carry", tmp_path / "out")
    assert joined.name == wheel.name and joined.read_bytes() == wheel.read_bytes()


def test_a_missing_part_is_named_and_nothing_is_written(wheel, tmp_path):
    folders = wheels.split(wheel, tmp_path / "carry", 4096)
    (folders[1] / f"{wheel.name}.part01").unlink()
    with pytest.raises(wheels.PartsError, match=r"1 of 3 parts missing \(.*part01\)"):
        wheels.join(tmp_path / "carry", tmp_path / "out")
    assert not (tmp_path / "out" / wheel.name).exists()


def test_a_damaged_part_fails_its_digest_and_leaves_no_file(wheel, tmp_path, capsys):
    folders = wheels.split(wheel, tmp_path / "carry", 4096)
    part = folders[2] / f"{wheel.name}.part02"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    assert wheels.main(["join", str(tmp_path / "carry"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part02 is damaged" in err[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_split_refuses_a_missing_wheel_in_one_line(tmp_path, capsys):
    assert wheels.main(["split", str(tmp_path / "none.whl"), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.whl'}: no such file"


def test_the_device_script_joins_from_the_folders_split_writes():
    text = (ROOT / "benchmarks" / "gpu" / "device.sh").read_text()
    assert "wheels.py join .gpu" in text and "run.py --out \"$OUT\" --provider cuda" in text
    assert "/.gpu/" in (ROOT / ".gitignore").read_text().splitlines()


run = load("run")


def test_arguments_default_to_the_two_shapes_and_refuse_unknown_ones(capsys):
    a = run.parse_args(["--out", "/tmp/x"])
    assert a.model == ["smollm2-135m", "llama-3.2-1b"] and a.provider == "cuda" and a.dtype == "float16"
    assert a.prompt_len == 512 and a.tensorrt
    with pytest.raises(SystemExit) as e:
        run.parse_args(["--out", "/tmp/x", "--model", "llama-9b"])
    assert e.value.code == 2 and "unknown model shape(s) llama-9b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--out", "/tmp/x", "--new-tokens", "0"])


def test_targets_are_ratios_against_eager_with_the_issue_thresholds():
    bench = {"torch_eager": {"prefill_ms": 30.0, "decode_ms": 12.0},
             "io_binding": {"prefill_ms": 20.0, "decode_ms": 5.0},
             "static": {"prefill_ms": 40.0, "decode_ms": 7.0},
             "cuda_graph": {"prefill_ms": 20.0, "decode_ms": 3.0}}
    t = run.targets(bench, {"passed": False})
    assert t["decode_io_binding_vs_eager"] == {"ratio": 2.4, "target": 2.0, "met": True}
    assert t["decode_static_vs_eager"]["met"] is False
    assert t["decode_cuda_graph_vs_eager"] == {"ratio": 4.0, "target": 3.0, "met": True}
    assert t["prefill_static_vs_eager"] == {"ratio": 0.75, "target": 1.0, "met": False}
    assert t["fp16_logits_within_check"] == {"met": False}


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    report = run.Report(tmp_path, {})
    where = {}

    def broken():
        raise RuntimeError("no CUDA here")

    assert report.step(where, "cuda", broken) is None
    assert report.step(where, "after", lambda: {"x": 1})["x"] == 1
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved is not None and where["cuda"]["error"] == "RuntimeError: no CUDA here" and where["after"]["x"] == 1


def test_the_whole_check_runs_with_the_cpu_standing_in(tmp_path):
    """Checkpoint, export, fp16 variant, the fp16 check against PyTorch, the benches of both host-side cache
    modes and of PyTorch eager, the targets and the TensorRT attempt, all in gpu.json."""
    pytest.importorskip("transformers")
    assert run.main(["--provider", "cpu", "--model", "tiny", "--out", str(tmp_path / "out"), "--work",
                     str(tmp_path / "work"), "--prompt-len", "24", "--new-tokens", "4", "--repeats", "1",
                     "--window", "32"]) == 0
    d = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert d["finished"] and d["environment"]["provider"] == "cpu"
    m = d["models"]["tiny"]
    assert Path(m["prepare"]["fp16"]).is_file() and "export" in m["prepare"]
    check = m["check"]
    assert check["passed"] and check["top1"] >= 0.98 and 0 < check["max_abs_diff"] <= 0.1
    for mode in ("io_binding", "static", "torch_eager"):
        assert m["bench"][mode]["prefill_ms"] > 0 and m["bench"][mode]["decode_ms"] > 0, mode
    assert "cuda_graph" not in m["bench"]  # the CPU has no CUDA graphs
    assert set(m["targets"]) == {"decode_io_binding_vs_eager", "prefill_io_binding_vs_eager",
                                 "decode_static_vs_eager", "prefill_static_vs_eager", "fp16_logits_within_check"}
    cmds = m["pipeline_commands"]  # the user's commands ran too, on the first shape
    assert cmds["check_exit"] in (0, 1) and cmds["check"]["top1"] >= 0.98 and not cmds["cuda_graph"]
    assert cmds["bench"]["decode_ms_p50"] > 0 and cmds["bench"]["provider_in_use"] == "CPUExecutionProvider"
    trt = d["tensorrt"]
    assert trt == {"listed": False, "loaded": False, "reason": "not in this onnxruntime", "seconds": trt["seconds"]}
