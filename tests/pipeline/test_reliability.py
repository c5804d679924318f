"""Every failure a user can cause ends in one line and a non-zero exit, and a run directory never lies.

Numbered tests follow the reliability issue's list; then the fault-injection suite (an OSError at every write
of every stage, SIGINT at several points of real subprocess runs) and a property test over the CLI's numeric
options.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.cli import main
from pipeline.manifest import MANIFEST, STAGING_PREFIX, TRASH_PREFIX, RunDir, sha256
from runtimes.bundle import verify_bundle
from tests.pipeline.conftest import make_hf_checkpoint
from tests.pipeline.faults import WriteFaults, assert_consistent, run_state

REPO = Path(__file__).resolve().parents[2]


def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_line(result, *needles: str, code: int = 2) -> str:
    """The command failed with `code`, printing one `error:` line and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, llama_dir, text_file) -> Path:
    """A run with fp32, fused and w8: copied by each test that changes it."""
    out = tmp_path_factory.mktemp("base") / "run"
    invoke("export", "--model", llama_dir, "--graph", "traced", "--out", out)
    invoke("optimize", out)
    invoke("quantize", out, "--recipe", "w8", "--calib-text", text_file)
    return out


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest, copy_function=shutil.copy2)  # copy2 keeps mtimes, as `cp -a` would
    return dest


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen") / "ckpt", "qwen2", seed=1)


# ---- 1. out of disk space, read-only output ----------------------------------------------------------------

def small_tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount namespace)")
    return path


@pytest.fixture
def full_disk(tmp_path):
    mount = small_tmpfs(tmp_path / "full", "300k")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_1_a_full_disk_is_one_line_and_leaves_nothing(full_disk, llama_dir, run, tmp_path):
    one_line(invoke("export", "--model", llama_dir, "--out", full_disk / "run", ok=False), "No space left")
    assert list(full_disk.iterdir()) == []  # not even an empty run directory
    one_line(invoke("package", run, "--out", full_disk / "bundle", "--variant", "fused", ok=False),
             "No space left")
    assert list(full_disk.iterdir()) == []


@pytest.mark.parametrize("command", ["export", "optimize", "package"])
def test_1_a_read_only_run_or_output_is_one_line(command, run, llama_dir, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: make the directory a read-only mount
        target = small_tmpfs(tmp_path / "ro", "1m")
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    try:
        if command == "export":
            one_line(invoke("export", "--model", llama_dir, "--out", target / "run", ok=False))
        elif command == "package":
            one_line(invoke("package", run, "--out", target / "bundle", "--variant", "fused", ok=False))
        else:  # the run itself read-only
            shutil.copytree(run, tmp_path / "ro-run")
            before = run_state(tmp_path / "ro-run")
            for p in [tmp_path / "ro-run", *(tmp_path / "ro-run").rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            if os.geteuid() == 0:
                pytest.skip("root ignores directory permission bits; the read-only mount cases cover root")
            one_line(invoke("optimize", tmp_path / "ro-run", ok=False), "Permission denied")
            assert run_state(tmp_path / "ro-run") == before
        assert list(target.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(target)], capture_output=True)


# ---- 2. bench fails loudly ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--new-tokens", "0"], "new_tokens is 0"),
    (["--prompt-len", "0"], "prompt_len is 0"),
    (["--prompt-len", "100000"], "context of 512"),
    (["--repeats", "0"], "repeats is 0"),
    (["--threads", "-1"], "threads is -1"),
    (["--threads", "two"], "'two' is not a valid integer"),
])
def test_2_bench_refuses_bad_options_before_running(run, args, needle):
    before = run_state(run)
    one_line(invoke("bench", run, "--compare", "none", *args, ok=False), needle)
    assert run_state(run) == before  # nothing recorded


def test_2_bench_refuses_a_corrupt_variant(run):
    (run / "variants/w8/model.onnx").write_bytes(b"not a model")
    one_line(invoke("bench", run, "--variant", "w8", "--compare", "none", ok=False), "differs from what")


def test_2_a_runner_that_fails_fails_bench_and_is_not_a_result(run, tmp_path, monkeypatch):
    import pipeline.stages.bench as bench

    real = bench.bench_variant
    monkeypatch.setattr(bench, "bench_variant", lambda path, config, cache: (
        {"error": "onnxruntime could not load it"} if path.parent.name == "w8" else real(path, config, cache)))
    r = invoke("bench", run, "--variant", "fused", "--variant", "w8", "--compare", "none", "--new-tokens", "4",
               "--repeats", "1", ok=False)
    line = one_line(r, "1 runner(s) failed (w8)", "onnxruntime could not load it", code=1)
    assert "error: error:" not in r.output and line.count("error:") == 1
    assert "fused" in r.output  # the rows that ran are still printed
    bench_stage = RunDir(run).load()["stages"][-1]
    assert bench_stage["stage"] == "bench" and bench_stage["results"]["failed"] == ["w8"]
    from pipeline.stages.package import bench_row

    stages = RunDir(run).load()["stages"]
    assert bench_row(stages, "w8") is None and bench_row(stages, "fused")["decode_ms_p50"] > 0


# ---- 3. check's window is bounded by the context and by memory ---------------------------------------------

def test_3_check_windows_are_bounded(run, text_file):
    one_line(invoke("check", run, "--windows", "1", "--window", "100000", "--text", text_file, ok=False),
             "context of 512")
    one_line(invoke("check", run, "--windows", "0", ok=False), "windows is 0")
    from pipeline.stages.check import CheckConfig, check_fits
    from models.errors import UserError

    # 8 float64 copies of (8192, 16384) logits: 8 GiB; 8 heads of 8192^2 float32 scores, twice: 4 GiB
    with pytest.raises(UserError, match=r"needs about 12\.0 GiB .* more than the 4\.0 GiB available: give a window "
                                        r"of at most 2048"):
        check_fits(CheckConfig(window=8192), context=8192, vocab=16384, heads=8, available=4 << 30)
    check_fits(CheckConfig(window=2048), context=8192, vocab=16384, heads=8, available=4 << 30)


# ---- 4. re-export removes what was derived from the old model; lineage is checked -------------------------

def test_4_reexporting_the_same_model_keeps_its_variants(run, llama_dir):
    before = RunDir(run).load()["artifacts"]
    invoke("export", "--model", llama_dir, "--graph", "traced", "--out", run)
    after = RunDir(run).load()["artifacts"]
    assert set(after) == set(before) and after["fp32"]["digest"] == before["fp32"]["digest"]
    invoke("generate", run, "--variant", "w8", "--prompt", "def", "--max-new-tokens", "2")  # lineage still holds


def test_4_reexport_drops_the_old_models_variants(run, qwen_dir, tmp_path, capsys):
    llama_w8 = sha256(run / "variants/w8/model.onnx")
    invoke("export", "--model", qwen_dir, "--graph", "traced", "--out", run)
    assert sorted(p.name for p in (run / "variants").iterdir()) == ["fp32"]
    data = RunDir(run).load()
    assert set(data["artifacts"]) == {"source", "fp32", "tokenizer", "hf_config"}
    assert data["artifacts"]["source"]["family"] == "qwen2"
    one_line(invoke("package", run, "--out", tmp_path / "b", "--variant", "w8", ok=False), "no variant 'w8'")
    one_line(invoke("generate", run, "--variant", "w8", "--prompt", "x", ok=False), "no variant 'w8'")
    invoke("package", run, "--out", tmp_path / "b")
    shipped = json.loads((tmp_path / "b/manifest.json").read_text())
    assert shipped["variant"] == "fp32" and shipped["source"]["family"] == "qwen2"
    assert shipped["files"]["model.onnx"]["sha256"] != llama_w8
    assert shipped["lineage"][-1]["artifact"] == "source"


@pytest.mark.parametrize("command", ["check", "bench", "package", "generate", "quantize"])
def test_4_a_variant_whose_parent_changed_is_refused(run, text_file, tmp_path, command):
    data = json.loads((run / MANIFEST).read_text())
    data["artifacts"]["fused"]["digest"] = "0" * 64  # fused replaced by hand, w8 still says it came from the old
    (run / MANIFEST).write_text(json.dumps(data))
    args = {"check": ["--variant", "w8", "--text", text_file], "bench": ["--variant", "w8", "--compare", "none"],
            "package": ["--variant", "w8", "--out", tmp_path / "b"], "generate": ["--variant", "w8", "--prompt", "x"],
            "quantize": ["--source", "w8", "--recipe", "w4", "--calib-text", text_file]}[command]
    one_line(invoke(command, run, *args, ok=False), "was made from an earlier 'fused'")


# ---- 5. Ctrl-C in export's parity check leaves the run as it was -------------------------------------------

def test_5_interrupted_validation_publishes_nothing(run, llama_dir, qwen_dir, monkeypatch):
    import exporters.export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporters.export, "validate_export", interrupted)
    before = run_state(run)
    r = invoke("export", "--model", qwen_dir, "--graph", "traced", "--out", run, ok=False)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert run_state(run) == before
    assert_consistent(run)
    monkeypatch.undo()
    invoke("generate", run, "--variant", "fp32", "--prompt", "def", "--max-new-tokens", "2")


# ---- 6. a bundle without its manifest does not run ---------------------------------------------------------

def test_6_a_bundle_without_its_manifest_is_refused(run, tmp_path, capsys):
    from runtimes.__main__ import main as runtime_main

    out = tmp_path / "b"
    invoke("package", run, "--out", out, "--variant", "fused")
    (out / "manifest.json").unlink()
    for target in (out, out / "model.onnx"):
        assert runtime_main(["generate", str(target), "--prompt", "def", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no manifest.json" in err and len(err.strip().splitlines()) == 1


# ---- 7. an output directory that is not a run directory is never written into ------------------------------

def test_7_export_onto_a_checkpoint_directory_is_refused(llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_dir, ckpt)
    before = run_state(ckpt)
    one_line(invoke("export", "--model", ckpt, "--out", ckpt, ok=False), "not a run directory")
    assert run_state(ckpt) == before


# ---- 8. a hand-edited manifest ------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("artifacts"), "`artifacts` is not an object"),
    (lambda d: d.__setitem__("artifacts", []), "`artifacts` is not an object"),
    (lambda d: d["artifacts"]["w8"].pop("files"), "artifact 'w8' lacks"),
    (lambda d: d.__setitem__("stages", {}), "`stages` is not a list"),
    (lambda d: d.__setitem__("schema", 1), "schema 1"),
])
def test_8_a_malformed_manifest_is_one_line(run, edit, needle):
    data = json.loads((run / MANIFEST).read_text())
    edit(data)
    (run / MANIFEST).write_text(json.dumps(data))
    for args in (["generate", run, "--prompt", "x"], ["check", run], ["package", run, "--out", run.parent / "b"]):
        one_line(invoke(*args, ok=False), needle)
    (run / MANIFEST).write_text("[1, 2")
    one_line(invoke("generate", run, "--prompt", "x", ok=False), "is corrupt")


# ---- 9. a prompt that is not UTF-8 -------------------------------------------------------------------------

def test_9_a_non_utf8_prompt_is_one_line(run, tmp_path):
    prompt = b"\xff\xfe\x80abc"
    p = subprocess.run([sys.executable, "-m", "pipeline", "generate", str(run), "--prompt", prompt],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and p.stderr.strip() == "error: the prompt is not valid UTF-8 text (byte 0 of it): " \
                                                      "pass UTF-8 text", p.stderr
    invoke("package", run, "--out", tmp_path / "b", "--variant", "fused")
    p = subprocess.run([sys.executable, "-m", "runtimes", "generate", str(tmp_path / "b"), "--prompt", prompt],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---- minor ---------------------------------------------------------------------------------------------------

def test_negative_threads_are_refused_everywhere(run, tmp_path, capsys):
    from runtimes.__main__ import main as runtime_main

    one_line(invoke("generate", run, "--prompt", "x", "--threads", "-1", ok=False), "threads is -1")
    one_line(invoke("bench", run, "--threads", "-3", ok=False), "threads is -3")
    invoke("package", run, "--out", tmp_path / "b", "--variant", "fused")
    assert runtime_main(["generate", str(tmp_path / "b"), "--prompt", "def", "--threads", "-1"]) == 2
    assert "threads" in capsys.readouterr().err


def test_a_failed_command_leaves_no_empty_directory(tmp_path):
    one_line(invoke("export", "--model", tmp_path / "nothing", "--out", tmp_path / "a/b/run", ok=False))
    assert list(tmp_path.iterdir()) == []


def test_calibration_options_are_named_as_the_user_wrote_them(run):
    line = one_line(invoke("quantize", run, "--calib-windows", "0", ok=False), "calib_windows is 0")
    assert "num_prefill" not in line and "seq_len" not in line


def test_a_wrong_shape_checkpoint_is_one_line(llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    weights = load_file(str(bad / "model.safetensors"))
    name = next(n for n in weights if n.endswith("q_proj.weight"))
    weights[name] = torch.zeros(3, 5)
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    p = subprocess.run([sys.executable, "-m", "pipeline", "export", "--model", str(bad), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    assert not (tmp_path / "run").exists()


# ---- fault injection: an OSError at every write of every stage ---------------------------------------------

def fault_commands(run: Path, llama_dir: Path, text_file: Path, out: Path) -> dict[str, list]:
    return {
        "export": ["export", "--model", llama_dir, "--out", run],  # into a run with variants: a replacement
        "optimize": ["optimize", run],
        "quantize": ["quantize", run, "--recipe", "w8a8", "--calib-text", text_file, "--calib-windows", "2"],
        "package": ["package", run, "--out", out, "--variant", "w8"],
    }


@pytest.mark.parametrize("stage", ["export", "optimize", "quantize", "package"])
def test_an_oserror_at_any_write_leaves_the_run_as_it_was(stage, base_run, llama_dir, text_file, tmp_path,
                                                          monkeypatch):
    def fresh(i: int) -> tuple[list, Path, Path]:
        run = tmp_path / f"run{i}"
        shutil.copytree(base_run, run, copy_function=shutil.copy2)
        return fault_commands(run, llama_dir, text_file, tmp_path / f"bundle{i}")[stage], run, tmp_path / f"bundle{i}"

    args, _, _ = fresh(0)
    with monkeypatch.context() as m:
        writes = WriteFaults(m)
        invoke(*args)
    assert writes.count >= 5, writes.paths
    codes = (errno.ENOSPC, errno.EROFS, errno.EACCES)
    failed, survived = 0, []
    for i in range(1, writes.count + 1):
        args, run, bundle = fresh(i)
        before = run_state(run)
        with monkeypatch.context() as m:
            WriteFaults(m, fail_at=i, err=codes[i % 3])
            r = invoke(*args, ok=False)
        if r.exit_code == 0:  # a library caught it and carried on (torch's caches)
            survived.append(writes.paths[i - 1])
            assert_consistent(run)
            continue
        one_line(r, os.strerror(codes[i % 3]))
        failed += 1
        assert_consistent(run)
        assert run_state(run) == before, f"write {i} ({writes.paths[i - 1]}) changed the run"
        assert not bundle.exists() or verify_bundle(bundle)  # no bundle, or a whole one
        if i < writes.count:
            shutil.rmtree(run)
    assert all(not p.startswith(str(tmp_path)) for p in survived), survived  # every write of ours fails the stage
    invoke(*args)  # and the stage reruns cleanly after the last failure
    assert_consistent(run)


# ---- SIGINT at several points of real runs -----------------------------------------------------------------

def pipeline_process(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("stage", ["export", "optimize", "quantize", "package"])
def test_sigint_at_any_moment_leaves_a_consistent_run(stage, base_run, llama_dir, text_file, tmp_path):
    def fresh(i: int) -> tuple[list, Path]:
        run = tmp_path / f"run{i}"
        shutil.copytree(base_run, run, copy_function=shutil.copy2)
        return fault_commands(run, llama_dir, text_file, tmp_path / f"bundle{i}")[stage], run

    args, _ = fresh(0)
    start = time.monotonic()
    proc = pipeline_process(args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    duration = time.monotonic() - start
    for i, fraction in enumerate((0.5, 0.8, 0.95), 1):
        args, run = fresh(i)
        before = run_state(run)
        proc = pipeline_process(args)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 130), err
        assert "Traceback" not in err, err
        assert_consistent(run)
        if proc.returncode == 130 and "had finished and published its outputs" not in err:
            assert run_state(run) == before
        bundle = tmp_path / f"bundle{i}"
        assert not bundle.exists() or verify_bundle(bundle)
        assert pipeline_process(args).wait(timeout=300) == 0  # a rerun succeeds
        assert_consistent(run)


# ---- property: any numeric option either runs or is one line -----------------------------------------------

class Accepted(Exception):
    """Raised by a stand-in stage: the options passed every check the CLI and the stage config make."""


NUMERIC = {
    "bench": ["--threads", "--prompt-len", "--new-tokens", "--repeats"],
    "check": ["--windows", "--window", "--steps"],
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--threads"],
    "quantize": ["--calib-windows", "--window", "--max-ppl-increase", "--w4-max-ppl-increase", "--block-size",
                 "--accuracy-level", "--online-hadamard", "--outlier-channels"],
    "train": ["--max-seconds", "--max-steps"],
}
VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", " ", "1e3", "0x10", "two", "-0", "nan", "inf", "1_000"]))


@pytest.fixture
def stand_in_stages(monkeypatch):
    def accept(*args, **kwargs):
        raise Accepted

    for module, fn in (("bench", "bench"), ("check", "check"), ("generate", "generate"), ("quantize", "quantize"),
                       ("train", "train")):
        monkeypatch.setattr(f"pipeline.stages.{module}.{fn}", accept)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_numeric_option_value_is_accepted_or_one_line(data, run, stand_in_stages):
    command = data.draw(st.sampled_from(sorted(NUMERIC)))
    option = data.draw(st.sampled_from(NUMERIC[command]))
    value = data.draw(VALUES)
    args = {"generate": [run, "--prompt", "x"], "train": ["--out", run.parent / "t"]}.get(command, [run])
    result = CliRunner().invoke(main, [command, *map(str, args), f"{option}={value}"])
    if isinstance(result.exception, Accepted):
        return
    one_line(result)


@pytest.mark.parametrize("value", [str(2**70), "8192"])
def test_a_huge_online_hadamard_block_is_one_line(run, value):
    """A valid order far wider than any MatMul input (2^70 once exhausted the machine's memory building the
    matrix, where the option is checked) is refused with one line before anything is built."""
    one_line(CliRunner().invoke(main, ["quantize", str(run), f"--online-hadamard={value}"]), "online_hadamard")


@pytest.mark.parametrize("args", [
    ["bench", "--threads", "1", "--prompt-len", "1", "--new-tokens", "1", "--repeats", "1", "--compare", "none",
     "--variant", "w8"],
    ["bench", "--prompt-len", "500", "--new-tokens", "12", "--repeats", "1", "--compare", "none", "--variant", "fused"],
    ["check", "--windows", "1", "--window", "2", "--steps", "0", "--variant", "fused"],
    ["generate", "--prompt", "x", "--max-new-tokens", "0", "--temperature", "0", "--top-k", "0", "--top-p", "1e-9",
     "--seed", "0", "--threads", "1"],
    ["generate", "--prompt", "x", "--max-new-tokens", "3", "--temperature", "1e30", "--top-k", "1000000",
     "--seed", str(2**64)],
])
def test_boundary_values_run(run, text_file, args):
    extra = ["--text", text_file] if args[0] == "check" else []
    invoke(args[0], run, *args[1:], *extra)


@pytest.mark.parametrize("prefix", [STAGING_PREFIX, TRASH_PREFIX])
def test_a_sigint_while_a_stage_cleans_up_is_delivered_once_the_directory_is_gone(prefix, run, monkeypatch):
    """A Ctrl-C landing as a stage removes its staging (or trash) directory, after its commit: the directory goes
    whole, then the command stops with 130 and says the stage had published (it had)."""
    rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if Path(path).name.startswith(prefix):
            os.kill(os.getpid(), signal.SIGINT)
        rmtree(path, *args, **kwargs)

    before = run_state(run)
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    result = invoke("optimize", run, ok=False)
    assert result.exit_code == 130, result.output
    assert f"interrupted: nothing half-written was left behind; `optimize` in {run} had finished" in result.output
    assert_consistent(run)
    assert run_state(run) != before and RunDir(run).verified("fused").is_file()


def test_an_error_after_a_ctrl_c_without_its_chain_is_an_interrupt_too():
    """A Ctrl-C that lands inside C code can surface as another error with no KeyboardInterrupt in its chain
    (safetensors reading a tensor raised a ValueError about a torch storage): once a SIGINT arrived, the command
    stops as for any Ctrl-C (exit 130, one line), no traceback."""
    code = ("import os, signal, pipeline.cli, pipeline.__main__ as m\n"
            "def failing():\n"
            "    try:\n        os.kill(os.getpid(), signal.SIGINT)\n    except KeyboardInterrupt:\n        pass\n"
            "    raise ValueError('could not determine the shape of object type')\n"
            "pipeline.cli.main = failing\nm.entry()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted", done.stderr


@pytest.mark.parametrize("interrupted", [True, False])
def test_an_error_a_ctrl_c_caused_is_an_interrupt_and_any_other_still_a_failure(interrupted):
    """A Ctrl-C that lands while an extension module initializes surfaces as that import's ImportError raised
    from the KeyboardInterrupt: the command then stops as for any Ctrl-C (exit 130, one line); an ImportError of
    its own is not hidden."""
    raise_it = ("try:\n        raise KeyboardInterrupt\n    except KeyboardInterrupt as e:\n"
                "        raise ImportError('initialization failed') from e" if interrupted
                else "raise ImportError('initialization failed')")
    code = ("import pipeline.cli, pipeline.__main__ as m\n"
            f"def failing():\n    {raise_it}\n"
            "pipeline.cli.main = failing\nm.entry()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    if interrupted:
        assert done.returncode == 130 and done.stderr.strip() == "interrupted"
    else:
        assert done.returncode == 1 and "ImportError: initialization failed" in done.stderr
