"""Published weights in one command: the table of published files, ``bsf:`` / ``hf://`` checkpoint names, uploads.

Wherever a checkpoint is taken (``-pretrained_weights``, ``import-model``, ``lowdata run --pretrained-weights``) it
may be given as

* a local path (used as it is);
* ``bsf:NAME``: a file of the table ``plans/published_weights.json`` (``bsf-nnunet weights list``);
* ``hf://OWNER/REPO[@REVISION]/FILE`` (huggingface_hub's URI syntax) or ``hf://OWNER/REPO/FILE@REVISION``.

Downloads go through ``huggingface_hub.hf_hub_download`` into its cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``): huggingface_hub resumes interrupted transfers, uses only the cache with
``HF_HUB_OFFLINE=1``, sends ``HF_TOKEN`` (or the ``hf auth login`` token) for gated and private repositories, and
writes to a temporary ``*.incomplete`` file that it renames only once complete. A fresh download is read once with
:func:`~bsf_nnunet.weights.load_checkpoint`; a file that is no checkpoint (an HTML page, say) is removed from the
cache. Files of the table, whether named ``bsf:``, ``hf://`` or given as their path in the cache, bring what the
files do not record (channel names, patch merging, axis order): :meth:`ResolvedCheckpoint.load`.
"""
from __future__ import annotations

import os
import posixpath
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import BSFError
from ..planning.presets import load_preset
from .loader import Checkpoint, CheckpointError, load_checkpoint

TABLE_FILE = "published_weights.json"
SHORT_PREFIX = "bsf:"
HF_PREFIX = "hf://"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


class HubError(BSFError, ValueError):
    """A checkpoint name that cannot be resolved, or a download / upload that failed; the message says what to do."""


# ---------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class PublishedWeights:
    """One row of ``plans/published_weights.json``."""

    name: str
    repo: str
    filename: str
    kind: str  # "ssl" or "finetuned"
    description: str
    channels: Tuple[str, ...]  # in the file's order
    outputs: Optional[Tuple[str, ...]]
    regions: Optional[str]  # "brats": sigmoid region outputs
    variant: str
    merging: str
    axis_order: str
    use: str

    @property
    def spec(self) -> str:
        return SHORT_PREFIX + self.name

    def as_dict(self) -> dict:
        return dict(asdict(self), spec=self.spec)


def published_weights() -> dict:
    """``{short name: PublishedWeights}`` in the table's order."""
    rows = load_preset(TABLE_FILE)["weights"]
    return {name: PublishedWeights(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
            for name, row in rows.items()}


def repo_notice(repo: str) -> Optional[dict]:
    """Licence and citation of a repository of the table (page, licence, licence_url, citation), else None."""
    return load_preset(TABLE_FILE)["repos"].get(repo)


def entry_for(repo: str, filename: str) -> Optional[PublishedWeights]:
    """The table row of ``repo``/``filename``, or None."""
    return next((e for e in published_weights().values() if e.repo == repo and e.filename == filename), None)


def _unknown_name(name: str) -> HubError:
    known = ", ".join(e.spec for e in published_weights().values())
    return HubError(f"Unknown published weights {SHORT_PREFIX}{name}. Known: {known} (bsf-nnunet weights list); "
                    f"other files of the Hugging Face Hub: {HF_PREFIX}OWNER/REPO/FILE.")


# ---------------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    revision: Optional[str]  # None: the default branch
    repo_type: str
    entry: Optional[PublishedWeights]

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{HF_PREFIX}{kind}{self.repo}{at}/{self.filename}"

    @property
    def label(self) -> str:
        """For messages: ``bsf:NAME (hf://...)`` for published files, else the ``hf://`` name."""
        return f"{self.entry.spec} ({self})" if self.entry is not None else str(self)

    @property
    def page(self) -> str:
        from huggingface_hub import constants

        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{constants.ENDPOINT}/{kind}{self.repo}"


def is_hub_spec(spec) -> bool:
    """True for ``bsf:NAME`` and ``hf://...`` names (which are downloaded), False for local paths."""
    return isinstance(spec, str) and spec.startswith((SHORT_PREFIX, HF_PREFIX))


def _split_trailing_revision(spec: str) -> Tuple[str, Optional[str]]:
    """``hf://O/R/FILE@REV`` -> (``hf://O/R/FILE``, REV); huggingface_hub's ``hf://O/R@REV/FILE`` is left as is."""
    head, sep, last = spec.rpartition("/")
    if sep and "@" in last:
        name, _, rev = last.rpartition("@")
        return f"{head}/{name}", rev
    return spec, None


def parse_spec(spec: str, revision: Optional[str] = None) -> HubFile:
    """The repository file named by ``bsf:NAME`` or ``hf://...``; ``revision`` (e.g. ``--revision``) must agree with
    one given in the name."""
    if spec.startswith(SHORT_PREFIX):
        name = spec[len(SHORT_PREFIX):]
        entry = published_weights().get(name)
        if entry is None:
            raise _unknown_name(name)
        return HubFile(entry.repo, entry.filename, revision, "model", entry)
    from huggingface_hub import parse_hf_uri

    text, trailing = _split_trailing_revision(spec)
    syntax = f"{HF_PREFIX}OWNER/REPO/FILE, {HF_PREFIX}OWNER/REPO@REVISION/FILE or {HF_PREFIX}OWNER/REPO/FILE@REVISION"
    try:
        uri = parse_hf_uri(text)
    except ValueError as e:
        raise HubError(f"{spec} is not a Hugging Face file name ({e}). Write {syntax}.") from None
    if uri.type not in ("model", "dataset", "space"):
        raise HubError(f"{spec} names a {uri.type}, not a model, dataset or space repository. Write {syntax}.")
    if not uri.path_in_repo or uri.path_in_repo.endswith("/"):
        raise HubError(f"{spec} names a repository or folder, not a file. Write {syntax}.")
    revisions = sorted({r for r in (uri.revision, trailing, revision) if r})
    if len(revisions) > 1:
        raise HubError(f"{spec}: two different revisions ({', '.join(revisions)}); give one.")
    return HubFile(uri.id, uri.path_in_repo, revisions[0] if revisions else None, uri.type,
                   entry_for(uri.id, uri.path_in_repo) if uri.type == "model" else None)


def _cache_layout(path: str) -> Optional[Tuple[str, str, str, str]]:
    """(repo type, repo, commit, path in the repo) of a file in huggingface_hub's cache
    (``models--OWNER--REPO/snapshots/COMMIT/PATH``), else None."""
    parts = os.path.abspath(path).split(os.sep)
    if "snapshots" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    kind, sep, repo = parts[i - 1].partition("--")
    if not sep or kind not in ("models", "datasets", "spaces") or len(parts) < i + 3:
        return None
    return kind[:-1], repo.replace("--", "/"), parts[i + 1], "/".join(parts[i + 2:])


# ---------------------------------------------------------------------------------------------------- resolving
@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint name turned into a local file: ``path``, the table row (``entry``) if it is a published file,
    and ``source``, what to record as its origin (``hf://REPO@COMMIT/FILE`` for files of the Hub cache, else the
    absolute path)."""

    path: str
    entry: Optional[PublishedWeights]
    source: str

    def load(self, allow_unsafe_pickle: bool = False) -> Checkpoint:
        """:func:`load_checkpoint`, plus, for a published file, the channels, merging and axis order of the table."""
        ckpt = load_checkpoint(self.path, allow_unsafe_pickle)
        if self.entry is not None:
            meta = ckpt.metadata
            if not meta.get("channel_names"):
                meta["channel_names"] = list(self.entry.channels)
            for key in ("merging", "axis_order"):
                if meta.get(f"{key}_assumed") or key not in meta:
                    meta[key], meta[f"{key}_assumed"] = getattr(self.entry, key), False
            meta["published"] = self.entry.spec
        return ckpt

    def describe(self) -> str:
        """``bsf:NAME (FILE)`` for published files, ``hf://REPO@COMMIT/PATH (FILE)`` for other files of the Hugging
        Face cache, else the path."""
        if self.entry is not None:
            return f"{self.entry.spec} ({self.path})"
        return f"{self.source} ({self.path})" if self.source.startswith(HF_PREFIX) else self.path


def _local(path: str) -> ResolvedCheckpoint:
    layout = _cache_layout(path)
    if layout is None:
        return ResolvedCheckpoint(path, None, os.path.abspath(path))
    repo_type, repo, commit, filename = layout
    ref = HubFile(repo, filename, commit, repo_type, entry_for(repo, filename) if repo_type == "model" else None)
    return ResolvedCheckpoint(path, ref.entry, str(ref))


def resolve_checkpoint(spec, revision: Optional[str] = None, allow_unsafe_pickle: bool = False) -> ResolvedCheckpoint:
    """A local file for ``spec``: a path as it is; ``bsf:NAME`` / ``hf://...`` from the Hugging Face cache, downloaded
    (and read once) if needed. Shows the licence and citation of a published file the first time."""
    spec = os.fspath(spec)
    if not is_hub_spec(spec):
        if revision:
            raise HubError(f"A revision ({revision}) applies to {SHORT_PREFIX}NAME and {HF_PREFIX} names, not to the "
                           f"local file {spec}.")
        return _local(spec)
    ref = parse_spec(spec, revision)
    path = download(ref, allow_unsafe_pickle)
    if ref.entry is not None:
        show_notice_once(ref.entry)
    return _local(path)


# ---------------------------------------------------------------------------------------------------- download
def download(ref: HubFile, allow_unsafe_pickle: bool = False) -> str:
    """``hf_hub_download`` into the Hugging Face cache; a freshly downloaded file is read once with the loader."""
    import huggingface_hub as hf

    cached = hf.try_to_load_from_cache(ref.repo, ref.filename, revision=ref.revision, repo_type=ref.repo_type)
    try:
        path = hf.hf_hub_download(ref.repo, ref.filename, revision=ref.revision, repo_type=ref.repo_type)
        if ref.filename.endswith(".safetensors"):
            _download_safetensors_metadata(ref, path)
    except Exception as e:  # huggingface_hub's and the transport's errors, explained below
        raise _hub_error(e, ref.label, ref.page) from e
    if not isinstance(cached, str) or os.path.realpath(cached) != os.path.realpath(path):
        _verify_download(path, ref, allow_unsafe_pickle)
    return path


def _download_safetensors_metadata(ref: HubFile, path: str) -> None:
    """The metadata JSON that lies beside a ``.safetensors`` file (channels, merging, axis order; see the loader),
    from the same commit, into the same cache folder; nothing if the repository has none."""
    import huggingface_hub as hf
    from huggingface_hub.errors import EntryNotFoundError

    from .loader import SAFETENSORS_METADATA_FILE

    folder = posixpath.dirname(ref.filename)
    commit = (_cache_layout(path) or (None, None, ref.revision))[2]
    try:
        hf.hf_hub_download(ref.repo, posixpath.join(folder, SAFETENSORS_METADATA_FILE), revision=commit,
                           repo_type=ref.repo_type)
    except EntryNotFoundError:  # not in the repository, or (offline) not in the cache
        pass


def _verify_download(path: str, ref: HubFile, allow_unsafe_pickle: bool) -> None:
    """Read a fresh download with the loader; remove it from the cache if it is no checkpoint at all."""
    try:
        load_checkpoint(path, allow_unsafe_pickle)
    except CheckpointError as e:
        if zipfile.is_zipfile(path):  # a PyTorch archive the loader refuses (e.g. pickled objects): kept, explained
            raise HubError(f"{ref.label} was downloaded to {path}, but: {e}") from None
        what = _first_bytes(path)
        for p in {os.path.realpath(path), path}:  # the blob, then the snapshot link to it
            if os.path.lexists(p):
                os.remove(p)
        raise HubError(f"{ref.label} was downloaded but is no checkpoint ({what}); it was removed from the Hugging "
                       "Face cache. A proxy, login or error page served instead of the file looks like this: check "
                       "HF_ENDPOINT and the proxy settings, then pull it again.") from None


def _first_bytes(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(256)
    size = os.path.getsize(path)
    if b"<html" in head.lower() or head.lstrip().startswith(b"<!"):
        return f"an HTML page of {size} bytes"
    return f"{size} bytes starting with {head[:16]!r}"


def _login_hint(page: str, write: bool = False) -> str:
    token = "a token with write access" if write else "a token of an account that may read it"
    return (f"run `hf auth login` (or set HF_TOKEN to {token})"
            + ("" if write else f" and accept the licence on {page}"))


def _hub_error(e: Exception, what: str, page: str, upload: bool = False) -> HubError:
    """huggingface_hub's exception as a message that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.GatedRepoError):
        text = f"{what}: the repository is gated: {_login_hint(page)}"
    elif isinstance(e, hf.RevisionNotFoundError):
        text = f"{what}: no such revision (branch, tag or commit) in the repository {page}"
    elif isinstance(e, hf.RemoteEntryNotFoundError):
        text = (f"{what}: no such file in the repository at that revision; check the name on {page} "
                "(bsf-nnunet weights list shows the published files)")
    elif isinstance(e, hf.RepositoryNotFoundError):
        text = (f"{what}: repository not found, or private or gated and you are not logged in: check the name; "
                f"for a private or gated repository {_login_hint(page, upload)}")
    elif isinstance(e, hf.HfHubHTTPError) and status in (401, 403):
        text = f"{what}: access denied (HTTP {status}): {_login_hint(page, upload)}"
    elif isinstance(e, hf.LocalEntryNotFoundError) and constants.is_offline_mode():
        text = (f"{what}: HF_HUB_OFFLINE=1 and the file is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
                "pull it once with network access (bsf-nnunet weights pull NAME) or unset HF_HUB_OFFLINE")
    elif isinstance(e, hf.LocalEntryNotFoundError):
        text = (f"{what}: the Hub ({constants.ENDPOINT}) cannot be reached and the file is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}): check the network (and HTTPS_PROXY), or pull it where there is "
                "network, copy the cache folder over and set HF_HUB_OFFLINE=1")
    elif isinstance(e, hf.HfHubHTTPError):
        text = f"{what}: the Hub answered HTTP {status}; try again later"
    else:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        verb = "upload" if upload else "download"
        text = (f"{what}: the {verb} failed ({type(e).__name__}: {first}). Nothing incomplete is used: "
                "huggingface_hub writes to a temporary file and renames it only when complete. Run the command "
                "again")
    return HubError(text + ".")


# ---------------------------------------------------------------------------------------------------- notice
def _notice_marker(entry: PublishedWeights) -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "bsf-nnunet", "notices", f"{entry.repo.replace('/', '--')}--{entry.filename}")


def notice_text(entry: PublishedWeights) -> str:
    info = repo_notice(entry.repo) or {}
    return (f"{entry.spec} = {entry.repo}/{entry.filename} ({entry.description}).\n"
            f"  Licence: {info.get('licence', 'see ' + info.get('page', entry.repo))} ({info.get('licence_url', '')})\n"
            f"  Please cite: {info.get('citation', '')}")


def show_notice_once(entry: PublishedWeights, stream=None) -> bool:
    """Print the licence and citation of a published file (to stderr) unless they were shown before for it."""
    marker = _notice_marker(entry)
    if os.path.exists(marker):
        return False
    print(notice_text(entry), file=stream or sys.stderr)
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "a").close()
    except OSError:
        pass  # a read-only home: shown again next time
    return True


# ---------------------------------------------------------------------------------------------------- upload
def upload_plan(folder: str) -> List[Tuple[str, int]]:
    """(path in the repository, size in bytes) of every file ``push_folder`` would upload (huggingface_hub's own
    filter: ``.git`` and ``.cache/huggingface`` are left out). Refuses a folder without README.md or weights."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    hint = "write it with `bsf-nnunet export ... --to hub`"
    if not os.path.isdir(folder):
        raise HubError(f"{folder} is not a folder: give the folder to upload ({hint}).")
    root = Path(folder)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    names = list(filter_repo_objects(names, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    missing = []
    if "README.md" not in names:
        missing.append("README.md (the model card)")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        missing.append(f"weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    if missing:
        raise HubError(f"{folder} has no {' and no '.join(missing)}; nothing was uploaded ({hint}).")
    return [(n, (root / n).stat().st_size) for n in names]


def push_folder(folder: str, repo: str, revision: Optional[str] = None, private: bool = False) -> str:
    """Upload ``folder`` to the model repository ``repo`` (created if missing, ``private`` then) with
    ``HfApi.upload_folder``, on branch ``revision`` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    plan = upload_plan(folder)
    validate_repo_id(repo)
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                 commit_message=f"Upload {len(plan)} files with bsf-nnunet weights push")
    except Exception as e:
        raise _hub_error(e, f"{HF_PREFIX}{repo}", f"{api.endpoint}/{repo}", upload=True) from e
    return info.commit_url
