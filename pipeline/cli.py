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

from pipeline.manifest import RunDir

EXAMPLES = """
\b
Examples:
  pipeline run                                  # the built-in demo: train -> ... -> bench, into runs/demo
  pipeline export --model ./SmolLM2 --out runs/smol
  pipeline optimize runs/smol && pipeline quantize runs/smol --recipe w8a8
  pipeline check runs/smol && pipeline bench runs/smol --json
  pipeline generate runs/smol --prompt "def fib(n):" --max-new-tokens 40
  pipeline package runs/smol --out bundle --archive tar.gz
"""


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def os_error_line(e: OSError) -> str:
    """A failed read or write (disk full, read-only, no permission) as one line that names the file."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where} (the run is as it was before this command)"


def user_errors(fn):
    """Turn the project's user-error types, the system's refusals to write (disk full, read-only, permission)
    and Ctrl-C into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from models.errors import UserError
        from runtimes.errors import RuntimeUserError

        try:
            return fn(*args, **kwargs)
        except (UserError, RuntimeUserError, OSError) as e:
            if os.environ.get("PIPELINE_DEBUG"):
                raise
            line = os_error_line(e) if isinstance(e, OSError) else str(e)
            click.echo(f"error: {line.splitlines()[0] if line else type(e).__name__}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was left behind", err=True)
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
provider_opt = click.option("--provider", default="cpu", show_default=True,
                            help="Execution provider: cpu, cuda or tensorrt.")
threads_opt = click.option("--threads", type=int, default=2, show_default=True, help="Intra-op threads.")
variants_opt = click.option("--variant", "variants", multiple=True,
                            help="Variant(s) to use (fp32, fused, fused-fp16, w8a8, static, w8, w4); default: all.")


@click.group(cls=OneLineGroup, epilog=EXAMPLES)
@click.version_option(package_name="edge-pipeline")
def main():
    """Export, fuse, quantize, check and benchmark decoder LMs on ONNX Runtime."""
    warnings.filterwarnings("ignore")


@main.command(epilog="\b\nExample:\n  pipeline train --out runs/demo --max-seconds 120")
@click.option("--out", "out", default="runs/demo", show_default=True, help="Run directory to write into.")
@click.option("--corpus", default=None, help="Text file or directory (default: this Python's stdlib sources).")
@click.option("--max-seconds", type=float, default=None, help="Training time budget (default: the config's).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@json_opt
@user_errors
def train(out, corpus, max_seconds, max_steps, as_json):
    """Train the built-in decoder and tokenizer on a local corpus (HF-format checkpoint)."""
    from pipeline.stages.train import TrainStageConfig, render, train as train_stage

    results = train_stage(RunDir.open(out, create=True),
                          TrainStageConfig(corpus=corpus, max_seconds=max_seconds, max_steps=max_steps))
    emit(results, as_json, lambda r: click.echo(render(r)))


@main.command(epilog="\b\nExample:\n  pipeline export --model ./Qwen2.5-0.5B --out runs/qwen")
@click.option("--model", required=True, help="Checkpoint directory (HF or ours) or .gguf file; nothing is downloaded.")
@click.option("--out", required=True, help="Run directory to write into.")
@json_opt
@user_errors
def export(model, out, as_json):
    """Export a checkpoint to one ONNX graph serving prefill and decode, validated against PyTorch."""
    from pipeline.stages.export import ExportConfig, export as export_stage

    results = export_stage(RunDir.open(out, create=True), ExportConfig(model=model))
    emit(results, as_json, lambda r: click.echo(
        f"exported {r['parameters']:,} parameters -> {out}/variants/fp32/model.onnx "
        f"({r['size_bytes'] / 1e6:.1f} MB); parity vs PyTorch: "
        + ", ".join(f"{k} {v:.2g}" for k, v in r["parity_max_abs_diff"].items())))


@main.command(epilog="\b\nExamples:\n  pipeline optimize runs/demo --fp16\n"
                     "  pipeline optimize runs/demo --native-int8      # w8a8 -> w8a8-native")
@run_dir_arg
@click.option("--fp16", is_flag=True, help="Also convert to float16 (for the CUDA / TensorRT providers).")
@click.option("--native-int8", is_flag=True,
              help="Instead of fusing: put a static int8 variant's MatMuls on pipeline's native CPU kernel "
                   "(x86-64 with AVX512-VNNI; build it with `python -m runtimes.kernels build`). Same logits, "
                   "faster decode; writes <source>-native.")
@click.option("--source", default="", help="Variant to rewrite (default: fp32, or w8a8 with --native-int8).")
@json_opt
@user_errors
def optimize(run_dir, fp16, native_int8, source, as_json):
    """Fuse attention (GroupQueryAttention), rotary and residual+RMSNorm; fail if a layer is not fused. With
    --native-int8: move a static int8 variant onto pipeline's own int8 kernel, checked for equal logits."""
    from pipeline.stages.optimize import OptimizeStageConfig, optimize as optimize_stage

    cfg = OptimizeStageConfig(source=source, fp16=fp16, native_int8=native_int8)
    results = optimize_stage(RunDir.open(run_dir), cfg)
    parity = ", ".join(f"{k} {v:.2g}" for k, v in (results["parity_max_abs_logit_diff"] or {}).items())
    if native_int8:
        emit(results, as_json, lambda r: click.echo(
            f"{cfg.target}: {r['matmuls']} MatMuls on {r['kernel']}, {r['nodes_before']} -> {r['nodes_after']} "
            f"nodes; max |logit diff| vs {cfg.source_variant}: {parity}"))
    else:
        emit(results, as_json, lambda r: click.echo(
            f"{cfg.target}: {r['nodes_before']} -> {r['nodes_after']} nodes; fused ops: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["fused_ops"].items()))
            + f"; max |logit diff| vs unfused: {parity}"))


@main.command(epilog="\b\nExample:\n  pipeline quantize runs/demo --recipe w8a8 --method percentile")
@run_dir_arg
@click.option("--recipe", type=click.Choice(["w8a8", "static", "w8", "w4"]), default="w8a8", show_default=True,
              help="w8a8: static int8 with smoothing and sensitivity-chosen mixed precision; static: plain QDQ "
                   "int8; w8/w4: weight-only MatMulNBits.")
@click.option("--source", default="", help="Variant to quantize (default: fused if present, else fp32).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
              help="Activation calibration method. Default: percentile (99.999% of |x|) for w8a8, minmax for "
                   "static.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scale granularity.")
@click.option("--calib-windows", type=int, default=16, show_default=True,
              help="Calibration windows of text (w8a8's GPTQ rounds a MatMul only with more tokens than inputs).")
@click.option("--window", type=int, default=128, show_default=True, help="Tokens per calibration window.")
@click.option("--max-ppl-increase", type=float, default=0.02, show_default=True,
              help="w8a8: largest relative perplexity increase before MatMuls leave static int8.")
@click.option("--fallback", type=click.Choice(["w8", "float"]), default="w8", show_default=True,
              help="w8a8: what the MatMuls the budget takes out of static int8 become: int8 weight-only "
                   "(MatMulNBits) or float (a pure QDQ graph, for NPU execution providers).")
@click.option("--w4-max-ppl-increase", type=float, default=0.08, show_default=True,
              help="w4: MatMuls move to 8 bits, largest 4-bit output error first, until perplexity is within this.")
@click.option("--block-size", type=int, default=32, show_default=True, help="w8/w4 block size.")
@click.option("--accuracy-level", type=int, default=4, show_default=True, help="w8/w4 MatMulNBits accuracy level.")
@click.option("--calib-text", default=None, help="Text file to calibrate on (default: the corpus's calib split).")
@click.option("--weight-rounding", type=click.Choice(["gptq", "nearest"]), default="gptq", show_default=True,
              help="w8a8/w8/w4: weights rounded by GPTQ (least output error on the calibration text) or to "
                   "nearest.")
@click.option("--rotate/--no-rotate", default=True, show_default=True,
              help="w8a8: fold randomized Hadamard rotations into the weights (residual stream and attention "
                   "values) before smoothing, exact in float and adding no ops; and the online one of "
                   "--online-hadamard.")
@click.option("--online-hadamard", type=click.IntRange(min=0), default=128, show_default=True,
              help="w8a8 with --rotate: block size of an online Hadamard rotation before each down_proj (three float "
                   "ops per layer that make its input fit static int8); 0: none.")
@click.option("--outlier-channels", type=click.IntRange(min=0), default=16, show_default=True,
              help="w8a8: at most this many channels of each smoothed activation, those over 4x its 99th-percentile "
                   "channel peak, leave the int8 MatMul for a small float one (0: none).")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="w8a8/static: 7-bit weights, for x86 CPUs without VNNI, whose int8 kernels overflow with 8-bit "
                   "ones (the runtime refuses such a model there). Default: on exactly when this machine is one.")
@json_opt
@user_errors
def quantize(run_dir, recipe, source, method, per_channel, calib_windows, window, max_ppl_increase, fallback,
             w4_max_ppl_increase, block_size, accuracy_level, calib_text, weight_rounding, rotate, online_hadamard,
             outlier_channels, reduce_range, as_json):
    """Quantize a variant to int8 (QDQ) or int4/int8 weight-only, calibrated on prefill and decode steps."""
    from pipeline.stages.quantize import QuantizeStageConfig, quantize as quantize_stage

    cfg = QuantizeStageConfig(recipe=recipe, source=source, calibrate_method=method, per_channel=per_channel,
                              calib_windows=calib_windows, window=window, max_ppl_increase=max_ppl_increase,
                              block_size=block_size, accuracy_level=accuracy_level, calib_text=calib_text,
                              fallback=fallback, w4_max_ppl_increase=w4_max_ppl_increase,
                              weight_rounding=weight_rounding, rotate=rotate, online_hadamard=online_hadamard,
                              outlier_channels=outlier_channels, reduce_range=reduce_range)
    results = quantize_stage(RunDir.open(run_dir), cfg)

    def render(r):
        click.echo(f"{recipe}: {r['size_before'] / 1e6:.2f} MB -> {r['size_after'] / 1e6:.2f} MB "
                   f"({r['size_after'] / r['size_before']:.2f}x); {len(r['quantized_matmuls'])} MatMuls quantized, "
                   f"{100 * r['quantized_flop_share']:.0f}% of weight-MatMul FLOPs")
        if r.get("fallback_matmuls"):
            click.echo(f"  8-bit weight-only instead: {len(r['fallback_matmuls'])} MatMuls, "
                       f"{100 * r['fallback_flop_share']:.0f}% of FLOPs: " + ", ".join(r["fallback_matmuls"]))
        if "reduce_range" in r:
            click.echo(f"  static int8 weights: " + ("7-bit (reduce range: for x86 CPUs without VNNI)"
                                                       if r["reduce_range"] else "8-bit"))
        if r.get("ppl"):
            click.echo(f"  calibration-side perplexity: fp32 {r['ppl']['fp32']:.3f} -> {r['ppl']['quantized']:.3f} "
                       f"({100 * r['ppl']['increase']:+.2f}%)")
        split = {n: why for n, why in r["float_matmuls"].items() if why.startswith("outlier channels")}
        if split:
            channels = sum(len(c) for c in r["smoothing"]["outlier_channels"].values())
            click.echo(f"  outlier channels split off into float: {channels} channels of "
                       f"{len(r['smoothing']['outlier_channels'])} activations ({len(split)} small MatMuls)")
        online = {n for n, why in r["float_matmuls"].items() if why.startswith("online Hadamard")}
        if online:
            click.echo(f"  online Hadamard ({r['online_hadamard']['block']}-wide blocks, float) before "
                       f"{len(online)} MatMuls")
        kept = {n: why for n, why in r["float_matmuls"].items()
                if "attention" not in why and n not in split and n not in online}
        if kept:
            click.echo(f"  left in float: " + ", ".join(f"{n} ({why})" for n, why in kept.items()))

    emit(results, as_json, render)


@main.command(epilog="\b\nExample:\n  pipeline check runs/demo --variant w8a8 --steps 32")
@run_dir_arg
@variants_opt
@click.option("--model", default=None, help="PyTorch reference checkpoint (default: the one the run exported).")
@click.option("--text", default=None, help="Text file to evaluate on (default: the corpus's valid split).")
@click.option("--windows", type=int, default=16, show_default=True, help="Evaluation windows, spread over the text.")
@click.option("--window", type=int, default=128, show_default=True, help="Tokens per window.")
@click.option("--steps", type=int, default=16, show_default=True, help="Greedy decode steps through the KV cache.")
@provider_opt
@json_opt
@user_errors
def check(run_dir, variants, model, text, windows, window, steps, provider, as_json):
    """Accuracy of each ONNX variant against PyTorch; exit 1 when a variant misses its thresholds."""
    from pipeline.stages.check import CheckConfig, check as check_stage, render_table

    cfg = CheckConfig(variants=tuple(variants), model=model, text=text, windows=windows, window=window,
                      decode_steps=steps, provider=provider)
    results = check_stage(RunDir.open(run_dir), cfg)
    emit(results, as_json, lambda r: click.echo(render_table(r)))
    if not results["passed"]:
        sys.exit(1)


@main.command(epilog="\b\nExample:\n  pipeline bench runs/demo --threads 2 --new-tokens 64 --json")
@run_dir_arg
@variants_opt
@provider_opt
@threads_opt
@click.option("--prompt-len", type=int, default=32, show_default=True, help="Prompt tokens (prefill).")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Decode steps timed.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed repetitions (median reported).")
@click.option("--compare", default="pytorch", show_default=True,
              help="Peers measured in the same run, comma-separated: pytorch, optimum, llamacpp (or 'none').")
@json_opt
@user_errors
def bench(run_dir, variants, provider, threads, prompt_len, new_tokens, repeats, compare, as_json):
    """Prefill latency, decode ms/token p50/p90, tokens/s, peak memory and size, with peers as baselines."""
    from pipeline.stages.bench import BenchConfig, bench as bench_stage, render_table

    cfg = BenchConfig(variants=tuple(variants), provider=provider, threads=threads, prompt_len=prompt_len,
                      new_tokens=new_tokens, repeats=repeats,
                      compare=tuple(c for c in compare.split(",") if c and c != "none"))
    results = bench_stage(RunDir.open(run_dir), cfg)
    emit(results, as_json, lambda r: click.echo(render_table(r)))
    if results["failed"]:
        first = results["rows"][results["failed"][0]]["error"]
        click.echo(f"error: {len(results['failed'])} runner(s) failed ({', '.join(results['failed'])}); "
                   f"{results['failed'][0]}: {first}", err=True)
        sys.exit(1)


@main.command(epilog="\b\nExample:\n  pipeline generate runs/demo --prompt 'import os' --temperature 0.8 --top-p 0.9 --seed 1")
@run_dir_arg
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--variant", default="", help="Variant to run (default: the best available).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 = off.")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@provider_opt
@threads_opt
@user_errors
def generate(run_dir, prompt, variant, max_new_tokens, temperature, top_k, top_p, seed, provider, threads):
    """Generate text from an ONNX variant through its KV cache, streaming tokens as they come."""
    from pipeline.stages.generate import GenerateConfig, generate as generate_stage

    cfg = GenerateConfig(prompt=prompt, variant=variant, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, provider=provider, threads=threads)
    generate_stage(RunDir.open(run_dir), cfg, on_text=lambda s: click.echo(s, nl=False))
    click.echo()


@main.command(epilog="\b\nExample:\n  pipeline package runs/demo --out bundle --variant w8a8 --archive tar.gz")
@run_dir_arg
@click.option("--out", required=True, help="Bundle directory to write.")
@click.option("--variant", default="", help="Variant to ship (default: the best that passed check).")
@click.option("--archive", type=click.Choice(["tar.gz", "zip"]), default=None, help="Also write one archive file.")
@json_opt
@user_errors
def package(run_dir, out, variant, archive, as_json):
    """Write the edge bundle: model, tokenizer, genai_config.json and a hashed manifest."""
    from pipeline.stages.package import PackageConfig, package as package_stage

    results = package_stage(RunDir.open(run_dir), PackageConfig(out=out, variant=variant, archive=archive))
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

    results = run_stages(config, out, log=lambda s: click.echo(s, err=True))
    emit(results, as_json, lambda r: click.echo(r["summary"]))
    if not results.get("passed", True):
        sys.exit(1)
