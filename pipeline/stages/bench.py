"""Stage `bench`: every ONNX variant and the peers (PyTorch eager, Optimum, llama.cpp) in the same run.

Each measurement runs in its own subprocess (`python -m runtimes bench`, `python -m pipeline.peers`) so peak
memory is that runner's alone and one runner's allocator cannot warm another's caches. Timings on a shared
machine are noisy: read them as ratios within one run (the table prints decode speed-up over PyTorch), each
beside its min-max over the timed repeats; a row whose repeats disagree by over 10% is marked noisy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from models.errors import UserError
from pipeline import options, progress
from pipeline.manifest import RunDir
from pipeline.options import check_options, fits_context, option
from runtimes.bench import model_bytes


MAX_REPEATS = 1000  # timed repetitions: a median of more says nothing new
FORMATS = ("table", "md", "csv", "json")
PLOT_INSTALL = "pip install 'edge-pipeline[plot]'"


@dataclass(frozen=True)
class BenchConfig:
    variant: tuple[str, ...] = options.variants("benchmark")
    provider: str = options.provider()
    cuda_graph: bool = option(bool, False, "cuda: replay each decode step as one captured CUDA graph, on a "
                              "fixed-capacity cache on the GPU (fused variants).")
    threads: int = options.threads()  # for every runner, ours and the peers
    prompt_len: int = option(int, 32, "Prompt tokens (prefill).", lo=1)
    new_tokens: int = option(int, 64, "Decode steps timed.", lo=1)
    warmup: int = option(int, 2, "Untimed runs after the first (cold) one, before the timed repeats.", lo=0,
                         hi=MAX_REPEATS)
    # 5: fewer say too little about the spread, and the row is marked noisy (runtimes.bench.MIN_REPEATS)
    repeats: int = option(int, 5, "Timed repetitions (medians and min-max spread reported).", lo=1, hi=MAX_REPEATS)
    compare: tuple[str, ...] = option(str, ("pytorch",), "Peers measured in the same run: pytorch, optimum, "
                                      "llamacpp (RUN/peers/model.gguf, else a .gguf source), llamacpp:NAME "
                                      "(RUN/peers/NAME.gguf), or none; repeat the flag or separate by commas.",
                                      many=True)
    full_context: bool = option(bool, False, "Size each variant's session for the model's whole context "
                                "instead of the request (prompt + new tokens, as the llama.cpp peer's n_ctx): "
                                "rotary tables of every position, 67 MB more for Gemma 3.")
    timeout_s: int = option(int, 1800, "Seconds each runner may take.", lo=1)
    format: str = option(str, "table", "How the results print on stdout: table, md (Markdown), csv or json "
                         "(--json is --format json).", choices=FORMATS)
    plot: str | None = option(str, None, "Also write a bar chart of decode ms/token (min-max error bars) and "
                              f"prefill ms per runner to this .png file (needs matplotlib: {PLOT_INSTALL}).",
                              optional=True)

    def __post_init__(self):
        check_options(self)
        object.__setattr__(self, "compare", tuple(c for c in self.compare if c != "none"))
        if self.cuda_graph and self.provider != "cuda":
            raise UserError(f"--cuda-graph is a CUDA option: give --provider cuda (not {self.provider})")
        if self.plot is not None:
            check_plot(Path(self.plot))


def check_plot(path: Path) -> None:
    """--plot's file can be written and matplotlib is there: checked before any runner starts."""
    if path.suffix.lower() != ".png":
        raise UserError(f"plot is {str(path)!r}: give a .png file name")
    if not path.parent.resolve().is_dir():
        raise UserError(f"plot is {str(path)!r}: folder {path.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"--plot needs matplotlib: {PLOT_INSTALL}") from None


def run_json(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> dict:
    """Run a measuring subprocess; its last stdout line is one JSON object."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return {"error": lines[-1].removeprefix("error: ") if lines else f"exit {p.returncode}"}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "runner printed no JSON"}


def bench_variant(path: Path, config: BenchConfig, cache_dir: Path) -> dict:
    """The variant's row, its session sized for the request unless --full-context: a graph sized by
    `exporters.optimize.write_with_context`, written beside the variant's (it reads the same weights file) for
    the runner's time and removed after."""
    if config.full_context:
        return bench_model(path, config, cache_dir)
    from exporters.optimize import write_with_context

    context = config.prompt_len + config.new_tokens
    sized = path.with_name(f".{path.stem}-context{context}-{os.getpid()}.onnx")
    try:
        write_with_context(path, sized, context)
        row = bench_model(sized, config, cache_dir)
        return row if row.get("error") else {**row, "file_bytes": model_bytes(path), "context": context}
    finally:
        sized.unlink(missing_ok=True)


def bench_model(path: Path, config: BenchConfig, cache_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "runtimes", "bench", str(path), "--provider", config.provider,
           "--threads", str(config.threads), "--prompt-len", str(config.prompt_len),
           "--new-tokens", str(config.new_tokens), "--warmup", str(config.warmup), "--repeats", str(config.repeats),
           "--json"]
    if config.provider == "tensorrt":  # engines and timing caches live in the run, reused by the next bench
        cmd += ["--trt-cache-dir", str(cache_dir)]
    if config.cuda_graph:
        cmd.append("--cuda-graph")
    return run_json(cmd, config.timeout_s)


def peer_model(run: RunDir, peer: str, which: str = "") -> str:
    """What a peer loads: the source checkpoint. llama.cpp runs RUN/peers/model.gguf when there is one (a
    re-quantization of the source at the bits being compared, as the benchmarks write), else a .gguf source as
    it is; Optimum exports from a Hugging Face directory, so a .gguf source is written out once as one
    (run/peers/hf, the dequantized float weights)."""
    source = run.artifact("source")["path"]
    if peer == "llamacpp" and which:  # llamacpp:NAME runs RUN/peers/NAME.gguf, llamacpp:FILE.gguf that file
        gguf = Path(which) if which.endswith(".gguf") else run.root / "peers" / f"{which}.gguf"
        if not gguf.is_file():
            raise UserError(f"llamacpp:{which}: {gguf} is not a file: write the GGUF there (llama.cpp's quantizer "
                            "makes one from the source), or name an existing .gguf file")
        return str(gguf)
    if peer == "llamacpp":
        gguf = run.root / "peers" / "model.gguf"
        if gguf.exists():
            return str(gguf)
        if not source.endswith(".gguf"):
            raise UserError("llama.cpp needs a .gguf model: export from a .gguf file, or put one at "
                            f"{gguf}")
    if peer == "optimum" and source.endswith(".gguf"):
        return str(hf_directory(source, run.root / "peers" / "hf"))
    return source


def checkpoint_tensors(model) -> dict:
    """The state dict as a checkpoint stores it: a tensor shared by several names (tied embeddings) once, under
    its first name, `model.embed_tokens.weight`, which is what transformers reads and ties `lm_head` to.
    (safetensors' save_model keeps `lm_head.weight` instead; transformers 4.57 then leaves the input embedding
    on the meta device, and Optimum's export fails on it.)"""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.contiguous()
    return tensors


def hf_directory(gguf: str, out: Path) -> Path:
    """The GGUF model as a Hugging Face checkpoint directory (weights, config, tokenizer), written atomically."""
    from safetensors.torch import save_file

    from models.files import publish, staging_dir
    from models.hf import export_tokenizer, load_hf_reference

    if (out / "config.json").is_file():
        return out
    with staging_dir(out) as staging:
        tmp = staging / out.name
        tmp.mkdir()
        model = load_hf_reference(gguf)
        # save_pretrained refuses a model that came from a GGUF ("not serializable"); its weights are plain
        # float tensors once loaded, so write them and the config directly
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(checkpoint_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        export_tokenizer(gguf, tmp)
        publish(tmp, out)
    return out


def bench_peer(run: RunDir, peer: str, config: BenchConfig) -> dict:
    from pipeline.peers import INSTALL, available, command

    kind, _, which = peer.partition(":")
    if kind not in INSTALL or (which and kind != "llamacpp"):
        raise UserError(f"unknown peer {peer!r}: choose from {', '.join(sorted(INSTALL))} (and llamacpp:NAME for "
                        "RUN/peers/NAME.gguf)")
    if not available(kind):
        return {"missing": True, "install": INSTALL[kind]}
    cmd, env = command(kind, peer_model(run, kind, which), "--threads", str(config.threads),
                       "--prompt-len", str(config.prompt_len), "--new-tokens", str(config.new_tokens),
                       "--warmup", str(config.warmup), "--repeats", str(config.repeats))
    return run_json(cmd, config.timeout_s, env)


def bench(run: RunDir, config: BenchConfig) -> dict:
    from runtimes.providers import resolve

    resolve(config.provider)  # an unknown or absent provider fails here, with its install line or why
    names = list(config.variant) or run.variants()
    if not names:
        raise UserError(f"run {run.root} has no ONNX variants to benchmark: run `pipeline export` first")
    paths = {n: run.verified(n) for n in names}
    for n, path in paths.items():
        fits_context("prompt_len + new_tokens", config.prompt_len + config.new_tokens, path, n)
    rows = {}
    runners = [*config.compare, *paths]
    for name in progress.each(runners, "bench", unit="runner"):
        rows[name] = (bench_variant(paths[name], config, run.root / "cache" / config.provider / name)
                      if name in paths else bench_peer(run, name, config))
    base = rows.get("pytorch", {}).get("decode_ms_p50")
    for r in rows.values():
        if base and r.get("decode_ms_p50"):
            r["decode_speedup_vs_pytorch"] = base / r["decode_ms_p50"]
    failed = [name for name, r in rows.items() if r.get("error")]
    results = {"provider": config.provider, "threads": config.threads, "prompt_len": config.prompt_len,
               "new_tokens": config.new_tokens, "rows": rows, "failed": failed, "passed": not failed,
               "context": "full" if config.full_context else config.prompt_len + config.new_tokens}
    run.record("bench", asdict(config), {n: str(p) for n, p in paths.items()}, results)
    if config.plot is not None:
        results["plot"] = str(write_plot(results, Path(config.plot)))
    return results


def measured(results: dict) -> dict[str, dict]:
    """The rows with figures (neither missing nor failed)."""
    return {n: r for n, r in results["rows"].items() if not r.get("missing") and not r.get("error")}


def heading(results: dict) -> str:
    sized = ("the model's whole context" if results.get("context") == "full" else
             f"{results['context']} positions" if results.get("context") else None)
    return (f"provider {results['provider']}, {results['threads']} threads, batch 1, {results['prompt_len']}-token "
            f"prompt, {results['new_tokens']} decode steps" + (f"; sessions sized for {sized}" if sized else ""))


def label(name: str, r: dict) -> str:
    """The runner as the tables and the chart name it: llama.cpp with the weight type of the file it ran."""
    return f"{name} {r['gguf_type']}" if r.get("gguf_type") else name


def note(r: dict) -> str:
    """What the last column says: why a row has no figures, or why its figures are not to be trusted."""
    if r.get("missing"):
        return f"not installed: {r['install']}"
    if r.get("error"):
        return f"error: {r['error']}"
    return f"noisy: {r['noisy_reason']}" if r.get("noisy") else ""


def span(r: dict, key: str) -> str:
    """`min-max` of a figure over the timed repeats ("-" for a row measured before they were reported)."""
    if r.get(f"{key}_min") is None:
        return "-"
    return f"{r[f'{key}_min']:.2f}-{r[f'{key}_max']:.2f}"


# (header, width, cell text of a measured row): the columns of the table and of its Markdown twin
COLUMNS = (
    ("prefill ms", 10, lambda r: f"{r['prefill_ms']:.2f}"),
    ("min-max", 13, lambda r: span(r, "prefill_ms")),
    ("decode p50", 10, lambda r: f"{r['decode_ms_p50']:.2f}"),
    ("min-max", 13, lambda r: span(r, "decode_ms")),
    ("p90", 7, lambda r: f"{r['decode_ms_p90']:.2f}"),
    ("tok/s", 7, lambda r: f"{r['tokens_per_s']:.1f}"),
    # absent when PyTorch was not compared
    ("x pytorch", 9, lambda r: f"{r['decode_speedup_vs_pytorch']:.2f}x" if r.get("decode_speedup_vs_pytorch")
     else "-"),
    ("peak MB", 8, lambda r: f"{r['peak_rss_mb']:.0f}"),
    ("file MB", 8, lambda r: f"{r['file_bytes'] / 1e6:.2f}" if r.get("file_bytes") else "-"),
)
# the CSV's columns: the JSON keys themselves, numbers unrounded
CSV_KEYS = ("prefill_ms", "prefill_ms_min", "prefill_ms_max", "decode_ms_p50", "decode_ms_min", "decode_ms_max",
            "decode_ms_p90", "tokens_per_s", "decode_speedup_vs_pytorch", "peak_rss_mb", "file_bytes", "noisy")


def render_table(results: dict) -> str:
    """Fixed-width text: each figure with its min-max over the repeats (decode: of each repeat's median step)."""
    head = f"{'runner':<14} " + " ".join(f"{h:>{w}}" for h, w, _ in COLUMNS) + "  note"
    lines = [heading(results), head, "-" * len(head)]
    for name, r in results["rows"].items():
        if r.get("missing") or r.get("error"):
            lines.append(f"{label(name, r):<14} {note(r)}")
        else:
            cells = " ".join(f"{cell(r):>{w}}" for _, w, cell in COLUMNS)
            lines.append(f"{label(name, r):<14} {cells}  {note(r)}".rstrip())
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """The table's columns as a Markdown table, under its heading line."""
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    blank = [""] * len(COLUMNS)
    lines = [heading(results), "", row(["runner", *(h for h, _, _ in COLUMNS), "note"]),
             "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for name, r in results["rows"].items():
        measured_row = not r.get("missing") and not r.get("error")
        lines.append(row([label(name, r), *([cell(r) for _, _, cell in COLUMNS] if measured_row else blank),
                          note(r)]))
    return "\n".join(lines)


def render_csv(results: dict) -> str:
    """One header row (the JSON keys) and one row per runner; a runner without figures has empty cells and says
    why in `note`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["runner", *CSV_KEYS, "note"])
    for name, r in results["rows"].items():
        writer.writerow([label(name, r), *("" if r.get(k) is None else r[k] for k in CSV_KEYS), note(r)])
    return out.getvalue().rstrip("\n")


def render(results: dict, fmt: str = "table") -> str:
    """The results as `fmt` (one of FORMATS) for stdout."""
    if fmt == "json":
        return json.dumps(results, indent=2, default=str)
    return {"table": render_table, "md": render_markdown, "csv": render_csv}[fmt](results)


def write_plot(results: dict, path: Path) -> Path:
    """A PNG of decode ms/token (p50, min-max error bars) and prefill ms (median, min-max) per measured runner,
    written to a temporary file beside `path` and renamed over it, so `path` is whole or absent."""
    from matplotlib.figure import Figure

    rows = measured(results)
    names = list(rows)
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) + 2), 3.6), layout="constrained")
    for ax, key, mid, title in zip(fig.subplots(1, 2), ("decode_ms", "prefill_ms"), ("decode_ms_p50", "prefill_ms"),
                                   ("decode ms/token (p50, min-max of repeats)", "prefill ms (median, min-max)")):
        heights = [rows[n][mid] for n in names]
        low = [max(0.0, rows[n][mid] - rows[n].get(f"{key}_min", rows[n][mid])) for n in names]
        high = [max(0.0, rows[n].get(f"{key}_max", rows[n][mid]) - rows[n][mid]) for n in names]
        bars = ax.bar([label(n, rows[n]) for n in names], heights, yerr=[low, high], capsize=4, color="tab:blue")
        for bar, n in zip(bars, names):
            if rows[n].get("noisy"):  # hatched: not to be trusted
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ms")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(heading(results) + ("; hatched: noisy" if any(r.get("noisy") for r in rows.values()) else ""),
                 fontsize=8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it owner-only; a chart is for everyone to read
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
