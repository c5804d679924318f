"""Options declared once: the CLI flag, the TOML key, the checks and docs/config.md all come from the stage
configs, so they agree by construction; these tests hold them to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from models.errors import UserError
from pipeline.cli import main
from pipeline.options import flag_name, options_of
from pipeline.stages.run import ORDER, STAGES, markdown

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {"train": "train", "export": "export", "optimize": "optimize", "quantize": "quantize", "check": "check",
            "bench": "bench", "package": "package", "prune": "prune", "distill": "distill"}
ARGUMENTS = {"prune": {"source"}}  # options the command takes as its argument (`pipeline prune SOURCE`)


@pytest.mark.parametrize("stage", ORDER)
def test_every_option_is_a_flag_of_its_command_with_the_same_default(stage):
    command = main.commands[COMMANDS[stage]]
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    arguments = {p.name for p in command.params if isinstance(p, click.Argument)}
    for f, opt in options_of(STAGES[stage][0]):
        if f.name in ARGUMENTS.get(stage, ()):
            assert f.name in arguments
            continue
        p = params.pop(f.name)
        assert flag_name(f.name) in p.opts
        if f.default is not dataclasses.MISSING:
            assert p.default == (f.default or None if opt.many else f.default), f.name
    assert set(params) <= {"out", "as_json", "version"}  # the run directory / bundle and --json only


def test_docs_config_md_lists_every_option_as_declared():
    page = (REPO / "docs/config.md").read_text()
    assert page.endswith(markdown()), "docs/config.md is stale: python -m pipeline.stages.run --markdown"


@pytest.mark.parametrize("table,needle", [
    ("[quantize]\nrecipe = 'w9'", "[quantize] recipe is 'w9': give one of static, w8a8, w8, w4"),
    ("[bench]\nthreads = 'two'", "[bench] threads is 'two': give a whole number from 1 to 1024"),
    ("[check]\nwindows = 0", "[check] windows is 0"),
    ("[quantize]\ncalibrate_method = 'minmax'", "[quantize] has unknown key(s) ['calibrate_method']"),
    ("[quantize]\nblock_size = 24", "block_size must be a power of 2"),
    ("[bench]\ncompare = 3", "[bench] compare is 3: give a list of strings"),
    ("[bench]\nformat = 'xml'", "[bench] format is 'xml': give one of table, md, csv, json"),
    ("[bench]\nplot = 'bench.svg'", "[bench] plot is 'bench.svg': give a .png file name"),
    ("[check]\nthresholds = {}", "unknown key(s) ['thresholds']"),
    ("[export.bench]", "[export] has unknown key(s) ['bench']"),
])
def test_a_bad_config_stops_before_any_stage(tmp_path, llama_dir, table, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'out = "{tmp_path / "run"}"\n[export]\nmodel = "{llama_dir}"\n{table}\n')
    result = CliRunner().invoke(main, ["run", str(cfg)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "run").exists()  # export, the first stage, never ran


def test_a_stage_given_as_a_value_not_a_table_is_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'out = "{tmp_path / "run"}"\nbench = 3\n')
    result = CliRunner().invoke(main, ["run", str(cfg)])
    assert result.exit_code == 2 and "bench is 3: give a [bench] table" in result.output


def test_toml_keys_are_the_cli_names_and_lists_or_commas_both_work():
    from pipeline.stages.bench import BenchConfig

    assert BenchConfig(variant=["fused", "w8"], compare="pytorch,llamacpp").compare == ("pytorch", "llamacpp")
    assert BenchConfig(variant="fused,w8").variant == ("fused", "w8")
    assert BenchConfig(compare=("none",)).compare == ()
    with pytest.raises(UserError, match="repeats is 0"):
        BenchConfig(repeats=0)


def test_results_go_to_stdout_and_progress_to_stderr_unless_quiet(tmp_path, llama_dir, text_file, monkeypatch):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'out = "{tmp_path / "r"}"\n[export]\nmodel = "{llama_dir}"\n[optimize]\n'
                   f'[check]\ntext = "{text_file}"\nwindow = 32\nwindows = 2\nsteps = 2\n'
                   f'[bench]\ncompare = "none"\nnew_tokens = 2\nrepeats = 1\nwarmup = 0\n')
    monkeypatch.setenv("PIPELINE_PROGRESS", "1")  # as if stderr were a terminal
    result = CliRunner().invoke(main, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "max|dlogit|" in result.stdout and "decode p50" in result.stdout  # the check and bench tables
    assert "check: passed" in result.stdout and "bench: passed" in result.stdout
    assert "== export" in result.stderr and "validate against PyTorch" in result.stderr  # the export's phases
    assert "check fused" in result.stderr and "window" in result.stderr and "max|dlogit|" not in result.stderr
    quiet = CliRunner().invoke(main, ["--quiet", "run", str(cfg), "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0 and "validate against PyTorch" not in quiet.stderr and "window" not in quiet.stderr
