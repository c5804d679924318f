"""`pipeline`: checkpoint -> ONNX with KV cache -> fused -> int8 -> checked -> benchmarked -> bundle.

Each command is thin: it parses options and calls one stage function from pipeline/stages/. Results go to
stdout (`--json` for machines), progress and logs to stderr. A user mistake is one line on stderr and exit 2;
set PIPELINE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings

import click
from click.core import ParameterSource

from pipeline.manifest import PUBLISHED, RunDir
from pipeline.options import click_options
from pipeline.stages.bench import BenchConfig
from pipeline.stages.check import CheckConfig
from pipeline.stages.distill import DistillStageConfig
from pipeline.stages.export import ExportConfig
from pipeline.stages.generate import GenerateConfig
from pipeline.stages.optimize import OptimizeStageConfig
from pipeline.stages.package import PackageConfig
from pipeline.stages.prune import PruneStageConfig
from pipeline.stages.quantize import QuantizeStageConfig
from pipeline.stages.train import TrainStageConfig

EXAMPLES = """
\b
Examples:
  pipeline run                                  # the built-in demo: train -> ... -> bench, into runs/demo
  pipeline export --model ./SmolLM2 --out runs/smol
  pipeline optimize runs/smol && pipeline quantize runs/smol --recipe w8a8
  pipeline check runs/smol && pipeline bench runs/smol --json
  pipeline generate runs/smol --prompt "def fib(n):" --max-new-tokens 40
  pipeline package runs/smol --out bundle --archive tar.gz
  pipeline prune ./SmolLM2 --out pruned --mlp 0.35
  pipeline distill --teacher ./SmolLM2 --student pruned --out student --max-seconds 1800
"""


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def os_error_line(e: OSError) -> str:
    """A failed read or write (disk full, read-only, no permission) as one line that names the file."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where} ({_left_behind('the run is as it was before this command')})"


def _left_behind(nothing_published: str) -> str:
    """What a failed or interrupted command leaves: nothing, or the stages it finished before (`pipeline run`)."""
    if not PUBLISHED:
        return nothing_published
    return f"nothing half-written was left behind; {', '.join(PUBLISHED)} had finished and published its outputs"


def user_errors(fn):
    """Turn the project's user-error types, the system's refusals to write (disk full, read-only, permission)
    and Ctrl-C into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from models.errors import UserError
        from runtimes.errors import RuntimeUserError

        PUBLISHED.clear()
        try:
            return fn(*args, **kwargs)
        except (UserError, RuntimeUserError, OSError) as e:
            if os.environ.get("PIPELINE_DEBUG"):
                raise
            line = os_error_line(e) if isinstance(e, OSError) else str(e)
            click.echo(f"error: {line.splitlines()[0] if line else type(e).__name__}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {_left_behind('nothing half-written was left behind')}", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class OneLineGroup(click.Group):
    """click's usage errors (an unknown option, `--threads two`) as one `error:` line too, not a usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(EXIT_ERROR)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)


def emit(data: dict, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


run_dir_arg = click.argument("run_dir", type=click.Path(file_okay=False))
json_opt = click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")


@click.group(cls=OneLineGroup, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-pipeline")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars on stderr (they are off anyway when stderr is "
                                                   "not a terminal).")
def main(quiet):
    """Export, fuse, quantize, check and benchmark decoder LMs on ONNX Runtime."""
    from pipeline import progress

    warnings.filterwarnings("ignore")
    progress.QUIET["on"] = quiet


@main.command(epilog="\b\nExamples:\n  pipeline train --out runs/demo --max-seconds 120\n"
                     "  torchrun --nproc-per-node 2 -m pipeline train --out runs/demo")
@click.option("--out", "out", default="runs/demo", show_default=True, help="Run directory to write into.")
@click_options(TrainStageConfig)
@json_opt
@user_errors
def train(out, as_json, **options):
    """Train the built-in decoder and tokenizer on a local corpus (HF-format checkpoint); runs unchanged under
    torchrun (DDP, or FSDP2 with --fsdp), where the first process writes and prints."""
    from models.distributed import environment
    from pipeline.stages.train import render, train as train_stage

    results = train_stage(RunDir.open(out, create=True), TrainStageConfig(**options))
    if environment()[0] == 0:
        emit(results, as_json, lambda r: click.echo(render(r)))


@main.command(epilog="\b\nExamples:\n  pipeline prune ./SmolLM2-135M --out pruned --mlp 0.35\n"
                     "  pipeline prune model.gguf --out pruned --heads 0.34 --layers 4 --json")
@click.argument("source")
@click_options(PruneStageConfig, skip=("source",))
@click.option("--out", required=True, help="Checkpoint directory to write (Hugging Face format; replaced whole).")
@json_opt
@user_errors
def prune(source, out, as_json, **options):
    """Structured pruning: drop the least important MLP channels, key/value groups, embedding channels or layers
    (scored on calibration text); report parameters, bytes per token and held-out perplexity before and after."""
    from pipeline.stages.prune import prune_checkpoint, render

    options["source"] = source
    results = prune_checkpoint(PruneStageConfig(**options), out)
    emit(results, as_json, lambda r: click.echo(render(r)))


@main.command(epilog="\b\nExamples:\n  pipeline distill --teacher ./SmolLM2-135M --student pruned --out student\n"
                     "  pipeline distill --teacher T --student pruned --out student --resume\n"
                     "  torchrun --nproc-per-node 2 -m pipeline distill --teacher T --student S --out student")
@click_options(DistillStageConfig)
@click.option("--out", required=True, help="Checkpoint directory to write (Hugging Face format); its work "
                                           "state lives in OUT.distill/ until it is done.")
@json_opt
@user_errors
def distill(out, as_json, **options):
    """Knowledge distillation: the student learns the teacher's next-token distributions on a local corpus,
    with held-out perplexity along the way; runs unchanged under torchrun (DDP, or FSDP2 with --fsdp)."""
    from models.distributed import environment
    from pipeline import progress
    from pipeline.stages.distill import distill_checkpoint, render

    main_process = environment()[0] == 0
    results = distill_checkpoint(DistillStageConfig(**options), out, progress.enabled() and main_process)
    if main_process:
        emit(results, as_json, lambda r: click.echo(render(r)))


@main.command(epilog="\b\nExample:\n  pipeline export --model ./Qwen2.5-0.5B --out runs/qwen")
@click_options(ExportConfig)
@click.option("--out", required=True, help="Run directory to write into (new, empty, or an earlier run).")
@json_opt
@user_errors
def export(out, as_json, **options):
    """Export a checkpoint to one ONNX graph serving prefill and decode, validated against PyTorch."""
    from pipeline.stages.export import export as export_stage

    results = export_stage(RunDir.open(out, create=True), ExportConfig(**options))
    emit(results, as_json, lambda r: click.echo(
        f"exported {r['parameters']:,} parameters ({r['graph']}) -> {out}/variants/{r['variant']}/model.onnx "
        f"({r['size_bytes'] / 1e6:.1f} MB); parity vs PyTorch"
        + (f" ({r['parity_checked']})" if "parity_checked" in r else "") + ": "
        + ", ".join(f"{k} {v:.2g}" for k, v in r["parity_max_abs_diff"].items())))


@main.command(epilog="\b\nExamples:\n  pipeline optimize runs/demo --fp16\n"
                     "  pipeline optimize runs/demo --native-int8      # w8a8 -> w8a8-native\n"
                     "  pipeline optimize runs/demo --native-int8 --source w4   # w4's shared head -> w4-native\n"
                     "  pipeline optimize runs/demo --kv-fp16 --source w4   # w4 -> w4-kv16")
@run_dir_arg
@click_options(OptimizeStageConfig)
@json_opt
@user_errors
def optimize(run_dir, as_json, **options):
    """Fuse attention (GroupQueryAttention), rotary and residual+RMSNorm; fail if a layer is not fused. With
    --native-int8: move a static int8 variant (or a w4/w8/gguf variant's shared 8-bit head) onto pipeline's own
    int8 kernels, checked for equal logits. With --kv-fp16: store a fused variant's KV cache in float16."""
    from pipeline.stages.optimize import optimize as optimize_stage

    cfg = OptimizeStageConfig(**options)
    run = RunDir.open(run_dir)
    results = optimize_stage(run, cfg)
    if "nothing_to_do" in results:
        return emit(results, as_json, lambda r: click.echo(r["nothing_to_do"]))
    parity = ", ".join(f"{k} {v:.2g}" for k, v in (results["parity_max_abs_logit_diff"] or {}).items())
    if cfg.native_int8:
        emit(results, as_json, lambda r: click.echo(
            f"{cfg.target}: {r['matmuls']} MatMuls on {r['kernel']}, {r['nodes_before']} -> {r['nodes_after']} "
            f"nodes; max |logit diff| vs {cfg.source_in(run)}: {parity}"))
    elif cfg.kv_fp16:
        emit(results, as_json, lambda r: click.echo(
            f"{cfg.target}: KV cache in float16 at {r['attention_ops']} attention ops; max |logit diff| vs "
            f"{cfg.source_in(run)}: {parity}"))
    else:
        emit(results, as_json, lambda r: click.echo(
            f"{cfg.target}: {r['nodes_before']} -> {r['nodes_after']} nodes; fused ops: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["fused_ops"].items()))
            + f"; max |logit diff| vs {cfg.source_in(run)}: {parity}"))


@main.command(epilog="\b\nExample:\n  pipeline quantize runs/demo --recipe w8a8 --method percentile")
@run_dir_arg
@click_options(QuantizeStageConfig)
@json_opt
@user_errors
def quantize(run_dir, as_json, **options):
    """Quantize a variant to int8 (QDQ) or int4/int8 weight-only, calibrated on prefill and decode steps."""
    from pipeline.stages.quantize import quantize as quantize_stage, render

    cfg = QuantizeStageConfig(**options)
    results = quantize_stage(RunDir.open(run_dir), cfg)
    emit(results, as_json, lambda r: click.echo(render(r)))


@main.command(epilog="\b\nExample:\n  pipeline check runs/demo --variant w8a8 --steps 32")
@run_dir_arg
@click_options(CheckConfig)
@json_opt
@user_errors
def check(run_dir, as_json, **options):
    """Accuracy of each ONNX variant against PyTorch; exit 1 when a variant misses its thresholds."""
    from pipeline.stages.check import check as check_stage, render_table

    results = check_stage(RunDir.open(run_dir), CheckConfig(**options))
    emit(results, as_json, lambda r: click.echo(render_table(r)))
    if not results["passed"]:
        sys.exit(1)


@main.command(epilog="\b\nExamples:\n  pipeline bench runs/demo --threads 2 --new-tokens 64 --json\n"
                     "  pipeline bench runs/demo --format md --plot bench.png")
@run_dir_arg
@click_options(BenchConfig)
@json_opt
@user_errors
def bench(run_dir, as_json, **options):
    """Prefill latency, decode ms/token p50/p90 with their min-max over the repeats, tokens/s, peak memory and
    size, with peers as baselines; rows whose repeats disagree by over 10% are marked noisy."""
    from models.errors import UserError
    from pipeline.stages.bench import bench as bench_stage, render

    if as_json:  # --json is --format json; scripts use it
        if click.get_current_context().get_parameter_source("format") is ParameterSource.COMMANDLINE \
                and options["format"] != "json":
            raise UserError(f"--json and --format {options['format']} disagree: give one of them")
        options["format"] = "json"
    cfg = BenchConfig(**options)
    results = bench_stage(RunDir.open(run_dir), cfg)
    click.echo(render(results, cfg.format))
    if results["failed"]:
        first = results["rows"][results["failed"][0]]["error"]
        click.echo(f"error: {len(results['failed'])} runner(s) failed ({', '.join(results['failed'])}); "
                   f"{results['failed'][0]}: {first}", err=True)
        sys.exit(1)


@main.command(epilog="\b\nExample:\n  pipeline generate runs/demo --prompt 'import os' --temperature 0.8 --top-p 0.9 --seed 1")
@run_dir_arg
@click_options(GenerateConfig)
@user_errors
def generate(run_dir, **options):
    """Generate text from an ONNX variant through its KV cache, streaming tokens as they come."""
    from pipeline.stages.generate import generate as generate_stage

    cfg = GenerateConfig(**options)
    generate_stage(RunDir.open(run_dir), cfg, on_text=lambda s: click.echo(s, nl=False))
    click.echo()


@main.command(epilog="\b\nExample:\n  pipeline package runs/demo --out bundle --variant w8a8 --archive tar.gz")
@run_dir_arg
@click_options(PackageConfig)
@json_opt
@user_errors
def package(run_dir, as_json, **options):
    """Write the edge bundle: model, tokenizer, genai_config.json and a hashed manifest."""
    from pipeline.stages.package import package as package_stage

    results = package_stage(RunDir.open(run_dir), PackageConfig(**options))
    emit(results, as_json, lambda r: click.echo(
        f"bundle {r['bundle']} ({r['variant']}, {r['size_bytes'] / 1e6:.1f} MB)"
        + (f"; archive {r['archive']}" if r.get("archive") else "")))


@main.command(epilog="\b\nExamples:\n  pipeline run                      # the demo\n  pipeline run my-model.toml")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Run directory (default: the config's, or runs/demo).")
@json_opt
@user_errors
def run(config, out, as_json):
    """Every stage in order from one TOML config; with no config, the built-in demo."""
    from pipeline.stages.run import run as run_stages

    results = run_stages(config, out, log=lambda s: click.echo(s, err=True),
                         show=(lambda s: None) if as_json else click.echo)
    emit(results, as_json, lambda r: click.echo(r["summary"]))
    if not results.get("passed", True):
        sys.exit(1)
