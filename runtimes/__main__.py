"""`python -m runtimes bench|generate|verify`: the device-side entry point (argparse only; no click on the device).

`generate` and `verify` take a bundle directory or archive from `pipeline package` and check every file against
its manifest before anything is loaded. Installed alone (`pip install ./runtimes`), the same commands are the
`edge-runtime` console script, and `edge-generate` is `generate`.

Errors print one line on stderr and exit 2 (RUNTIME_DEBUG=1 re-raises for the traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from runtimes.errors import RuntimeUserError
from runtimes.providers import FACTORIES, ProviderSpec, resolve

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def provider_spec(args: argparse.Namespace) -> ProviderSpec:
    """The spec for --provider, with only the provider options actually given (a wrong one is an error)."""
    given = {"device_id": args.device_id, "cache_dir": args.trt_cache_dir,
             "fp16": args.trt_fp16 or None, "int8": args.trt_int8 or None, "graph": args.cuda_graph or None}
    return resolve(args.provider, **{k: v for k, v in given.items() if v is not None})


def add_provider_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="cpu", help=f"one of {', '.join(FACTORIES)} (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--device-id", type=int, default=None, help="GPU index for cuda/tensorrt")
    parser.add_argument("--trt-cache-dir", default=None, help="TensorRT engine and timing cache directory")
    parser.add_argument("--trt-fp16", action="store_true", help="let TensorRT use fp16 kernels")
    parser.add_argument("--trt-int8", action="store_true", help="let TensorRT use int8 kernels (QDQ models)")
    parser.add_argument("--cuda-graph", action="store_true", help="cuda: replay each decode step as one captured "
                        "CUDA graph, on a fixed-capacity cache (fused graphs)")


def cmd_bench(args: argparse.Namespace) -> None:
    from runtimes.bench import bench_model

    result = bench_model(args.model, provider_spec(args), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         warmup=args.warmup, repeats=args.repeats, threads=args.threads, batch=args.batch)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


def cmd_generate(args: argparse.Namespace) -> None:
    from runtimes.bundle import opened_bundle
    from runtimes.generate import text_generate

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with opened_bundle(args.model) as (model, _):
        text_generate(model, args.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      spec=provider_spec(args), threads=args.threads, eos_token_id=args.eos_token_id, on_text=show)
    sys.stdout.write("\n")


def cmd_verify(args: argparse.Namespace) -> None:
    from runtimes.bundle import opened_bundle

    with opened_bundle(args.bundle, require_manifest=True) as (_, manifest):
        files = manifest["files"]
        summary = {"bundle": args.bundle, "ok": True, "variant": manifest.get("variant"), "files": len(files),
                   "size_bytes": sum(f["size"] for f in files.values())}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"ok: {summary['bundle']} ({summary['variant']}): {summary['files']} files, "
              f"{summary['size_bytes'] / 1e6:.1f} MB, every sha256 matches manifest.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtimes", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time one model variant; --json prints one JSON object")
    bench.add_argument("model", help="exported .onnx file or bundle directory")
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of key: value lines")
    add_provider_args(bench)
    bench.set_defaults(func=cmd_bench, threads=2)

    gen = commands.add_parser("generate", help="stream generated text to stdout")
    gen.add_argument("model", help="bundle directory or archive (.tar.gz, .zip; verified first), or an exported "
                                   ".onnx file (tokenizer.json beside the model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--tokenizer", default=None, help="tokenizer.json (default: next to the model)")
    gen.add_argument("--eos-token-id", type=int, default=None,
                     help="stop token (default: generation_config.json next to the model, if any)")
    add_provider_args(gen)
    gen.set_defaults(func=cmd_generate)

    verify = commands.add_parser("verify", help="check a bundle's files against its manifest.json")
    verify.add_argument("bundle", help="bundle directory or archive (.tar.gz, .zip)")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("RUNTIME_DEBUG") == "1":
            raise
        lines = str(e).strip().splitlines() or [""]
        hint = "" if isinstance(e, RuntimeUserError) else f" ({type(e).__name__}; RUNTIME_DEBUG=1 shows the traceback)"
        print(f"error: {lines[0]}{hint}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def generate_main() -> int:
    """The `edge-generate` console script: `generate` without the subcommand word."""
    return main(["generate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
