"""Bundles on the device: every file checked against manifest.json before anything is loaded; archives unpacked
without trusting their member names.

A bundle is a directory written by `pipeline package`: model.onnx (+ model.onnx.data), tokenizer.json,
generation_config.json, genai_config.json, tokenizer_config.json and manifest.json, which lists every other
file with its sha256 and size. A copy that was truncated, altered, half-synced or had files added is refused
before onnxruntime or the tokenizer parse a byte of it: a damaged model would otherwise load and produce wrong
text, or crash the process without saying why. Unlisted files are refused too, because onnxruntime-genai reads
optional files from the folder by name, and a model can point at external data by name.

The manifest is not signed: it catches corruption and casual tampering, not an attacker who rewrites it too.
Pin `sha256(manifest.json)` (printed by `pipeline package --json`) out of band where that matters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from runtimes.errors import RuntimeUserError

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "edge-pipeline-bundle"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
_CHUNK = 1 << 20
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under `root` but manifest.json; links and special files are refused,
    since a link would make the bytes checked and the bytes loaded come from different places."""
    names = []
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise RuntimeUserError(f"bundle {root}: {name} is a link or special file: bundles hold plain files "
                                   "only, copy the bundle again")
        if path.is_file() and name != MANIFEST_FILE:
            names.append(name)
    return names


def describe_files(root: Path) -> dict[str, dict]:
    """{name: {"sha256", "size"}} of every file in the bundle directory: the `files` section of manifest.json."""
    return {name: {"sha256": file_sha256(root / name), "size": (root / name).stat().st_size}
            for name in bundle_files(root)}


def _safe_name(name: str) -> bool:
    """A relative path that stays inside the directory it is joined to, on any OS."""
    p = PurePosixPath(name)
    return bool(name) and "\\" not in name and not p.is_absolute() and ".." not in p.parts and ":" not in name


def load_manifest(root: Path) -> dict:
    """manifest.json of a bundle, with its `files` section checked to be well-formed."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise RuntimeUserError(f"{root} has no {MANIFEST_FILE}: it is not a bundle written by `pipeline package`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RuntimeUserError(f"{path} is not valid JSON ({e}): copy the bundle again") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or manifest.get("format") != BUNDLE_FORMAT:
        raise RuntimeUserError(f"{path} is not a {BUNDLE_FORMAT} manifest (no file list): re-package the bundle")
    for name, entry in files.items():
        if not _safe_name(name):
            raise RuntimeUserError(f"{path} lists an unsafe path {name!r}: re-package the bundle")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise RuntimeUserError(f"{path} has no sha256 and size for {name}: re-package the bundle")
    return manifest


def verify_bundle(root: str | Path) -> dict:
    """Check every file listed in manifest.json (presence, size, sha256) and that nothing unlisted was added;
    returns the manifest. Sizes are compared first so a truncated copy fails before any hashing."""
    root = Path(root)
    manifest = load_manifest(root)
    listed = manifest["files"]
    present = set(bundle_files(root))
    for name in sorted(listed):
        if name not in present:
            raise RuntimeUserError(f"bundle {root}: {name} is missing (listed in {MANIFEST_FILE}): "
                                   "copy the whole bundle again")
    extra = sorted(present - set(listed))
    if extra:
        raise RuntimeUserError(f"bundle {root}: {extra[0]} is not listed in {MANIFEST_FILE}: remove it, "
                               "or re-package the bundle if it belongs there")
    for name, entry in sorted(listed.items()):
        size = (root / name).stat().st_size
        if size != entry["size"]:
            raise RuntimeUserError(f"bundle {root}: {name} is {size} bytes, {MANIFEST_FILE} says {entry['size']} "
                                   "(truncated or altered): copy the bundle again")
    for name, entry in sorted(listed.items()):
        if file_sha256(root / name) != entry["sha256"]:
            raise RuntimeUserError(f"bundle {root}: {name} does not match its sha256 in {MANIFEST_FILE} "
                                   "(corrupt or tampered): copy the bundle again")
    return manifest


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _member_target(dest: Path, name: str, archive: Path, seen: set[str]) -> Path:
    """Where a member goes inside `dest`; absolute paths, `..`, and duplicates (a later member silently
    replacing a checked one) are refused."""
    name = name.rstrip("/")
    if not _safe_name(name):
        raise RuntimeUserError(f"archive {archive} holds an unsafe path {name!r}: refusing to unpack it")
    if name in seen:
        raise RuntimeUserError(f"archive {archive} holds {name!r} twice: refusing to unpack it")
    seen.add(name)
    return dest / name


def _write_member(source: BinaryIO, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


def _extract_tar(archive: Path, dest: Path) -> None:
    seen: set[str] = set()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            target = _member_target(dest, member.name, archive, seen)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                _write_member(tar.extractfile(member), target)
            else:
                raise RuntimeUserError(f"archive {archive} holds a link or special file {member.name!r}: "
                                       "refusing to unpack it")


def _extract_zip(archive: Path, dest: Path) -> None:
    seen: set[str] = set()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _member_target(dest, info.filename, archive, seen)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer recorded no Unix file type
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise RuntimeUserError(f"archive {archive} holds a link or special file {info.filename!r}: "
                                       "refusing to unpack it")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as source:
                    _write_member(source, target)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a .tar.gz / .zip bundle into `dest` (which must be empty); returns the bundle's directory in it:
    `dest` itself or its one top-level folder, whichever holds manifest.json."""
    try:
        (_extract_zip if archive.name.lower().endswith(".zip") else _extract_tar)(archive, dest)
    except _ARCHIVE_ERRORS as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeUserError(f"cannot unpack archive {archive} ({reason}): it is corrupt or truncated, "
                               "copy it again") from e
    if (dest / MANIFEST_FILE).is_file():
        return dest
    tops = list(dest.iterdir())
    if len(tops) == 1 and (tops[0] / MANIFEST_FILE).is_file():
        return tops[0]
    raise RuntimeUserError(f"archive {archive} does not hold one bundle (no {MANIFEST_FILE} at its top): "
                           "pass an archive written by `pipeline package --archive`")


BUNDLE_MARKERS = ("genai_config.json", "generation_config.json", "tokenizer_config.json")  # what package writes


def in_run(model: Path) -> bool:
    """Whether `model` is a variant in a run directory (RUN/variants/NAME/model.onnx beside RUN/manifest.json):
    its folder holds the same configs as a bundle, but the run's manifest, not a bundle's, records its files."""
    parents = model.absolute().parents
    return len(parents) > 2 and parents[1].name == "variants" and (parents[2] / MANIFEST_FILE).is_file()


@contextlib.contextmanager
def opened_bundle(path: str | Path, require_manifest: bool = False) -> Iterator[tuple[Path, dict | None]]:
    """(the path to load, its verified manifest), checked before anything is loaded.

    An archive is unpacked into a temporary directory (removed on exit) and verified; a directory is a bundle
    and must carry a manifest.json that verifies, and so must a model file inside such a directory. Only a
    bare .onnx file outside any bundle (a run's variant, say) comes back with manifest None for the loader to
    judge, unless `require_manifest`.
    """
    path = Path(path)
    if is_archive(path):
        with tempfile.TemporaryDirectory(prefix="edge-bundle-") as tmp:
            root = extract_archive(path, Path(tmp))
            yield root, verify_bundle(root)
    elif path.is_dir():
        yield path, verify_bundle(path)  # no manifest: refused by load_manifest
    elif path.is_file() and ((path.parent / MANIFEST_FILE).exists()
                             or (any((path.parent / m).exists() for m in BUNDLE_MARKERS) and not in_run(path))):
        yield path, verify_bundle(path.parent)  # a file of a bundle: the whole bundle is checked
    elif require_manifest:
        raise RuntimeUserError(f"{path} is neither a bundle directory nor a bundle archive "
                               f"({', '.join(ARCHIVE_SUFFIXES)})")
    else:
        yield path, None
