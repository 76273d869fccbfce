"""Hugging Face Hub: pull a model into the models directory, search for models.

A pull fetches only what mrs runs (safetensors weights, configs, tokenizer files, chat
template, sentence-transformers pooling files) with huggingface_hub, which does the
HTTP, the retries and the byte-range resume of a cut download. Files land in a hidden
``<home>/.partial-org--model`` folder that ``list`` ignores; only when every file is
there and matches the Hub's checksums is it renamed to ``<home>/org--model``. An
interrupted pull leaves the partial folder, and the next pull of the same model keeps
the files it already has.

Progress is reported as Ollama-style events, the shape ``POST /api/pull`` streams:
``{"status": "pulling model.safetensors", "digest": "sha256:…", "total": n, "completed": k}``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from mrs import store
from mrs.errors import (
    InvalidModelNameError,
    ModelNotFoundError,
    MrsError,
    NotAModelError,
    UnsupportedModelError,
)

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]

# Small files mrs reads besides the weights (fnmatch patterns on repo paths).
SIDE_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
    # sentence-transformers: module list, pooling and dense heads
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "*_Pooling/config.json", "*_Dense/config.json", "*_Dense/*.safetensors",
)
INDEX = "model.safetensors.index.json"
SEARCH_TASKS = ("text-generation", "feature-extraction", "sentence-similarity")


class HubError(MrsError):
    """The Hub (or the mirror) could not be reached or refused the request."""

    http_status = 502


def repo_id(ref: str) -> str:
    """'org/model' (also accepts a huggingface.co URL) -> a validated repo id."""
    return split_ref(ref)[0]


def split_ref(ref: str) -> tuple[str, str | None]:
    """'org/model' or 'org/model-GGUF:Q4_K_M' (Ollama's hf.co convention) -> (repo id, quant)."""
    if not isinstance(ref, str):
        raise InvalidModelNameError(f"model name must be text, got {ref!r}")
    base, quant = store.split_quant(ref)
    return store.validate_name(base), quant


def _quant_of(path: str) -> str:
    """The quant a GGUF file name ends with: 'tiny-Q4_K_M.gguf' -> 'Q4_K_M'."""
    return re.split(r"[-.]", path.rsplit("/", 1)[-1][: -len(".gguf")])[-1]


def select_gguf(name: str, quant: str, entries: dict[str, Any]) -> str:
    """The one .gguf file of a repo whose name carries ``quant`` (Q4_K_M matches *-Q4_K_M.gguf)."""
    ggufs = sorted(p for p in entries if p.lower().endswith(".gguf") and "mmproj" not in p.lower())
    pattern = re.compile(rf"(^|[-._/]){re.escape(quant.lower())}([-._]|$)")
    chosen = [p for p in ggufs if pattern.search(p.lower()[: -len(".gguf")])]
    if not ggufs:
        raise NotAModelError(f"'{name}' has no .gguf files; pull it without ':{quant}'")
    if not chosen:
        quants = sorted({_quant_of(p) for p in ggufs})
        raise ModelNotFoundError(f"'{name}' has no {quant} GGUF; it has {', '.join(quants)}")
    if len(chosen) > 1:
        raise UnsupportedModelError(f"'{name}' splits {quant} over {len(chosen)} files ({', '.join(chosen[:3])}); "
                                    "mrs reads single-file GGUFs")
    return chosen[0]


def default_endpoint() -> str | None:
    """MRS_MIRROR (settings) if set, else huggingface_hub's own default (HF_ENDPOINT or huggingface.co)."""
    from mrs.config import Settings

    return Settings.load().mirror or None


# ---------------------------------------------------------------------------------------
# Errors: huggingface_hub / HTTP failures -> MrsError with a message a user can act on.
# ---------------------------------------------------------------------------------------

class _HubErrors:
    """Context manager translating huggingface_hub exceptions for one repo."""

    def __init__(self, name: str, endpoint: str | None, revision: str | None = None):
        self.name, self.revision = name, revision
        self.where = endpoint or "the Hugging Face Hub"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, (MrsError, KeyboardInterrupt)):
            return False
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if type(error).__name__ == "OfflineModeIsEnabled":
            raise HubError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to pull or search") \
                from error
        if isinstance(error, GatedRepoError):
            raise MrsError(f"'{self.name}' is gated: accept its terms on the model page, then set HF_TOKEN "
                           "to a token of that account") from error
        if isinstance(error, RevisionNotFoundError):
            raise ModelNotFoundError(f"revision '{self.revision}' of '{self.name}' not found on {self.where}") \
                from error
        if isinstance(error, RepositoryNotFoundError):
            raise ModelNotFoundError(f"model '{self.name}' not found on {self.where} (if it is private, "
                                     "set HF_TOKEN) — try `mrs search`") from error
        if isinstance(error, EntryNotFoundError):
            raise HubError(f"a file of '{self.name}' vanished from {self.where} while pulling; try again") \
                from error
        if isinstance(error, HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status in (401, 404):
                raise ModelNotFoundError(f"model '{self.name}' not found on {self.where} (if it is private, "
                                         "set HF_TOKEN)") from error
            raise HubError(f"{self.where} answered HTTP {status} for '{self.name}': "
                           f"{str(error).splitlines()[0]}") from error
        if isinstance(error, LocalEntryNotFoundError) or _is_network_error(error):
            raise HubError(f"cannot reach {self.where} ({type(error).__name__}: {error}); check the network, "
                           "or set MRS_MIRROR to a Hub mirror") from error
        if isinstance(error, OSError):
            raise MrsError(f"pulling '{self.name}' failed: {error}") from error
        return False


def _is_network_error(error: BaseException) -> bool:
    names = {c.__name__ for c in type(error).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "RemoteProtocolError", "NetworkError",
                         "TransportError", "ProxyError"})


# ---------------------------------------------------------------------------------------
# Progress: a tqdm stand-in that huggingface_hub drives, turned into events.
# ---------------------------------------------------------------------------------------

def _progress_class(emit: Progress, status: str, digest: str | None, interval: float = 0.1):
    """A tqdm-like class for hf_hub_download that reports bytes as Ollama-style events."""

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, desc: str = "", **kw: Any):
            self.total, self.n = total, int(initial or 0)
            # xet downloads open a second "downloading bytes" bar for the wire; report the file bar only
            self.quiet = "downloading bytes" in str(desc)
            self.last = 0.0
            self.report(force=True)

        def report(self, force: bool = False) -> None:
            now = time.monotonic()
            if self.quiet or not (force or now - self.last >= interval):
                return
            self.last = now
            event: dict = {"status": status, "completed": int(self.n)}
            if digest:
                event["digest"] = digest
            if self.total:
                event["total"] = int(self.total)
            emit(event)

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            self.report()

        def close(self) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

        def __getattr__(self, name: str):  # set_postfix_str, refresh, ... : nothing to draw
            return lambda *a, **k: None

    return Bar


# ---------------------------------------------------------------------------------------
# pull
# ---------------------------------------------------------------------------------------

def select_files(entries: dict[str, Any], index: dict | None) -> list[str]:
    """Which repo files mrs needs, from the repo's file list (path -> entry) and its weight index."""
    paths = list(entries)
    side = [p for p in paths if any(fnmatch(p, pattern) for pattern in SIDE_FILES)]
    if index is not None:
        weights = [INDEX] + sorted(set(index.get("weight_map", {}).values()))
    elif "model.safetensors" in entries:
        weights = ["model.safetensors"]
    else:
        weights = sorted(p for p in paths if p.endswith(".safetensors") and "/" not in p)
    return list(dict.fromkeys(weights + sorted(side)))


def _check_repo(name: str, entries: dict[str, Any], wanted: list[str]) -> None:
    if "config.json" not in entries:
        ggufs = sorted(p for p in entries if p.lower().endswith(".gguf"))
        hint = (f"; it holds GGUF files: pull one quant as '{name}:QUANT', e.g. '{name}:{_quant_of(ggufs[0])}'"
                if ggufs else "; look for another with `mrs search`")
        raise NotAModelError(f"'{name}' has no config.json, so it is not a Hugging Face transformers model{hint}")
    if not any(p.endswith(".safetensors") for p in wanted):
        others = sorted(p for p in entries if p.endswith((".bin", ".pt", ".pth", ".gguf", ".ckpt")))[:3]
        found = f" (it has {', '.join(others)})" if others else ""
        raise NotAModelError(f"'{name}' has no safetensors weights{found}; mrs loads safetensors only — "
                             "look for a safetensors version with `mrs search`")
    missing = [p for p in wanted if p not in entries]
    if missing:
        raise NotAModelError(f"'{name}' lists weight shards that are not in the repo: {', '.join(missing[:3])}")


def _git_blob_sha1(file: Path) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % file.stat().st_size)
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _seed_from(target: Path, partial: Path) -> None:
    """Start an update from the installed files (hard links: no copy, and the originals stay intact)."""
    for src in target.rglob("*"):
        dst = partial / src.relative_to(target)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif src.is_file() and not dst.exists() and not src.name.endswith(".lock"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _install(partial: Path, target: Path) -> None:
    """Swap the finished folder into place (two renames; the old copy is deleted after)."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.rename(target, old)
    os.rename(partial, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class PullCancelled(MrsError):
    """The caller stopped a pull; what was fetched waits, hidden, for the next pull to resume."""


def pull(ref: str, home: Path, *, revision: str | None = None, endpoint: str | None = None,
         token: str | None = None, on_progress: Progress | None = None,
         cancelled: threading.Event | None = None) -> Path:
    """Download a model from the Hub into ``<home>/org--model``; returns the folder.

    Only complete, verified downloads become visible; a repeated pull resumes an
    interrupted one and skips files that are already up to date. ``on_progress`` gets
    Ollama-style events (it may be called from a download thread). Setting
    ``cancelled`` stops the download at its next progress report (PullCancelled).
    """
    import huggingface_hub
    from filelock import FileLock
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    name, quant = split_ref(ref)
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise MrsError(f"revision must be a branch, tag or commit, got {revision!r}")
    home = Path(home).expanduser()
    endpoint = endpoint or default_endpoint()
    report: Progress = on_progress or (lambda event: None)

    def emit(event: dict) -> None:
        if cancelled is not None and cancelled.is_set():
            raise PullCancelled(f"pull of {name} cancelled")
        report(event)

    target = store.model_dir(home, f"{name}:{quant}" if quant else name)
    home.mkdir(parents=True, exist_ok=True)
    partial = home / f".partial-{target.name}"
    api = HfApi(endpoint=endpoint, token=token)

    emit({"status": "pulling manifest"})
    with _HubErrors(name, endpoint, revision), FileLock(str(home / f".{target.name}.lock")):
        info = api.model_info(name, revision=revision)
        commit = info.sha
        entries = {f.path: f for f in api.list_repo_tree(name, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)}
        fresh = not partial.exists()
        partial.mkdir(parents=True, exist_ok=True)
        if fresh and target.is_dir():
            _seed_from(target, partial)
        old_manifest = store.read_checksums(partial) if (partial / store.CHECKSUMS).is_file() else None

        def download(path: str) -> bool:
            """Fetch one file (huggingface_hub skips it if it is already there); True if new bytes came."""
            entry = entries[path]
            digest = f"sha256:{entry.lfs.sha256}" if entry.lfs is not None else None
            status = f"pulling {path}"
            local = partial / path
            before = local.stat() if local.is_file() else None
            huggingface_hub.hf_hub_download(name, path, revision=commit, local_dir=partial, endpoint=endpoint,
                                            token=token, tqdm_class=_progress_class(emit, status, digest))
            emit({"status": status, "total": int(entry.size), "completed": int(entry.size)}
                 | ({"digest": digest} if digest else {}))
            after = local.stat()
            return before is None or (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns)

        index = None
        if quant:                                    # one GGUF quant: that file alone
            wanted = [select_gguf(name, quant, entries)]
        else:
            if INDEX in entries:
                download(INDEX)
                index = store.read_json(partial / INDEX)
            wanted = select_files(entries, index)
            _check_repo(name, entries, wanted)
        # weights last: a cut leaves the small files done
        small_first = sorted(wanted, key=lambda p: p.endswith((".safetensors", ".gguf")))
        fetched = {path for path in small_first if download(path)}

        emit({"status": "verifying sha256 digest"})
        sums: dict[str, dict] = {}
        for path in wanted:
            file, entry = partial / path, entries[path]
            lfs = entry.lfs
            previous = (old_manifest or {}).get("files", {}).get(path)
            if path not in fetched and previous and previous.get("size") == file.stat().st_size:
                sums[path] = previous  # untouched since it was verified
                continue
            sha256 = store.sha256_file(file)
            good = sha256 == lfs.sha256 if lfs is not None else _git_blob_sha1(file) == entry.blob_id
            if not good or file.stat().st_size != entry.size:
                file.unlink(missing_ok=True)
                raise store.ChecksumError(f"{path} of '{name}' does not match the Hub's checksum (a corrupted "
                                          "download?); it was deleted — run the pull again")
            sums[path] = {"size": file.stat().st_size, "sha256": sha256}
        for stale in set(store.model_files(partial)) - set(wanted):  # left over from an older revision
            (partial / stale).unlink()

        emit({"status": "writing manifest"})
        store.write_checksums(partial, sums, source={"repo": name, "revision": revision or "main",
                                                     "commit": commit, "endpoint": endpoint or "default"})
        _install(partial, target)
    emit({"status": "success"})
    log.info("pulled %s (%s) into %s", name, commit, target)
    return target


# ---------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------

def search(query: str, limit: int = 20, endpoint: str | None = None, task: str | None = None) -> list[dict]:
    """Hub models matching ``query`` that mrs can run (safetensors; text generation or embeddings),
    most downloaded first: [{"id", "task", "downloads", "likes", "modified"}]."""
    from huggingface_hub import HfApi

    if not isinstance(query, str):
        raise MrsError(f"search query must be text, got {query!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise MrsError(f"limit must be an integer from 1 to 1000, got {limit!r}")
    if task is not None and task not in SEARCH_TASKS:
        raise MrsError(f"task must be one of {', '.join(SEARCH_TASKS)}, got {task!r}")
    endpoint = endpoint or default_endpoint()
    api = HfApi(endpoint=endpoint)
    found: dict[str, dict] = {}
    with _HubErrors(query, endpoint):
        for pipeline in (task,) if task else SEARCH_TASKS:
            for m in api.list_models(search=query or None, pipeline_tag=pipeline, filter="safetensors",
                                     sort="downloads", limit=limit):
                modified = getattr(m, "last_modified", None) or getattr(m, "created_at", None)
                found.setdefault(m.id, {
                    "id": m.id, "task": m.pipeline_tag or pipeline, "downloads": int(m.downloads or 0),
                    "likes": int(m.likes or 0), "modified": modified.isoformat() if modified else None})
    return sorted(found.values(), key=lambda m: -m["downloads"])[:limit]
