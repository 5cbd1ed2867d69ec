"""Weights: verified resumable downloads, offline mode, safe loading, the safetensors cache.

Never touches the internet: downloads come from a threaded HTTP server on 127.0.0.1 that serves
a real file, an HTML page, a truncated file, a wrong-hash file and a connection that drops
mid-file; Drive and the Hub are simulated by monkeypatching their libraries.  An autouse guard
fails any test that would reach another host.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from clipinvert.errors import WeightsError
from clipinvert.registry import PACKAGED_REGISTRY, Registry, WeightEntry
from clipinvert.weights import cache as wcache
from clipinvert.weights import download as wdl
from clipinvert.weights import safety

# 2 MiB: gdown reads 512 KiB chunks, so a drop at half-way leaves whole chunks on disk
PAYLOAD = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
HTML = b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /good.bin /page.html /short.bin /wrong.bin /flaky.bin /norange.bin /missing."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        route = self.path.split("?")[0]
        if route == "/good.bin":
            return self._send(PAYLOAD, ranges=True)
        if route == "/page.html":
            return self._send(HTML, ctype="text/html; charset=utf-8")
        if route == "/short.bin":
            return self._send(PAYLOAD[: len(PAYLOAD) // 3])
        if route == "/wrong.bin":
            return self._send(bytes(reversed(PAYLOAD)))
        if route in ("/flaky.bin", "/norange.bin"):
            drop = srv.drops.get(route, 0) > 0
            if drop:
                srv.drops[route] -= 1
            return self._send(PAYLOAD, ranges=route == "/flaky.bin", drop=drop)
        self.send_error(404, "Not Found")

    def _send(self, body: bytes, *, ctype: str = "application/octet-stream",
              ranges: bool = False, drop: bool = False) -> None:
        start = 0
        rng = self.headers.get("Range")
        if ranges and rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(part)))
        self.send_header("ETag", '"v1"')
        if ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if drop:  # announce everything, send half, then hang up
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(part)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.drops: dict[str, int] = {}

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{route}"


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


class TestNetwork:
    """Holds gdown's real download function while the guard below replaces it."""

    real_download = None


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache and config folders; no offline flags or extra registries from the caller;
    and any network access other than 127.0.0.1 fails the test."""
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("CLIPINVERT_OFFLINE", "HF_HUB_OFFLINE", "CLIPINVERT_MODELS",
                "CLIPINVERT_NO_SAFETENSORS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    import gdown

    real = TestNetwork.real_download = gdown.download

    def guarded(url=None, *args, **kwargs):
        assert url and url.startswith("http://127.0.0.1:"), f"test tried to reach {url}"
        return real(url, *args, **kwargs)

    monkeypatch.setattr(gdown, "download", guarded)
    yield


def _entry(*urls: str, file: str = "weights.bin", **kw) -> WeightEntry:
    return WeightEntry(name="tw", file=file, urls=tuple(urls), **kw)


def _home() -> Path:
    return Path(os.environ["CLIPINVERT_HOME"])


def _leftovers(dest: Path) -> list[str]:
    """Every file under ``dest`` except finished weights and checksums.json."""
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                  if p.is_file() and (p.parent != dest or p.name.startswith(".")))


# ---- downloads -----------------------------------------------------------------------------

def test_good_download_verifies_records_and_leaves_nothing_else(server):
    path = wdl.fetch(_entry(server.url("/good.bin"), size=len(PAYLOAD)), progress=False)
    assert path == _home() / "weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(_home()) == []
    assert not (_home() / ".partial").exists()
    rec = wdl.recorded_checksums()["weights.bin"]
    assert rec["sha256"] == PAYLOAD_SHA and rec["size"] == len(PAYLOAD)
    assert wdl.verify_file(path, _entry()).status == "ok"
    # present and sane: no second request
    n = len(server.requests)
    assert wdl.fetch(_entry(server.url("/good.bin")), progress=False) == path
    assert len(server.requests) == n


def test_sha256_from_registry_is_checked(server):
    path = wdl.fetch(_entry(server.url("/good.bin"), sha256=PAYLOAD_SHA), progress=True)
    assert path.read_bytes() == PAYLOAD
    assert "weights.bin" not in wdl.recorded_checksums()  # the registry already knows it


@pytest.mark.parametrize("route, kw, words", [
    ("/page.html", {}, ["HTML page", "quota or permission page"]),
    ("/short.bin", {"size": len(PAYLOAD)}, [f"expected {len(PAYLOAD)}", "truncated"]),
    ("/wrong.bin", {"sha256": PAYLOAD_SHA}, ["sha256", PAYLOAD_SHA]),
    ("/missing", {}, ["HTTP 404"]),
])
def test_bad_payloads_are_refused_and_leave_no_partial(server, route, kw, words):
    with pytest.raises(WeightsError) as info:
        wdl.fetch(_entry(server.url(route), **kw), progress=False, retries=0)
    msg = str(info.value)
    assert "\n" not in msg and server.url(route) in msg
    for w in words:
        assert w in msg
    assert not (_home() / "weights.bin").exists()
    assert _leftovers(_home()) == []
    assert not (_home() / ".partial").exists()


def test_recorded_checksum_guards_later_downloads(server):
    wdl.fetch(_entry(server.url("/good.bin")), progress=False)
    (_home() / "weights.bin").unlink()
    with pytest.raises(WeightsError, match="recorded at first download"):
        wdl.fetch(_entry(server.url("/wrong.bin")), progress=False)
    assert _leftovers(_home()) == []


def test_urls_are_tried_in_turn_with_every_reason_listed(server):
    path = wdl.fetch(_entry(server.url("/page.html"), server.url("/good.bin")), progress=False)
    assert path.read_bytes() == PAYLOAD
    with pytest.raises(WeightsError) as info:
        wdl.fetch(_entry(server.url("/page.html"), server.url("/missing"), file="other.bin"),
                  progress=False, retries=0)
    assert "/page.html: the download is an HTML page" in str(info.value)
    assert f"HTTP 404 at {server.url('/missing')}" in str(info.value)
    got = wdl.fetch(_entry("ftp://example.invalid/w.bin", server.url("/good.bin"), file="3.bin"),
                    progress=False)
    assert got.read_bytes() == PAYLOAD


def test_dropped_connection_resumes_within_the_call(server):
    server.drops["/flaky.bin"] = 1
    server.requests.clear()
    path = wdl.fetch(_entry(server.url("/flaky.bin"), sha256=PAYLOAD_SHA), progress=False,
                     retries=1)
    assert path.read_bytes() == PAYLOAD
    assert (("/flaky.bin", f"bytes={len(PAYLOAD) // 2}-") in server.requests)
    assert _leftovers(_home()) == []


def test_interrupted_download_keeps_a_temporary_part_and_resumes_next_time(server):
    entry = _entry(server.url("/flaky.bin"), size=len(PAYLOAD))
    server.drops["/flaky.bin"] = 1
    with pytest.raises(WeightsError) as info:
        wdl.fetch(entry, progress=False, retries=0)
    assert "connection dropped" in str(info.value) and "resume" in str(info.value)
    assert not (_home() / "weights.bin").exists()
    left = _leftovers(_home())
    # The only leftover is gdown's <file>XXXXXXXX.part inside .partial/<url hash>/.
    assert len(left) == 1 and left[0].startswith(".partial/") and left[0].endswith(".part")
    assert (_home() / left[0]).stat().st_size == len(PAYLOAD) // 2
    server.requests.clear()
    path = wdl.fetch(entry, progress=False, retries=0)
    assert path.read_bytes() == PAYLOAD
    assert ("/flaky.bin", f"bytes={len(PAYLOAD) // 2}-") in server.requests
    assert _leftovers(_home()) == [] and not (_home() / ".partial").exists()


def test_server_without_range_support_restarts_from_scratch(server):
    entry = _entry(server.url("/norange.bin"), sha256=PAYLOAD_SHA)
    server.drops["/norange.bin"] = 1
    with pytest.raises(WeightsError):
        wdl.fetch(entry, progress=False, retries=0)
    assert wdl.fetch(entry, progress=False, retries=0).read_bytes() == PAYLOAD
    assert _leftovers(_home()) == []


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _one_line_failure(url: str, **kw) -> str:
    with pytest.raises(WeightsError) as info:
        wdl.fetch(_entry(url), progress=False, retries=0, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    # never a urllib3/requests repr, always where a copy fetched by hand goes
    for noise in ("HTTPConnectionPool", "Max retries", "Errno", "NewConnectionError", "..."):
        assert noise not in msg, msg
    assert f"put it at {_home() / 'weights.bin'}" in msg
    assert 'path = "/path/to/weights.bin" in a [weights.tw] table of' in msg
    return msg


def test_refused_connection_is_reported_and_leaves_nothing():
    port = _closed_port()
    msg = _one_line_failure(f"http://127.0.0.1:{port}/x.bin")
    assert msg.startswith(f"could not download tw weights (weights.bin): connection refused by "
                          f"127.0.0.1:{port}; or download http://127.0.0.1:{port}/x.bin another "
                          "way (a browser) and put it at "), msg
    assert not (_home() / ".partial").exists()


def test_unresolvable_host_says_no_network(monkeypatch):
    import gdown

    monkeypatch.setattr(gdown, "download", TestNetwork.real_download)
    msg = _one_line_failure("http://nonexistent.invalid/x.pt")
    assert msg.startswith("could not download tw weights (weights.bin): no network: could not "
                          "resolve nonexistent.invalid; "), msg


def test_http_error_names_status_and_url(server):
    msg = _one_line_failure(server.url("/missing"))
    assert msg.startswith("could not download tw weights (weights.bin): HTTP 404 at "
                          f"{server.url('/missing')}; "), msg


def test_silent_server_times_out_in_plain_words():
    with socket.socket() as listener:  # accepts (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        msg = _one_line_failure(f"http://127.0.0.1:{port}/x.bin", timeout=(5.0, 0.5))
    assert msg.startswith("could not download tw weights (weights.bin): timed out after 0.5 s "
                          f"waiting for 127.0.0.1:{port}; "), msg


def test_broken_cached_file_is_replaced(server):
    (_home()).mkdir(parents=True)
    (_home() / "weights.bin").write_bytes(HTML)
    path = wdl.fetch(_entry(server.url("/good.bin")), progress=False)
    assert path.read_bytes() == PAYLOAD


def test_dest_dir_is_honoured(server, tmp_path):
    path = wdl.fetch(_entry(server.url("/good.bin")), tmp_path / "elsewhere", progress=False)
    assert path == tmp_path / "elsewhere" / "weights.bin"
    assert json.loads((tmp_path / "elsewhere" / "checksums.json").read_text())["files"]


# ---- offline and search order -------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "CLIPINVERT_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_never_touches_the_network(server, monkeypatch, how):
    if how != "flag":
        monkeypatch.setenv(how, "1")
    server.requests.clear()
    entry = _entry(server.url("/good.bin"))
    with pytest.raises(WeightsError) as info:
        wdl.fetch(entry, offline=True if how == "flag" else None, progress=False)
    msg = str(info.value)
    assert server.requests == []
    assert "offline" in msg and server.url("/good.bin") in msg
    assert "clipinvert models download tw" in msg and str(_home() / "weights.bin") in msg
    with pytest.raises(WeightsError):
        wdl.find_or_fetch(entry, download=True, offline=True if how == "flag" else None)
    assert server.requests == []


def test_is_offline_values(monkeypatch):
    assert not wdl.is_offline()
    assert wdl.is_offline(True)
    monkeypatch.setenv("CLIPINVERT_OFFLINE", "0")
    assert not wdl.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert wdl.is_offline()


def test_find_or_fetch_order_and_consent(server, tmp_path):
    reg_file = tmp_path / "reg" / "models.toml"
    reg_file.parent.mkdir()
    explicit = tmp_path / "reg" / "mine.bin"
    entry = WeightEntry(name="tw", file="weights.bin", urls=(server.url("/good.bin"),),
                        path="mine.bin", source=reg_file)
    server.requests.clear()
    with pytest.raises(WeightsError) as info:
        wdl.find_or_fetch(entry)  # no consent: never downloads
    assert str(explicit) in str(info.value) and str(_home() / "weights.bin") in str(info.value)
    assert "--download" in str(info.value) and server.requests == []
    got = wdl.find_or_fetch(entry, download=True, progress=False)
    assert got == _home() / "weights.bin"
    explicit.write_bytes(b"PKmine")
    assert wdl.find_or_fetch(entry) == explicit  # the explicit path wins over the cache


def test_backend_classification_uses_gdown_for_drive():
    reg = Registry.load(user=False)
    drive = [u for e in reg.weights.values() for u in e.urls if "drive.google.com" in u]
    assert drive and all(wdl.backend_for(u) == "gdrive" for u in drive)
    assert wdl.backend_for("https://docs.google.com/uc?id=x") == "gdrive"
    assert wdl.backend_for("https://openaipublic.azureedge.net/clip/x.pt") == "http"
    assert wdl.backend_for("hf://org/repo@main/a/b.pt") == "hf"
    assert wdl.backend_for("file:///tmp/x") == "file"
    with pytest.raises(WeightsError, match="unsupported URL"):
        wdl.backend_for("ftp://host/x")
    assert PACKAGED_REGISTRY.is_file()


def test_drive_download_goes_through_gdown(monkeypatch):
    import gdown

    calls = []

    def fake(url, output, **kw):
        calls.append((url, kw))
        Path(output).write_bytes(PAYLOAD)
        return output

    monkeypatch.setattr(gdown, "download", fake)
    url = "https://drive.google.com/uc?id=18goTnPtVrz1Tuen3JuDIEwj5z3GvgVqJ"
    path = wdl.fetch(_entry(url), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert calls[0][0] == url and calls[0][1]["resume"] and calls[0][1]["use_cookies"]

    def quota(url, output, **kw):
        raise gdown.exceptions.FileURLRetrievalError("Too many users have viewed or downloaded")

    monkeypatch.setattr(gdown, "download", quota)
    with pytest.raises(WeightsError, match="quota exceeded or no public access"):
        wdl.fetch(_entry(url, file="other.bin"), progress=False)
    assert _leftovers(_home()) == []


def test_hf_and_file_urls(monkeypatch, tmp_path):
    import huggingface_hub

    def fake(repo_id, filename, *, revision=None, local_dir=None, **kw):
        assert (repo_id, filename, revision) == ("org/repo", "sub/w.pt", "v1")
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(PAYLOAD)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    assert wdl.fetch(_entry("hf://org/repo@v1/sub/w.pt")).read_bytes() == PAYLOAD
    src = tmp_path / "mirror.bin"
    src.write_bytes(PAYLOAD)
    got = wdl.fetch(_entry(src.as_uri(), file="copy.bin", sha256=PAYLOAD_SHA))
    assert got.read_bytes() == PAYLOAD
    assert _leftovers(_home()) == []


# ---- safe loading -------------------------------------------------------------------------

class _OpensAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _Execs:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("evil", [_OpensAFile, _Execs])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, evil, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": evil(marker)}, ckpt)
    with pytest.raises(WeightsError) as info:
        safety.load_checkpoint(ckpt, what="e4e")
    msg = str(info.value)
    assert "not plain weights" in msg and "refused" in msg and "--trust-checkpoint" in msg
    assert ("open" in msg) if evil is _OpensAFile else ("exec" in msg)
    assert str(ckpt) in msg and "\n" not in msg
    assert not marker.exists()
    # The cache path refuses it just the same, and writes nothing.
    with pytest.raises(WeightsError, match="not plain weights"):
        wcache.cached_state(ckpt, min_bytes=0)
    assert not marker.exists()
    # The user vouches for it: it loads (and, being a real pickle, runs).
    obj = safety.load_checkpoint(ckpt, trust=True)
    if hasattr(obj["x"], "close"):
        obj["x"].close()
    assert marker.exists()
    assert "--trust-checkpoint" in capsys.readouterr().err


def test_allow_listed_namespace_and_broken_files(tmp_path):
    ckpt = tmp_path / "train.pt"
    torch.save({"g_ema": {"w": torch.ones(3)}, "args": argparse.Namespace(size=256)}, ckpt)
    obj = safety.load_checkpoint(ckpt)
    assert obj["args"].size == 256
    (tmp_path / "page.pt").write_bytes(b"\n  " + HTML)
    with pytest.raises(WeightsError, match="HTML page"):
        safety.load_checkpoint(tmp_path / "page.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        safety.load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated"):
        safety.load_checkpoint(tmp_path / "cut.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a dict"):
        safety.load_checkpoint(tmp_path / "list.pt")


# ---- safetensors cache --------------------------------------------------------------------

def _nested() -> dict:
    g = {"conv.weight": torch.randn(4, 3), "conv.bias": torch.randn(4)}
    big = torch.arange(10.0)
    return {
        "state_dict": {"encoder.a": torch.randn(2, 2), "decoder.b": torch.randn(3).half(),
                       "encoder.count": torch.tensor(7)},
        "latent_avg": torch.randn(18, 8),
        "opts": {"stylegan_size": 1024, "lr": 1e-4, "name": "e4e", "flag": None,
                 "layers": [1, 2, 3], "pair": (1, "a"), "start_from_latent_avg": True},
        "g": g, "g_ema": g,  # one object twice, as rosinality training checkpoints do
        "view_a": big[:5], "view_b": big[5:],  # distinct tensors sharing one storage
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "args": argparse.Namespace(size=256, channel_multiplier=2),
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, argparse.Namespace):
        return isinstance(b, argparse.Namespace) and _same(vars(a), vars(b))
    return a == b


def test_cache_round_trips_nested_checkpoints_without_pickle(tmp_path, monkeypatch):
    src = tmp_path / "ckpt.pt"
    original = _nested()
    torch.save(original, src)
    first = wcache.cached_state(src, min_bytes=0)
    assert _same(first, original)
    copy = wcache.cached_path(src)
    assert copy is not None and copy.suffix == ".safetensors"
    assert copy.stem == hashlib.sha256(src.read_bytes()).hexdigest()

    def no_pickle(*a, **k):
        raise AssertionError("unpickled although a safetensors copy exists")

    monkeypatch.setattr(torch, "load", no_pickle)
    again = wcache.cached_state(src, min_bytes=0)
    assert _same(again, original)
    assert again["g"]["conv.weight"] is again["g_ema"]["conv.weight"]  # stored once
    # Touching the file changes the fast key; the content hash finds the same copy.
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert _same(wcache.cached_state(src, min_bytes=0), original)
    monkeypatch.undo()
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "home"))
    # Changed content: converted again, never served stale.
    changed = {"state_dict": {"w": torch.ones(3)}}
    torch.save(changed, src)
    assert _same(wcache.cached_state(src, min_bytes=0), changed)
    assert wcache.clear_cache() > 0
    assert not wcache.cache_root().exists()


def test_cache_falls_back_when_it_cannot_help(tmp_path, monkeypatch):
    src = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2), "dtype": torch.float16}, src)  # a dtype: not storable
    assert wcache.cached_state(src, min_bytes=0)["dtype"] == torch.float16
    assert wcache.cached_path(src) is None
    small = tmp_path / "small.pt"
    torch.save({"w": torch.ones(2)}, small)
    wcache.cached_state(small)  # below MIN_BYTES: not converted
    assert wcache.cached_path(small) is None
    monkeypatch.setenv("CLIPINVERT_NO_SAFETENSORS_CACHE", "1")
    wcache.cached_state(small, min_bytes=0)
    assert wcache.cached_path(small) is None
    monkeypatch.delenv("CLIPINVERT_NO_SAFETENSORS_CACHE")
    wcache.cached_state(small, min_bytes=0, trust=True)  # trusted loads are never converted
    assert wcache.cached_path(small) is None
    wcache.cached_state(small, min_bytes=0)
    copy = wcache.cached_path(small)
    assert copy is not None
    copy.write_bytes(b"garbage")  # a damaged copy is replaced, not an error
    assert torch.equal(wcache.cached_state(small, min_bytes=0)["w"], torch.ones(2))
    assert torch.equal(wcache.load_tree(wcache.cached_path(small))["w"], torch.ones(2))


def test_cached_copy_is_aligned_and_computes_the_same_bits(tmp_path: Path) -> None:
    """The safetensors copy packs tensors at arbitrary offsets; what it hands out starts on a
    64-byte boundary like a fresh tensor, so a layer gives the same bits from either file (an
    unaligned weight once made a resumed training run part from its uninterrupted twin)."""
    torch.manual_seed(0)
    state = {"odd": torch.randn(3), "w": torch.randn(64, 64, 3, 3), "b": torch.randn(7)}
    target = tmp_path / "copy.safetensors"
    wcache.save_tree(state, target)
    loaded = wcache.load_tree(target)
    assert all(t.data_ptr() % wcache.ALIGNMENT == 0 for t in loaded.values())
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.randn(2, 64, 16, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.nn.functional.conv2d(x, loaded["w"]),
                           torch.nn.functional.conv2d(x, state["w"]))
    finally:
        torch.set_num_threads(threads)
