"""The run directory and its manifest.json: what each stage read, with which options, wrote, and measured.

Every artifact is recorded with its parent, the digest of the parent it was made from, the stage that made it,
that stage's config and the sha256 of its files, so any stage can be rerun alone and a bundle can say exactly
where its model came from.

    RUN/
      manifest.json
      checkpoint/            pipeline train (HF format)
      pruned/, student/      [prune] and [distill] in pipeline run (HF format, with pruning.json / distill.json)
      tokenizer.json         pipeline export
      config.json            pipeline export: the source's Hugging Face config
      variants/<name>/model.onnx[.data]   fp32 (export), fused, fused-fp16 (optimize), w8a8/static/w8/w4, each
                     beside config.json, generation_config.json, genai_config.json, tokenizer(_config).json,
                     so Optimum and onnxruntime-genai open the folder as it is (pipeline/loaders.py)

The manifest never lies about the files beside it:

- A stage writes its outputs into a private staging directory inside the run (`RUN/.staging-*`), validates them
  there, and only then publishes them: the old files are moved aside, the new ones renamed into place and the new
  manifest swapped in, with Ctrl-C held back for those few renames. A stage that fails or is interrupted leaves
  the run exactly as it was.
- Replacing an artifact with different bytes removes everything derived from the old one (re-exporting another
  model drops the old model's variants; re-exporting the same one keeps them), and every artifact records the
  digest of the parent it was made from: a variant whose parent changed since, or whose files differ from their
  record, is refused by every stage that reads it.
- A directory that holds files but no manifest is not a run directory and is never written into.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import UserError
from models.files import interrupts_deferred, remove_tree
from runtimes.bundle import file_sha256 as sha256

MANIFEST = "manifest.json"
SCHEMA = 2                    # 2: artifacts carry digest / parent_digest / stat
LOCK = ".pipeline.lock"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
OWN_ENTRIES = (LOCK, STAGING_PREFIX, TRASH_PREFIX, f".{MANIFEST}.")  # what a stage may leave in a fresh directory
PUBLISHED: list[str] = []  # "`stage` in RUN" for each commit this process made: a later Ctrl-C's message names them


def files_under(path: Path) -> list[Path]:
    """The files an artifact path stands for: every file under a directory, or a model file and its external
    data (`model.onnx`, `model.onnx.data`)."""
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file())
    return sorted(f for f in path.parent.glob(path.name + "*") if f.is_file())


def digest(files: dict[str, str]) -> str:
    """One hash naming an artifact's exact content: its files' names and sha256s."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def write_json_temp(path: Path, data: dict) -> Path:
    """`data` written to a temporary file beside `path` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it owner-only; a manifest is for everyone to read
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _shape_error(path: Path, what: str) -> UserError:
    return UserError(f"{path} is malformed ({what}): it was edited by hand or by another tool; rerun the stages "
                     "into a new run directory")


def validate_manifest(data, path: Path) -> dict:
    """The manifest's shape, checked once on load, so no stage meets a KeyError deep inside."""
    if not isinstance(data, dict):
        raise _shape_error(path, "not a JSON object")
    if data.get("schema") != SCHEMA:
        raise UserError(f"{path} has schema {data.get('schema')!r}, this pipeline writes {SCHEMA}: rerun the "
                        "stages into a new run directory")
    arts, stages = data.get("artifacts"), data.get("stages")
    if not isinstance(arts, dict):
        raise _shape_error(path, "`artifacts` is not an object")
    if not isinstance(stages, list):
        raise _shape_error(path, "`stages` is not a list")
    for name, art in arts.items():
        if not (isinstance(art, dict) and isinstance(art.get("path"), str) and isinstance(art.get("kind"), str)
                and isinstance(art.get("files"), dict) and isinstance(art.get("digest"), str)
                and (art.get("parent") is None or isinstance(art.get("parent"), str))):
            raise _shape_error(path, f"artifact {name!r} lacks kind, path, files, digest or parent")
    for s in stages:
        if not (isinstance(s, dict) and isinstance(s.get("stage"), str) and isinstance(s.get("results"), dict)
                and isinstance(s.get("outputs", []), list)):
            raise _shape_error(path, "a stage entry lacks stage or results")
    return data


def descendants(artifacts: dict, roots: set[str]) -> set[str]:
    """Every artifact whose chain of parents reaches one of `roots` (the roots themselves excluded)."""
    out: set[str] = set()
    for name in artifacts:
        seen, parent = {name}, artifacts[name].get("parent")
        while parent is not None and parent in artifacts and parent not in seen:
            if parent in roots:
                out.add(name)
                break
            seen.add(parent)
            parent = artifacts[parent].get("parent")
    return out - roots


def unit_of(art: dict) -> str | None:
    """The run-relative path a stage publishes for an artifact: a variant's whole directory, else its path;
    None for what lives outside the run (a source checkpoint)."""
    path = art["path"]
    if Path(path).is_absolute():
        return None
    return str(Path(path).parent) if art["kind"] == "onnx" else path


@dataclass
class Transaction:
    """Outputs of one stage, written under `staging` (run-relative paths) and published by `commit`.

    Stages run side by side (each stages privately); `commit` alone is serialized by a lock on the run, and
    refuses to publish outputs made from an input that another command replaced meanwhile.
    """
    run: "RunDir"
    staging: Path
    pending: list[tuple[str, dict, dict, dict, dict]] = field(default_factory=list)
    reads: dict[str, str] = field(default_factory=dict)  # artifact -> digest it had when this stage read it

    def read(self, name: str) -> Path:
        """An input artifact, verified (run.verified), whose digest is remembered for the lineage of outputs."""
        path = self.run.verified(name)
        self.reads[name] = self.run.artifact(name)["digest"]
        return path

    def path(self, rel: str) -> Path:
        """Where to write the run-relative path `rel` now; its directory exists."""
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def variant_path(self, name: str) -> Path:
        return self.path(f"variants/{name}/model.onnx")

    def record(self, stage: str, config: dict, inputs: dict, outputs: dict[str, dict], results: dict) -> None:
        """What the stage did; `outputs` maps artifact name -> {kind, path, parent, ...} with `path` run-relative
        (written under `path()`), or absolute for what lives outside the run (the source checkpoint)."""
        self.pending.append((stage, config, inputs, outputs, results))

    def _describe(self, art: dict) -> dict:
        """files / digest / stat of an output, hashed where it is now (staging, or outside the run)."""
        rel = art["path"]
        where = Path(rel) if Path(rel).is_absolute() else self.staging / rel
        if not where.exists():
            raise FileNotFoundError(errno.ENOENT, "a stage did not write its output", str(where))
        if art["kind"] == "onnx" and not Path(rel).is_absolute():
            where = where.parent  # the variant's folder: the model and the files that let other tools load it
        files, stat = {}, {}
        base = self.staging if not Path(rel).is_absolute() else self.run.root
        for f in files_under(where):
            key = str(f.relative_to(base)) if f.is_relative_to(base) else str(f)
            files[key] = sha256(f)
            st = f.stat()
            stat[key] = [st.st_size, st.st_mtime_ns]
        return {"files": files, "digest": digest(files), "stat": stat}

    def _complete_variants(self, outputs: dict[str, dict], arts: dict) -> None:
        """Beside each new variant's model, the files other tools need to open its folder as it is (config,
        tokenizer, generation and genai configs: pipeline/loaders.py), from this stage's outputs or the run's."""
        from pipeline.loaders import CONFIG_FILE, TOKENIZER_FILE, write_loader_files

        exporting = "source" in outputs  # then only its own tokenizer and config, never an earlier model's

        def newest(rel: str) -> Path | None:
            places = (self.staging / rel,) if exporting else (self.staging / rel, self.run.root / rel)
            return next((p for p in places if p.is_file()), None)

        source = outputs.get("source") or arts.get("source") or {}
        for art in outputs.values():
            if art["kind"] == "onnx" and not Path(art["path"]).is_absolute():
                write_loader_files((self.staging / art["path"]).parent, source, newest(TOKENIZER_FILE),
                                   newest(CONFIG_FILE))

    def commit(self) -> None:
        with self.run._locked():
            self._publish()

    def _publish(self) -> None:
        run = self.run
        data = run.load() if run.manifest_path.exists() else {"schema": SCHEMA, "created": _now(), "artifacts": {},
                                                             "stages": []}
        arts = data["artifacts"]
        for name, read_digest in self.reads.items():
            if arts.get(name, {}).get("digest") != read_digest:
                raise UserError(f"{name!r} in run {run.root} was replaced while this stage ran: rerun it")
        units: list[str] = []
        for stage, config, inputs, outputs, results in self.pending:
            self._complete_variants(outputs, arts)
            described = {name: self._describe(art) for name, art in outputs.items()}
            replaced = {n for n in outputs if n in arts}
            changed = {n for n in replaced if arts[n]["digest"] != described[n]["digest"]}
            doomed = descendants(arts, changed) - set(outputs)  # made from what changed; the same bytes keep them
            for name in sorted(replaced | doomed):
                if (unit := unit_of(arts[name])) is not None and (run.root / unit).exists():
                    units.append(unit)
            for name in doomed:
                del arts[name]
            for name, art in outputs.items():
                parent = art.get("parent")
                made_from = described.get(parent) or arts.get(parent) or {}
                parent_digest = self.reads.get(parent, made_from.get("digest")) if parent else None
                arts[name] = {**art, "stage": stage, "config": config, **described[name],
                              "parent_digest": parent_digest, "created": _now()}
            data["stages"].append({"stage": stage, "config": config, "inputs": inputs, "outputs": sorted(outputs),
                                   "results": results, "finished": _now()})
        new_units = sorted({u for *_, outputs, _ in self.pending for art in outputs.values()
                            if (u := unit_of(art)) is not None})
        manifest_tmp = write_json_temp(run.manifest_path, data)  # written before anything becomes visible
        moved: list[tuple[Path, Path]] = []
        trash = None
        try:
            trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{os.getpid()}-", dir=run.root))
            with interrupts_deferred():
                try:
                    for i, unit in enumerate(dict.fromkeys(units)):
                        moved.append((run.root / unit, trash / str(i)))
                        os.rename(*moved[-1])
                    for unit in new_units:
                        (run.root / unit).parent.mkdir(parents=True, exist_ok=True)
                        moved.append((self.staging / unit, run.root / unit))
                        os.rename(*moved[-1])
                    os.replace(manifest_tmp, run.manifest_path)
                    PUBLISHED.extend(f"`{stage}` in {run.root}" for stage, *_ in self.pending)
                except BaseException:
                    for src, dst in reversed(moved):  # put everything back as it was
                        if dst.exists():
                            os.rename(dst, src)
                    raise
        finally:
            manifest_tmp.unlink(missing_ok=True)  # gone already once it became the manifest
            if trash is not None:
                remove_tree(trash)


@dataclass
class RunDir:
    root: Path

    @classmethod
    def open(cls, root: str | Path, create: bool = False) -> "RunDir":
        """An existing run directory; with `create`, also a new one (made when the first stage publishes) or an
        empty directory. A directory holding anything else is refused: a stage never writes into it."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} exists and is not a directory: choose another run directory")
        if (root / MANIFEST).is_file():
            return cls(root)
        if root.is_dir():
            foreign = sorted(p.name for p in root.iterdir() if not p.name.startswith(OWN_ENTRIES))
            if foreign:
                raise UserError(f"{root} holds files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
                                f" but no {MANIFEST}: it is not a run directory; choose a new or empty one")
        if not create:
            raise UserError(f"run directory not found: {root} (create one with `pipeline export` or `pipeline run`)")
        return cls(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def load(self) -> dict:
        if not self.manifest_path.exists():
            return {"schema": SCHEMA, "created": _now(), "artifacts": {}, "stages": []}
        try:
            data = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.manifest_path} is corrupt ({e}): rerun the stages into a new run directory") from e
        return validate_manifest(data, self.manifest_path)

    def variant_dir(self, name: str) -> Path:
        return self.root / "variants" / name

    def variant_path(self, name: str) -> Path:
        return self.variant_dir(name) / "model.onnx"

    def variants(self) -> list[str]:
        """Recorded ONNX variants whose model file is still there, in the order they were made."""
        arts = self.load()["artifacts"]
        return [k for k, a in arts.items() if a.get("kind") == "onnx" and self.variant_path(k).exists()]

    def artifact(self, name: str) -> dict:
        arts = self.load()["artifacts"]
        if name not in arts:
            have = ", ".join(arts) or "none"
            raise UserError(f"run {self.root} has no artifact {name!r} (has: {have})")
        return arts[name]

    def verified(self, name: str, full: bool = False) -> Path:
        """The path of artifact `name` (a variant's model.onnx), once its files match their record and each of its ancestors in the
        run is still the one it was made from. Files are compared by size and mtime (as git's index does) and
        hashed only where those differ; `full` hashes every file."""
        arts = self.load()["artifacts"]
        art = self.artifact(name)
        rerun = f"rerun `pipeline {art.get('stage')}`"
        for rel, expected in art["files"].items():
            p = self.root / rel
            if not p.is_file():
                raise UserError(f"variant {name!r}: {p} is missing: {rerun}")
            st = p.stat()
            if full or art.get("stat", {}).get(rel) != [st.st_size, st.st_mtime_ns]:
                if sha256(p) != expected:
                    raise UserError(f"variant {name!r}: {p} differs from what {MANIFEST} recorded (changed since "
                                    f"`pipeline {art.get('stage')}` wrote it): {rerun}")
        child, parent = name, art.get("parent")
        while parent is not None:
            if parent not in arts:
                raise UserError(f"variant {name!r} was made from {parent!r}, which run {self.root} no longer "
                                f"has: {rerun}")
            if arts[child].get("parent_digest") != arts[parent]["digest"]:
                raise UserError(f"variant {name!r} was made from an earlier {parent!r} than the one in run "
                                f"{self.root}: {rerun}")
            child, parent = parent, arts[parent].get("parent")
        return self.root / art["path"]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Stage outputs into `RUN/.staging-*` and publish them with the manifest when the block ends; on any
        error or Ctrl-C the run is left as it was (a run directory this call created is removed again)."""
        created = self.root.absolute()
        while not created.parent.exists():  # the topmost directory this call makes, removed again on failure
            created = created.parent
        created = None if created.exists() else created
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.root))
            try:
                tx = Transaction(self, staging)
                yield tx
                tx.commit()
            finally:
                remove_tree(staging)
        finally:
            if created is not None and not self.manifest_path.exists():
                remove_tree(created)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One commit at a time (waiting for another command's); what a killed command left (its staging and
        trash directories, named by its process id) is swept once locked."""
        fd = os.open(self.root / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for p in self.root.iterdir():
                if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and not _alive(p.name.split("-")[1]):
                    remove_tree(p)
            yield
        finally:
            os.close(fd)

    def record(self, stage: str, config: dict, inputs: dict[str, str], results: dict) -> None:
        """Append a stage that wrote no files into the run (check, bench, package); one that writes artifacts
        records them through transaction()."""
        with self.transaction() as tx:
            tx.record(stage, config, inputs, {}, results)

    def results(self, stage: str) -> dict:
        """The latest results of a stage, {} if it never ran."""
        for s in reversed(self.load()["stages"]):
            if s["stage"] == stage:
                return s["results"]
        return {}


def _alive(pid: str) -> bool:
    """Whether the process that named a staging directory still runs (it may still be writing there)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
