"""Stage `package`: one ONNX variant of a run -> the bundle that goes onto the device (and optionally one archive).

    BUNDLE/
      model.onnx [model.onnx.data]   the variant, byte for byte as `check` measured it
      config.json                    the source's Hugging Face config (Optimum's ORTModelForCausalLM reads it)
      tokenizer.json                 read by runtimes/ (tokenizers)
      generation_config.json         eos/bos ids, so the runtime stops at end of sequence
      genai_config.json              lets onnxruntime-genai load the folder as it is
      tokenizer_config.json          AutoTokenizer's and onnxruntime-genai's settings (pipeline/loaders.py)
      manifest.json                  sha256 + size of every other file, source, lineage, check and bench figures,
                                     and the memory generation needs at a few context lengths

The bundle is assembled in a temporary directory beside BUNDLE and renamed into place, so a reader never sees a
half-written bundle and an old one survives any failure; the archive is written the same way. The manifest and
archives carry no packaging time or owner, so the same run packages to the same bytes.

Every copied file is checked against the sha256 the run manifest recorded for it: what ships is what `check`
and `bench` measured, or packaging stops.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from exporters.quantization.scales import folded_bytes
from models.errors import UserError
from models.files import publish, staging_dir
from pipeline import progress
from pipeline.loaders import (GENAI_FILE, GENERATION_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, genai_type,
                              write_json, write_loader_files)
from pipeline.manifest import RunDir, sha256
from pipeline.options import check_options, option
from runtimes.bench import model_bytes
from runtimes.bundle import BUNDLE_FORMAT, MANIFEST_FILE, describe_files
from runtimes.contract import Contract, read_contract

MODEL_FILE = "model.onnx"
BUNDLE_SCHEMA = 1
INT8_RECIPES = ("w8a8", "w8", "static")  # most int8 work first: W8A8 runs its MatMuls in int8
PREFERENCE_CHECKED = (*INT8_RECIPES, "fused", "fp32")
PREFERENCE_UNCHECKED = ("fused", "fp32")
ARCHIVE_FORMATS = ("tar.gz", "zip")
TARGETS = ("any", "linux-x86_64", "linux-aarch64")
NATIVE_NEEDS = ("pipeline's native kernel built on the device (`python -m runtimes.kernels build`) and a CPU "
                "with AVX2 and FMA or AVX512-VNNI (x86-64), or the dot product (AArch64, ARMv8.2+)")
EIGHT_BIT_NEEDS = "an x86-64 CPU with VNNI (AVX512-VNNI or AVX-VNNI): its static int8 weights use all 8 bits"


@dataclass(frozen=True)
class PackageConfig:
    out: str = option(str, dataclasses.MISSING, "Bundle directory to write (an earlier bundle there is replaced).")
    variant: str = option(str, "", "Variant to ship (default: the best that passed check).")
    archive: str | None = option(str, None, "Also write one archive file, OUT.tar.gz or OUT.zip.",
                                 choices=ARCHIVE_FORMATS, optional=True)
    target: str | None = option(str, None, "The device's platform: the variant chosen must run there (any: every "
                                "CPU onnxruntime runs on), and the manifest says what it needs there.",
                                choices=TARGETS, optional=True)
    context: int = option(int, 0, "Positions the bundle serves, prompt + new tokens (0: the model's whole "
                          "context): its rotary tables and the memory its manifest states are sized to it, and a "
                          "longer request is refused (Gemma 3: 67 MB of tables at 32,768 positions, 4 MB at 2,048).",
                          lo=0)

    def __post_init__(self):
        check_options(self)


def produced_at(stages: list[dict], name: str) -> int:
    """Index of the stage that last wrote artifact `name` (-1 if none): figures from before it are stale."""
    return max((i for i, s in enumerate(stages) if name in s.get("outputs", ())), default=-1)


def check_row(stages: list[dict], name: str) -> dict | None:
    """The latest `check` result for the variant as it is now, with that check's settings."""
    after = produced_at(stages, name)
    for i in range(len(stages) - 1, after, -1):
        s = stages[i]
        if s["stage"] == "check":
            row = next((r for r in s["results"].get("variants", []) if r.get("variant") == name), None)
            if row is not None:
                return {**row, "passed": not row.get("failed"), "config": s["config"], "finished": s.get("finished")}
    return None


def bench_row(stages: list[dict], name: str) -> dict | None:
    """The latest `bench` row for the variant as it is now, with the settings it was measured under."""
    after = produced_at(stages, name)
    for i in range(len(stages) - 1, after, -1):
        s = stages[i]
        if s["stage"] == "bench" and not s["results"].get("rows", {}).get(name, {"error": "absent"}).get("error"):
            r = s["results"]
            return {"provider": r.get("provider"), "threads": r.get("threads"), "prompt_len": r.get("prompt_len"),
                    "new_tokens": r.get("new_tokens"), "finished": s.get("finished"), **r["rows"][name]}
    return None


def device_needs(variant: str, metadata: dict[str, str], target: str | None) -> tuple[list[str], str | None]:
    """(what the device needs to run `variant` beyond onnxruntime, why it cannot be promised on `target` or
    None). 8-bit static int8 weights overflow onnxruntime's x86 int8 kernels without VNNI (ARM's widen first);
    a -native variant needs our kernel, built on the device, and the CPU features it is written for."""
    from exporters.cpu_kernels import INT8_GEMM_KEY
    from exporters.quantization.config import WEIGHT_BITS_KEY

    needs = []
    if variant.endswith("-native"):
        needs.append(NATIVE_NEEDS)
    # 8-bit weights all on the native kernel (exact on every CPU it builds for) need nothing more
    if metadata.get(WEIGHT_BITS_KEY) == "8" and metadata.get(INT8_GEMM_KEY) != "native" \
            and target != "linux-aarch64":
        needs.append(EIGHT_BIT_NEEDS)
    if target != "any" or not needs:
        return needs, None
    return needs, f"variant {variant!r} needs {needs[0]}, which not every CPU has"


def variant_metadata(run_root: Path, variant: str) -> dict[str, str]:
    import onnx

    model = onnx.load(str(run_root / "variants" / variant / MODEL_FILE), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def choose_variant(run_root: Path, have: list[str], stages: list[dict], wanted: str,
                   target: str | None = None) -> str:
    """`wanted`, else the most preferred variant that passed its latest check (and runs on `target`); when no
    variant has a current check, fused before fp32. A run whose checked variants all failed is an error, not a
    silent fp32."""
    def refused(v: str) -> str | None:
        return device_needs(v, variant_metadata(run_root, v), target)[1] if target else None

    if wanted:
        if wanted not in have:
            raise UserError(f"run {run_root} has no variant {wanted!r} (has: {', '.join(have) or 'none'})")
        if (why := refused(wanted)) is not None:
            raise UserError(f"--target {target}: {why}; choose another variant or target")
        return wanted
    checks = {v: row for v in have if (row := check_row(stages, v)) is not None}
    if checks:
        passed = [v for v in PREFERENCE_CHECKED if v in checks and checks[v]["passed"]]
        runnable = [v for v in passed if refused(v) is None]
        if passed and not runnable:
            raise UserError(f"--target {target}: {refused(passed[0])}; and no other variant that passed `pipeline "
                            "check` runs there")
        if not passed:
            raise UserError(f"no variant of run {run_root} passed `pipeline check` (checked: {', '.join(checks)}): "
                            "fix them, or pass --variant to ship one anyway")
        return runnable[0]
    for v in PREFERENCE_UNCHECKED:
        if v in have:
            return v
    raise UserError(f"run {run_root} has neither a fused nor an fp32 variant to ship: run `pipeline export`, "
                    "or pass --variant")


def lineage(artifacts: dict, name: str) -> list[dict]:
    """The variant and its ancestors up to the source: which stage made each, with which options and files."""
    chain, seen = [], set()
    while name is not None and name in artifacts and name not in seen:
        seen.add(name)
        art = artifacts[name]
        chain.append({"artifact": name, "kind": art.get("kind"), "stage": art.get("stage"),
                      "config": art.get("config"), "files": art.get("files"), "created": art.get("created")})
        name = art.get("parent")
    return chain


def model_contract(model_path: Path) -> Contract:
    """The I/O contract and dimensions of the graph that ships, from its own metadata (weights not loaded)."""
    import onnx

    return read_contract(onnx.load(str(model_path), load_external_data=False), model_path)


def copy_verified(src: Path, dst: Path, expected: str) -> None:
    """Copy `src` to `dst`, hashing the bytes as they go; a file that differs from the run manifest's record
    (changed after the stage that wrote it) stops packaging."""
    if not src.is_file():
        raise UserError(f"{src} is missing from the run: rerun the stage that wrote it")
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(1 << 20):
            digest.update(block)
            fout.write(block)
    if digest.hexdigest() != expected:
        raise UserError(f"{src} changed since the run manifest recorded it (sha256 differs): rerun the stage "
                        "that wrote it")


def stage_files(run: RunDir, variant: str, artifacts: dict, dest: Path) -> None:
    """The variant's files (model, external data and the loaders' files beside them) into `dest`, each verified
    against the run manifest, and the run's tokenizer.json where the variant folder has none (runs made before
    variant folders carried it)."""
    files = artifacts[variant].get("files") or {}
    if not files:
        raise UserError(f"variant {variant!r} has no recorded files in {run.manifest_path}: rerun its stage")
    for rel, digest in files.items():
        copy_verified(run.root / rel, dest / Path(rel).name, digest)
    if (dest / TOKENIZER_FILE).is_file():
        return
    tokenizer = artifacts.get("tokenizer")
    if tokenizer is None or not (run.root / tokenizer["path"]).is_file():
        raise UserError(f"run {run.root} has no tokenizer.json: export from a checkpoint that has a tokenizer")
    copy_verified(run.root / tokenizer["path"], dest / "tokenizer.json", tokenizer["files"][tokenizer["path"]])


def size_for_context(model_path: Path, context: int) -> None:
    """The staged graph sized for `context` positions (exporters.optimize.limit_context), its weights untouched;
    the loader files that state the context (genai_config's context_length, max_length, model_max_length) go,
    and `write_loader_files` writes them again from the new contract."""
    import onnx

    from exporters.optimize import limit_context

    model = onnx.load(str(model_path), load_external_data=False)
    limit_context(model, context)
    rewritten = model_path.with_name(model_path.name + ".sized")
    onnx.save(model, str(rewritten))
    os.replace(rewritten, model_path)  # a new file: never writes through a link to the run's copy
    for name in (GENAI_FILE, GENERATION_FILE, TOKENIZER_CONFIG_FILE):
        (model_path.parent / name).unlink(missing_ok=True)


def memory_table(contract: Contract, weights_bytes: int, source: dict) -> dict:
    """Peak memory of generating at 2048 positions and at the whole context (runtimes/memory.py), by part; the
    device can compute any other length from kv_bytes_per_token."""
    from runtimes.generate import PREFILL_CHUNK
    from runtimes.memory import kv_bytes_per_token, memory_need

    intermediate = source.get("intermediate_size") or 4 * contract.hidden_size  # runs exported before it was kept
    contexts = sorted({min(2048, contract.max_position_embeddings), contract.max_position_embeddings})
    return {"kv_dtype": contract.kv_dtype, "kv_bytes_per_token": kv_bytes_per_token(contract),
            "prefill_chunk": PREFILL_CHUNK,
            "at_context": [memory_need(contract, weights_bytes, n, PREFILL_CHUNK, intermediate) for n in contexts]}


def bundle_manifest(variant: str, data: dict, dest: Path, contract: Contract, target: str | None = None) -> dict:
    """What the device can check (files) and what a person needs to trust the model (where it came from, how it
    was made, how it measured, what the device needs); no packaging time, so the same run gives the same bytes."""
    import onnx

    source = data["artifacts"].get("source", {})
    graph = onnx.load(str(dest / MODEL_FILE), load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    weights = model_bytes(dest / MODEL_FILE) + folded_bytes(graph)  # as held: float16 scales folded to float32
    return {"format": BUNDLE_FORMAT, "schema": BUNDLE_SCHEMA, "variant": variant,
            "target": target, "device_needs": device_needs(variant, meta, target)[0],
            "files": describe_files(dest),
            "source": {k: source.get(k) for k in ("path", "format", "family", "architecture", "bos_token_id",
                                                  "eos_token_id")},
            "lineage": lineage(data["artifacts"], variant),
            "check": check_row(data["stages"], variant), "bench": bench_row(data["stages"], variant),
            "memory": memory_table(contract, weights, source)}


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner, no time, plain modes: the same bundle always archives to the same bytes."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def _entries(bundle: Path) -> list[tuple[Path, str]]:
    """(path, archive name) for the bundle folder and everything in it, sorted, under the folder's own name."""
    paths = [bundle, *sorted(bundle.rglob("*"))]
    return [(p, (Path(bundle.name) / p.relative_to(bundle)).as_posix()) for p in paths]


def write_tar_gz(bundle: Path, dest: Path) -> None:
    with open(dest, "xb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in _entries(bundle):
            tar.add(path, arcname=name, recursive=False, filter=_normalize)


def write_zip(bundle: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "x", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, name in _entries(bundle):
            info = zipfile.ZipInfo(name + "/" if path.is_dir() else name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o40755 if path.is_dir() else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            if path.is_dir():
                zf.writestr(info, b"")
            else:
                with open(path, "rb") as fin, zf.open(info, "w", force_zip64=True) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)


def check_replaceable(out: Path) -> None:
    """Only an earlier bundle (or an empty directory) may be replaced: `--out .` must never delete a project."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory: choose another --out")
    marker = out / MANIFEST_FILE
    try:
        is_bundle = marker.is_file() and json.loads(marker.read_text()).get("format") == BUNDLE_FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        is_bundle = False
    if not is_bundle and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a bundle from `pipeline package`: choose another --out "
                        "(an earlier bundle there would be replaced)")


def package(run: RunDir, config: PackageConfig) -> dict:
    data = run.load()
    variant = choose_variant(run.root, run.variants(), data["stages"], config.variant, config.target)
    run.verified(variant)  # its lineage; stage_files hashes every byte as it copies
    out = Path(config.out).absolute()
    check_replaceable(out)
    archive = out.with_name(f"{out.name}.{config.archive}") if config.archive else None
    if archive is not None and archive.is_dir():
        raise UserError(f"{archive} is a directory: choose another --out")
    source = data["artifacts"].get("source", {})
    steps = ["copy and verify", "configs and manifest", "archive", "publish"]
    with progress.phases(f"package {variant}", steps) as phase, staging_dir(out) as tmp:
        phase(steps[0])
        staged = tmp / out.name
        staged.mkdir()
        stage_files(run, variant, data["artifacts"], staged)
        if config.context:
            size_for_context(staged / MODEL_FILE, config.context)
        phase(steps[1])
        contract = model_contract(staged / MODEL_FILE)  # from the verified copy: the graph that ships
        write_loader_files(staged, source, staged / TOKENIZER_FILE, None)  # what an older run's folder lacks
        manifest = bundle_manifest(variant, data, staged, contract, config.target)
        write_json(staged / MANIFEST_FILE, manifest)
        if archive is not None:
            phase(steps[2])
            (write_tar_gz if config.archive == "tar.gz" else write_zip)(staged, tmp / archive.name)
        phase(steps[3])
        publish(staged, out)
        if archive is not None:
            os.replace(tmp / archive.name, archive)
    results = {"bundle": str(out), "variant": variant,
               "size_bytes": sum(f["size"] for f in manifest["files"].values()),
               "files": {name: f["size"] for name, f in manifest["files"].items()},
               "manifest_sha256": sha256(out / MANIFEST_FILE),
               "archive": str(archive) if archive else None,
               "archive_bytes": archive.stat().st_size if archive else None,
               "genai_type": genai_type(contract.family)}
    run.record("package", asdict(config), {variant: str(run.variant_path(variant))}, results)
    return results
