"""Finding weight files, and downloading them — only with the user's consent.

Search order for a ``[weights.NAME]`` entry (what :func:`find_or_fetch` does):

1. its explicit ``path`` (relative to the models.toml that names it), if any;
2. the cache, ``$CLIPINVERT_HOME`` or the XDG cache folder (``~/.cache/clipinvert``);
3. with consent (``clipinvert models download`` or ``--download``) and not offline, the entry's
   ``urls`` in turn (:func:`fetch`).

Why the download path looks the way it does:

* **No hand-written HTTP client.**  Every ``http(s)`` URL — Google Drive or not — goes through
  `gdown <https://github.com/wkentaro/gdown>`_: for Drive it answers the virus-scan/confirm page,
  and for any URL it resumes (``Range`` + ``If-Range``, checking the server's ``Content-Range``),
  retries dropped connections and reports progress through a callback, which we draw with rich.
  ``hf://OWNER/REPO[@REV]/PATH`` goes through ``huggingface_hub`` (its own resume, auth and
  ``HF_HUB_OFFLINE``); ``file://`` is a plain copy (air-gapped mirrors).
* **Nothing unverified ever gets the final name.**  A download is written under
  ``<dest>/.partial/<hash of the URL>/`` (gdown's own ``<file>XXXXXXXX.part`` while bytes flow,
  then ``<file>``), then checked — not an HTML page (Drive's quota/permission pages come back with
  status 200), the registry ``size``, the ``sha256`` from the registry or the one recorded at the
  first verified download — and only then ``os.replace``\\ d to ``<dest>/<file>``.  A payload that
  fails a check is deleted with its folder.  A *dropped connection* keeps its bytes under
  ``.partial/`` (a clearly temporary folder, never searched for weights) so that running the same
  command again resumes; the folder is per URL, so bytes from one mirror are never spliced onto
  another's.
* **Trust on first use.**  The published files have no known checksums
  (docs/checkpoints.md#sources), so the sha256 of the first verified download is recorded in
  ``<dest>/checksums.json``; later downloads and ``clipinvert models verify`` compare against it.
* **Offline mode** (``--offline``, ``CLIPINVERT_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) never touches
  the network: a missing file is one exit-3 line naming where we looked and what gets the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import WeightsError, first_line
from ..fileio import atomic_write, atomic_write_json
from ..locations import cache_dir, is_offline
from .sniff import file_looks_like_html

if TYPE_CHECKING:  # the registry imports this module; entries are only passed in
    from ..registry import WeightEntry

Backend = Literal["gdrive", "http", "hf", "file"]
PARTIAL_DIR = ".partial"
CHECKSUMS_FILE = "checksums.json"
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = (15.0, 60.0)  # seconds: connect, and between bytes


# ---- where to look ----------------------------------------------------------------------------

def places_for(entry: WeightEntry) -> list[Path]:
    """Where an entry's file may be, in search order."""
    return entry.places()


def find_file(entry: WeightEntry) -> Path | None:
    return next((p for p in places_for(entry) if p.is_file()), None)


def made_by(entry: WeightEntry) -> str | None:
    """The command that makes an unpublished file, ``{path}`` replaced by where it goes."""
    if not entry.made_by:
        return None
    return entry.made_by.replace("{path}", str(places_for(entry)[-1]))


def by_hand(entry: WeightEntry, target: Path | None = None) -> str:
    """Where a copy got some other way goes: the exact file in the cache (``target``), or a
    ``path =`` naming it in a models.toml — the two places the search order looks."""
    from ..registry import user_registry  # the registry imports this module

    target = target if target is not None else cache_dir() / entry.file
    return (f"put it at {target}, or name your copy with path = \"/path/to/{entry.file}\" in a "
            f"[weights.{entry.name}] table of {user_registry()} (or of a --models FILE)")


def how_to_get(entry: WeightEntry, *, offline: bool = False, offer_download: bool = True) -> str:
    """The command, URL and places that get an entry's file, for error messages.

    ``offer_download``: the command at hand has ``--download`` and it was not passed (never
    advise it to someone who did, or to a command without it).
    """
    if not entry.urls:
        made = made_by(entry)
        how = f"make it with `{made}`" if made else \
            (entry.description or "no download is published for it")
        return f"{how}; {by_hand(entry)}"
    manual = f"or download {entry.urls[0]} yourself and {by_hand(entry)}"
    if offline:
        return (f"offline mode is on (--offline, CLIPINVERT_OFFLINE or HF_HUB_OFFLINE): run "
                f"`clipinvert models download {entry.name}` with network access, {manual}")
    flag = " (or pass --download)" if offer_download else ""
    return f"run `clipinvert models download {entry.name}`{flag}, {manual}"


def missing_message(entry: WeightEntry, places: list[Path] | None = None, *,
                    offline: bool = False, offer_download: bool = True) -> str:
    places = places_for(entry) if places is None else places
    looked = ", ".join(str(p) for p in places)
    return (f"{entry.name} weights ({entry.file}) not found; looked in {looked}; "
            f"{how_to_get(entry, offline=offline, offer_download=offer_download)}")


def find_or_fetch(entry: WeightEntry, *, download: bool | None = False,
                  offline: bool | None = None, progress: bool = True) -> Path:
    """Explicit path → cache → (if ``download`` and not offline) the entry's URLs.

    This is what a loader calls: without consent it never downloads, and a missing file is a
    :class:`WeightsError` (exit 3) listing the places looked and the command/URL that gets it.
    ``download=None``: the command has no ``--download`` (so the message does not offer it).
    """
    places = places_for(entry)
    for p in places:
        if p.is_file():
            return p
    off = is_offline(offline)
    if download and not off and entry.urls:
        return fetch(entry, offline=False, progress=progress)
    raise WeightsError(missing_message(entry, places, offline=off,
                                       offer_download=download is False))


# ---- checksums ----------------------------------------------------------------------------------

def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_checksums(dest_dir: Path | None = None) -> dict[str, dict]:
    """``{file: {"sha256", "size", "url", "name", "recorded"}}`` from ``<dest>/checksums.json``."""
    data = _read_json((dest_dir or cache_dir()) / CHECKSUMS_FILE)
    files = data.get("files", {})
    return files if isinstance(files, dict) else {}


def record_checksum(dest_dir: Path, file: str, *, sha256: str, size: int, url: str | None,
                    name: str | None) -> None:
    """Remember a first verified download's sha256 (the published files have none)."""
    path = dest_dir / CHECKSUMS_FILE
    data = _read_json(path)
    files = data.setdefault("files", {})
    files[file] = {"sha256": sha256, "size": size, "url": url, "name": name,
                   "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data["version"] = 1
    atomic_write_json(path, data)


def expected_sha256(entry: WeightEntry, dest_dir: Path | None = None
                    ) -> tuple[str | None, str]:
    """The sha256 a file must have and where that comes from ("registry" / "recorded").

    For a converted entry the registry's sha256 is the published source's (checked at
    download, :func:`_check_payload`); the file on disk is the conversion, whose checksum is
    the one recorded.
    """
    if entry.sha256 and not entry.convert:
        return entry.sha256.lower(), f"registry {entry.source}"
    rec = recorded_checksums(dest_dir).get(entry.file, {})
    sha = rec.get("sha256") if isinstance(rec, dict) else None
    if sha:
        return str(sha).lower(), f"recorded at first download in {(dest_dir or cache_dir())}" \
                                 f"/{CHECKSUMS_FILE}"
    return None, ""


@dataclass(frozen=True)
class Verification:
    """The outcome of checking one file: ``ok``, ``unverified`` (no checksum known), ``bad``."""

    status: Literal["ok", "unverified", "bad"]
    detail: str
    sha256: str | None = None
    size: int | None = None


def payload_problem(path: Path, entry: WeightEntry, *, source: bool = False) -> str | None:
    """Cheap checks (no hashing): empty, an HTML page, or the wrong size.

    ``source``: ``path`` is what was downloaded, before any conversion (a converted entry's
    registry ``size`` is the published file's, not the conversion's).
    """
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if file_looks_like_html(path):
        return "is an HTML page (quota or permission page), not the weights"
    if entry.size is not None and (source or not entry.convert) and size != int(entry.size):
        return f"is {size} bytes, expected {int(entry.size)} (truncated or a different file)"
    return None


def verify_file(path: Path, entry: WeightEntry, dest_dir: Path | None = None) -> Verification:
    """Size, HTML sniff and sha256 (registry's, else the one recorded in ``dest_dir``)."""
    path = Path(path)
    if dest_dir is None:
        in_cache = path.resolve() == (cache_dir() / entry.file).resolve()
        dest_dir = cache_dir() if in_cache else path.parent
    size = path.stat().st_size
    problem = payload_problem(path, entry)
    if problem:
        return Verification("bad", f"{path} {problem}", None, size)
    digest = sha256_file(path)
    want, origin = expected_sha256(entry, dest_dir)
    if want is None:
        return Verification("unverified", "no checksum known", digest, size)
    if digest != want:
        return Verification("bad", f"{path} has sha256 {digest}, expected {want} ({origin})",
                            digest, size)
    return Verification("ok", f"sha256 matches ({origin.split(' ', 1)[0]})", digest, size)


# ---- downloading --------------------------------------------------------------------------------

def backend_for(url: str) -> Backend:
    """Which library fetches a URL: gdown (Drive and plain http(s)), huggingface_hub, a copy."""
    parts = urllib.parse.urlparse(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme == "hf":
        return "hf"
    if scheme == "file":
        return "file"
    if scheme in ("http", "https"):
        return "gdrive" if host in ("drive.google.com", "docs.google.com") else "http"
    raise WeightsError(f"unsupported URL scheme in {url!r} (use http(s)://, hf:// or file://)")


def partial_dir(dest_dir: Path, url: str) -> Path:
    """Per-URL temporary folder for an unfinished download (never searched for weights)."""
    return dest_dir / PARTIAL_DIR / hashlib.sha1(url.encode()).hexdigest()[:16]


class _Interrupted(Exception):
    """The transfer stopped part-way; its bytes are kept for resuming."""


class _BadPayload(Exception):
    """The bytes arrived but are not the file (HTML page, wrong size, wrong hash)."""


class _Failed(Exception):
    """The URL did not give the file (HTTP error, refused connection, Drive page)."""


@contextlib.contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Callable[[int, int | None], None] | None]:
    """A rich download bar on stderr, fed by ``callback(bytes_so_far, total)``."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it was raised from (gdown → requests → urllib3 → socket)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def network_reason(exc: BaseException, url: str,
                   timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> str:
    """A failed transfer in plain words, naming the host or URL.

    requests and urllib3 nest the real cause (a DNS failure, a refused connection) three
    exceptions deep inside a ``HTTPConnectionPool(...)`` repr that a one-line message would
    truncate; the user needs the cause itself to know whether to check the network, the proxy
    or the URL.
    """
    import requests
    import urllib3

    parts = urllib.parse.urlparse(url)
    host = (parts.hostname or url) + (f":{parts.port}" if parts.port else "")
    chain = _causes(exc)

    def has(*types: type[BaseException]) -> bool:
        return any(isinstance(c, types) for c in chain)

    for c in chain:
        if isinstance(c, requests.HTTPError) and c.response is not None:
            return f"HTTP {c.response.status_code} at {url}"
    if has(socket.gaierror, urllib3.exceptions.NameResolutionError):
        return f"no network: could not resolve {parts.hostname or url}"
    if has(ConnectionRefusedError):
        return f"connection refused by {host}"
    if has(requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError):
        return f"timed out after {timeout[0]:g} s connecting to {host}"
    if has(requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
        return f"timed out after {timeout[1]:g} s waiting for {host}"
    if has(requests.exceptions.SSLError, urllib3.exceptions.SSLError):
        return f"secure connection to {host} failed (TLS certificate or proxy problem)"
    if has(requests.exceptions.ProxyError, urllib3.exceptions.ProxyError):
        return f"the proxy refused the connection to {host} (check HTTPS_PROXY)"
    if has(ConnectionError, requests.exceptions.ChunkedEncodingError,
           urllib3.exceptions.ProtocolError) or "incomplete" in str(exc).lower():
        return f"connection dropped part-way by {host}"
    return f"{url}: {first_line(chain[-1])}"


def _gdown(url: str, out: Path, *, backend: Backend, progress: bool, label: str,
           retries: int, timeout: tuple[float, float]) -> Path:
    import gdown
    import requests

    try:
        with _progress(progress, label) as cb:
            gdown.download(url, str(out), quiet=True, resume=True, progress=cb,
                           use_cookies=backend == "gdrive", retries=retries, timeout=timeout)
    except gdown.exceptions.FileURLRetrievalError as exc:
        raise _Failed(f"{url}: Google Drive answered with an HTML page instead of the file "
                      "(quota exceeded or no public access); try again later or download it "
                      "in a browser") from exc
    except gdown.exceptions.DownloadError as exc:
        text = str(exc)
        if "did not honor the requested byte range" in text:
            raise _Failed("RANGE") from exc
        if isinstance(exc.__cause__, requests.RequestException) or "incomplete" in text.lower():
            raise _Interrupted(network_reason(exc, url, timeout)) from exc
        raise _Failed(f"{url}: {first_line(exc)}") from exc
    except requests.HTTPError as exc:
        raise _Failed(network_reason(exc, url, timeout)) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Interrupted(network_reason(exc, url, timeout)) from exc
    except requests.RequestException as exc:
        raise _Failed(network_reason(exc, url, timeout)) from exc
    return out


def _hf(url: str, work: Path) -> Path:
    """``hf://OWNER/REPO[@REVISION]/PATH/IN/REPO`` through huggingface_hub."""
    from huggingface_hub import hf_hub_download

    rest = url[len("hf://"):]
    parts = rest.split("/")
    if len(parts) < 3:
        raise _Failed(f"{url}: an hf:// URL must be hf://OWNER/REPO[@REVISION]/PATH")
    repo, _, revision = parts[1].partition("@")
    try:
        got = hf_hub_download(f"{parts[0]}/{repo}", "/".join(parts[2:]),
                              revision=revision or None, local_dir=work)
    except Exception as exc:  # hub errors are many types; the first line says which
        raise _Failed(f"{url}: {first_line(exc)}") from exc
    return Path(str(got))


def _copy(url: str, out: Path) -> Path:
    src = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not src.is_file():
        raise _Failed(f"no such file: {src}")
    atomic_write(out, lambda tmp: shutil.copyfile(src, tmp))
    return out


def _download_one(url: str, work: Path, entry: WeightEntry, *, progress: bool, retries: int,
                  timeout: tuple[float, float]) -> Path:
    try:
        backend = backend_for(url)
    except WeightsError as exc:  # one bad URL must not stop the others being tried
        raise _Failed(str(exc)) from None
    out = work / entry.file
    out.parent.mkdir(parents=True, exist_ok=True)
    label = f"{entry.name} ({entry.file})"
    if backend == "hf":
        return _hf(url, work)
    if backend == "file":
        return _copy(url, out)
    try:
        return _gdown(url, out, backend=backend, progress=progress, label=label,
                      retries=retries, timeout=timeout)
    except _Failed as exc:
        if str(exc) != "RANGE":
            raise
    # The server ignored our Range request (or the remote file changed): start over, once.
    shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _gdown(url, out, backend=backend, progress=progress, label=label,
                      retries=retries, timeout=timeout)
    except _Failed as exc:
        if str(exc) == "RANGE":
            raise _Failed(f"{url}: the server does not support resuming (Range)") from exc
        raise


def _check_payload(path: Path, entry: WeightEntry, dest_dir: Path) -> str:
    """Raise :class:`_BadPayload` unless ``path`` is the file; return its sha256."""
    problem = payload_problem(path, entry, source=True)
    if problem:
        raise _BadPayload(problem)
    digest = sha256_file(path)
    if entry.convert:  # the published source: only the registry knows its checksum
        want = entry.sha256.lower() if entry.sha256 else None
        origin = f"registry {entry.source}"
    else:
        want, origin = expected_sha256(entry, dest_dir)
    if want and digest != want:
        raise _BadPayload(f"has sha256 {digest}, expected {want} ({origin})")
    return digest


def _convert(staged: Path, entry: WeightEntry) -> Path:
    """The converted file beside the downloaded one (``convert = "nvlabs"``: an NVlabs network
    pickle → a rosinality .pt, as ``clipinvert models import`` writes it).  A source that cannot
    be converted is a bad payload, deleted like any other."""
    from .convert import import_generator, save_imported

    try:
        imported = import_generator(staged)
    except WeightsError as exc:
        raise _BadPayload(f"cannot be converted: {exc}") from None
    out = staged.with_name(f"converted-{entry.file}")
    save_imported(imported, out)
    staged.unlink()
    return out


def _has_bytes(work: Path) -> bool:
    return work.is_dir() and any(p.is_file() and p.stat().st_size for p in work.rglob("*"))


def _prune_partials(dest_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (dest_dir / PARTIAL_DIR).rmdir()  # only when empty


def fetch(entry: WeightEntry, dest_dir: Path | None = None, *, offline: bool | None = None,
          progress: bool = True, force: bool = False, retries: int | None = None,
          timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> Path:
    """Make sure ``<dest_dir>/<entry.file>`` exists and is the right file; return its path.

    ``dest_dir`` defaults to the cache.  A file already there is kept unless it is obviously
    broken (empty, an HTML page, wrong size) or ``force``.  Otherwise each of the entry's URLs
    is tried in turn (see the module docstring for the checks and where partial bytes live);
    when all fail, one :class:`WeightsError` lists every URL with its reason.  ``retries`` is
    how many times a dropped connection is resumed within this call (default
    :data:`DEFAULT_RETRIES`, read at call time).
    """
    retries = DEFAULT_RETRIES if retries is None else retries
    dest = Path(dest_dir) if dest_dir is not None else cache_dir()
    final = dest / entry.file
    off = is_offline(offline)
    if final.is_file() and not force:
        problem = payload_problem(final, entry)
        if problem is None:
            return final
        if off:
            raise WeightsError(f"{final} {problem}; {how_to_get(entry, offline=True)}")
    elif off:
        raise WeightsError(missing_message(entry, [final], offline=True))
    if not entry.urls:
        raise WeightsError(f"{entry.name} weights ({entry.file}) have no download: "
                           f"{how_to_get(entry)}")
    reasons: list[str] = []
    kept: list[Path] = []
    for url in entry.urls:
        work = partial_dir(dest, url)
        try:
            staged = _download_one(url, work, entry, progress=progress, retries=retries,
                                   timeout=timeout)
            digest = _check_payload(staged, entry, dest)
            if entry.convert:
                staged = _convert(staged, entry)
                digest = sha256_file(staged)
        except _Interrupted as exc:
            reasons.append(str(exc))
            if _has_bytes(work):
                kept.append(work)
            else:
                shutil.rmtree(work, ignore_errors=True)
            continue
        except (_BadPayload, _Failed) as exc:
            shutil.rmtree(work, ignore_errors=True)
            reasons.append(f"{url}: the download {exc}" if isinstance(exc, _BadPayload)
                           else str(exc))
            continue
        except OSError as exc:  # disk full, permissions: nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
            reasons.append(f"{url}: {exc}")
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        size = staged.stat().st_size
        os.replace(staged, final)
        shutil.rmtree(work, ignore_errors=True)
        _prune_partials(dest)
        if (not entry.sha256 or entry.convert) and entry.file not in recorded_checksums(dest):
            record_checksum(dest, entry.file, sha256=digest, size=size, url=url, name=entry.name)
        return final
    _prune_partials(dest)
    tail = ""
    if kept:
        tail = (f"; the bytes received so far are kept in {kept[0]} — run the same command "
                "again to resume")
    raise WeightsError(f"could not download {entry.name} weights ({entry.file}): "
                       + "; ".join(reasons) + tail + f"; or download {entry.urls[0]} another "
                       f"way (a browser) and {by_hand(entry, final)}")
