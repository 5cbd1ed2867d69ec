"""``clipinvert models list/download/verify/path`` through Typer's CliRunner, offline.

The sub-app is mounted on a tiny app the way ``clipinvert.cli`` mounts it, and our errors are
mapped to exit codes the way ``clipinvert.cli.main`` does.  Downloads come from ``file://`` URLs
and a static HTTP server on 127.0.0.1; an autouse guard fails a test that reaches anything else.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clipinvert.cli_models import models_app
from clipinvert.errors import ClipInvertError
from clipinvert.registry import cache_dir

PAYLOAD = b"PK\x03\x04" + bytes(range(256)) * 64
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()

app = typer.Typer()
app.add_typer(models_app, name="models")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("CLIPINVERT_OFFLINE", "HF_HUB_OFFLINE", "CLIPINVERT_MODELS"):
        monkeypatch.delenv(var, raising=False)
    import gdown
    import huggingface_hub

    real = gdown.download

    def guarded(url=None, *args, **kwargs):
        assert url and url.startswith("http://127.0.0.1:"), f"test tried to reach {url}"
        return real(url, *args, **kwargs)

    def no_hub(*args, **kwargs):
        raise AssertionError("test tried to reach the Hugging Face Hub")

    monkeypatch.setattr(gdown, "download", guarded)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)


def run(*args: str) -> tuple[int, str, str]:
    """Invoke like ``clipinvert.cli.main``: our errors become their exit codes."""
    result = CliRunner().invoke(app, list(args))
    exc = result.exception
    if isinstance(exc, ClipInvertError):
        return exc.exit_code, result.stdout, str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def registry(tmp_path) -> Path:
    """A --models file: a downloadable entry, a domain using it and a path with no download."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tiny.pt").write_bytes(PAYLOAD)
    (mirror / "page.pt").write_bytes(b"<!DOCTYPE html><html>quota</html>")
    toml = tmp_path / "reg" / "models.toml"
    toml.parent.mkdir()
    toml.write_text(f"""
[domains.tiny]
resolution = 32
align = "none"
clip = "tiny-clip"
e4e = "tiny-e4e"
clipinverter = "trained/clipinverter.pt"
note = "no released weights: train them"

[weights.tiny-e4e]
file = "tiny_e4e.pt"
urls = ["{(mirror / 'page.pt').as_uri()}", "{(mirror / 'tiny.pt').as_uri()}"]
size = {len(PAYLOAD)}
license = "MIT"

[weights.tiny-clip]
file = "tiny_clip.pt"
urls = ["{(mirror / 'tiny.pt').as_uri()}"]
sha256 = "{PAYLOAD_SHA}"
license = "MIT"

[weights.bad-hash]
file = "bad.pt"
urls = ["{(mirror / 'tiny.pt').as_uri()}"]
sha256 = "{'0' * 64}"
""", encoding="utf-8")
    return toml


def _rows(stdout: str) -> dict[str, dict]:
    data = json.loads(stdout)
    return {f"{r['domain']}/{r['role']}/{r['weights']}": r for r in data["weights"]}


def test_list_shows_domains_files_status_and_origin(registry, tmp_path):
    user = tmp_path / "config" / "clipinvert" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[weights.mine]\nfile = "mine.pt"\nlicense = "own"\n', encoding="utf-8")
    code, out, _ = run("models", "list", "--json", "--models", str(registry))
    assert code == 0
    rows = _rows(out)
    faces = rows["faces/e4e/e4e-ffhq-encode"]
    assert faces["status"] == "missing" and faces["origin"] == "packaged"
    assert faces["path"] == str(tmp_path / "home" / "e4e_ffhq_encode.pt")
    assert faces["license"].startswith("MIT")
    assert rows["tiny/e4e/tiny-e4e"]["origin"] == str(registry.resolve())
    assert rows["None/None/mine"]["origin"] == "user"
    plain = rows["tiny/clipinverter/None"]
    assert plain["status"] == "missing" and plain["note"] == "no released weights: train them"
    assert plain["path"] == str(registry.parent / "trained" / "clipinverter.pt")
    assert faces["needed_by"] == ["edit", "train", "eval"]
    assert faces["url"].startswith("https://drive.google.com/")
    assert rows["faces/stylegan2/stylegan2-ffhq-config-f"]["needed_by"] == ["train"]
    assert rows["faces/attributes/celeba-attributes"]["url"] is None
    assert "train-classifier" in rows["faces/attributes/celeba-attributes"]["made_by"]
    assert rows["tiny/e4e/tiny-e4e"]["url"].endswith("page.pt")
    # DOMAIN filters (and an unknown one is a usage error)
    code, out, _ = run("models", "list", "tiny", "--json", "--models", str(registry))
    assert code == 0 and {r["domain"] for r in json.loads(out)["weights"]} == {"tiny"}
    code, _, err = run("models", "list", "unicorns", "--models", str(registry))
    assert code == 2 and "unknown domain 'unicorns'" in err


@pytest.mark.parametrize("columns", ["60", "200"])
def test_list_text_is_one_whole_line_per_file(registry, columns, monkeypatch):
    """Captured (not a terminal) and at COLUMNS=60: a header and one line per file, every
    file name and URL whole, nothing folded or boxed."""
    monkeypatch.setenv("COLUMNS", columns)
    code, out, err = run("models", "list", "--models", str(registry))
    assert code == 0
    _, js, _ = run("models", "list", "--json", "--models", str(registry))
    rows = json.loads(js)["weights"]
    lines = out.splitlines()
    assert len(lines) == 1 + len(rows)
    assert lines[0].split() == ["DOMAIN", "ROLE", "STATUS", "SIZE", "NEEDED-BY", "FILE",
                                "SOURCE"]
    for line, row in zip(lines[1:], rows, strict=True):
        cells = line.split()
        assert len(cells) == 7, line
        assert cells[0] == (row["domain"] or "—") and cells[1] == (row["role"] or "—")
        assert cells[2] == row["status"] and cells[5] == row["file"]
        assert cells[4] == (",".join(row["needed_by"]) or "—")
        assert cells[6] == (row["url"] or "—")
    assert not set("│┃┏━╭─") & set(out)
    e4e = next(ln for ln in lines if ln.startswith("faces ") and " e4e " in ln)
    assert e4e.split()[4] == "edit,train,eval"
    assert "cache: " in err and "tiny: no released weights: train them" in err
    assert "celeba_attributes_mobilenet.pt has no download; make it with `clipinvert eval " \
           "train-classifier" in err


def test_download_verify_and_path(registry, tmp_path):
    home = tmp_path / "home"
    code, _, err = run("models", "download", "tiny-clip", "tiny-e4e", "-q",
                       "--models", str(registry))
    assert code == 0, err
    assert (home / "tiny_e4e.pt").read_bytes() == PAYLOAD  # HTML mirror skipped, next URL used
    assert (home / "tiny_clip.pt").read_bytes() == PAYLOAD
    assert not (home / ".partial").exists()
    code, out, _ = run("models", "list", "--json", "--models", str(registry))
    row = _rows(out)["tiny/e4e/tiny-e4e"]
    assert row["status"] == "present" and row["size"] == len(PAYLOAD)

    code, out, _ = run("models", "verify", "--json", "--models", str(registry))
    assert code == 0
    checks = {c["name"]: c for c in json.loads(out)}
    assert checks["tiny-clip"]["status"] == "ok"  # registry sha256
    assert checks["tiny-e4e"]["status"] == "ok"  # recorded at first download
    assert checks["e4e-ffhq-encode"]["status"] == "missing"

    code, out, _ = run("models", "path", "tiny-e4e", "--models", str(registry))
    assert code == 0 and out.strip() == str(home / "tiny_e4e.pt")
    code, out, _ = run("models", "path", "tiny:clip", "--models", str(registry))
    assert code == 0 and out.strip() == str(home / "tiny_clip.pt")

    (home / "tiny_e4e.pt").write_bytes(PAYLOAD[::-1])  # same size, other bytes
    code, _, err = run("models", "verify", "--models", str(registry))
    assert code == 3 and "tiny-e4e" in err and "recorded at first download" in err


def test_download_domain_reports_files_without_download(registry):
    code, _, err = run("models", "download", "tiny", "-q", "--models", str(registry))
    assert code == 3
    assert "clipinverter" in err and "no released weights: train them" in err


def test_download_failures_and_usage_errors(registry):
    code, _, err = run("models", "download", "bad-hash", "-q", "--models", str(registry))
    assert code == 3 and "sha256" in err
    code, _, err = run("models", "download", "nope", "--models", str(registry))
    assert code == 2 and "unknown domain or weights name 'nope'" in err
    code, _, err = run("models", "path", "nope", "--models", str(registry))
    assert code == 2


def test_offline_download_and_missing_path_exit_3(registry, monkeypatch, tmp_path):
    code, _, err = run("models", "download", "tiny-e4e", "--offline", "--models", str(registry))
    assert code == 3 and "offline" in err and "page.pt" in err
    assert "clipinvert models download tiny-e4e" in err
    monkeypatch.setenv("CLIPINVERT_OFFLINE", "1")
    code, _, err = run("models", "download", "tiny-e4e", "--models", str(registry))
    assert code == 3 and "offline" in err
    code, _, err = run("models", "path", "tiny-e4e", "--download", "--models", str(registry))
    assert code == 3 and str(tmp_path / "home" / "tiny_e4e.pt") in err
    monkeypatch.delenv("CLIPINVERT_OFFLINE")
    code, _, err = run("models", "path", "faces:e4e")
    assert code == 3 and "e4e_ffhq_encode.pt" in err and "drive.google.com" in err
    code, _, err = run("models", "path", "tiny:clipinverter", "--models", str(registry))
    assert code == 3 and "clipinverter.pt" in err


def test_path_download_over_http(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "w.pt").write_bytes(PAYLOAD)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        toml = tmp_path / "http.toml"
        toml.write_text(f'[weights.web]\nfile = "web.pt"\nurls = '
                        f'["http://127.0.0.1:{srv.server_address[1]}/w.pt"]\n', encoding="utf-8")
        code, out, err = run("models", "path", "web", "--models", str(toml))
        assert code == 3 and "--download" in err
        code, out, err = run("models", "path", "web", "--download", "--models", str(toml))
        assert code == 0, err
        assert Path(out.strip()).read_bytes() == PAYLOAD
        code, _, err = run("models", "download", "web", "--models", str(toml))
        assert code == 0 and "present" in err
    finally:
        srv.shutdown()
        srv.server_close()


def test_domain_download_takes_only_what_editing_needs_unless_all(registry):
    from clipinvert.cli_models import _select
    from clipinvert.registry import EDIT_ROLES, Registry

    reg = Registry.load(registry)
    sel = _select(reg, ["faces"], EDIT_ROLES)
    assert {e.name for e in sel.entries} == {"clip-vit-b-32-openai", "e4e-ffhq-encode",
                                             "clipinverter-faces"}
    assert sel.notes == [] and sel.unavailable == []
    sel = _select(reg, ["faces"], None)
    assert {"arcface-ir-se50", "stylegan2-ffhq-config-f"} <= {e.name for e in sel.entries}
    # the attribute classifier is made, not downloaded: a note, not an entry or a failure
    assert "celeba-attributes" not in {e.name for e in sel.entries} and sel.unavailable == []
    assert sel.notes == ["faces attributes: celeba_attributes_mobilenet.pt has no download; "
                         "make it with `clipinvert eval train-classifier --celeba CELEBA_DIR -o "
                         f"{cache_dir() / 'celeba_attributes_mobilenet.pt'}`"]
    sel = _select(reg, ["arcface-ir-se50"], EDIT_ROLES)  # a name is always taken
    assert [e.name for e in sel.entries] == ["arcface-ir-se50"]


def test_all_roles_are_the_train_and_eval_roles():
    from clipinvert.registry import EDIT_ROLES, NEEDED_BY, TRAIN_EVAL_ROLES, WEIGHT_ROLES

    assert TRAIN_EVAL_ROLES == ("stylegan2", "arcface", "moco", "lpips", "inception",
                                "attributes", "encoder_init")
    assert set(EDIT_ROLES) | set(TRAIN_EVAL_ROLES) == set(WEIGHT_ROLES) == set(NEEDED_BY)
    assert all("edit" not in NEEDED_BY[r] for r in TRAIN_EVAL_ROLES)
    code, out, _ = run("models", "download", "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())  # rich wraps the help in a box
    assert "stylegan2, arcface, moco, lpips, inception, attributes, encoder_init" in text
    assert "(default: faces)" in text


def test_download_all_succeeds_when_only_unpublished_files_are_left(tmp_path):
    """Everything faces --all names is present except the attribute classifier: exit 0, and
    the classifier is named on stderr with the command that makes it."""
    from clipinvert.registry import Registry

    reg = Registry.load()
    home = tmp_path / "home"
    home.mkdir()
    for ref in reg.domain("faces").weights.values():
        entry = reg.weights[ref]
        if entry.urls:
            (home / entry.file).write_bytes(PAYLOAD)
    code, out, err = run("models", "download", "faces", "--all")
    assert code == 0, err
    # stdout: one path per file now in place (the result); the notes are on stderr
    # one line per file (arcface and encoder_init name the same IR-SE50 entry)
    ready = sorted({home / reg.weights[ref].file for ref in reg.domain("faces").weights.values()
                    if reg.weights[ref].urls})
    assert sorted(Path(line) for line in out.splitlines()) == ready
    line = next(ln for ln in err.splitlines() if "not downloadable" in ln)
    assert "faces attributes" in line and "clipinvert eval train-classifier" in line
    assert str(home / "celeba_attributes_mobilenet.pt") in line
    # named explicitly, it is still an error (exit 3) that says how to make it
    code, _, err = run("models", "download", "celeba-attributes")
    assert code == 3 and "make it with `clipinvert eval train-classifier" in err


def test_edit_download_failure_gives_the_reason_not_the_flag(tmp_path, monkeypatch, capsys):
    """`edit --download` whose URL refuses: one line with the plain reason and where a copy
    fetched by hand goes, and no advice to pass --download again."""
    import socket

    from PIL import Image

    from clipinvert.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    toml = tmp_path / "m.toml"
    toml.write_text(f'[domains.d]\nresolution = 32\ne4e = "we"\nclipinverter = "c.pt"\n'
                    f'clip = "k.pt"\n[weights.we]\nfile = "e.pt"\n'
                    f'urls = ["http://127.0.0.1:{port}/e.pt"]\n', encoding="utf-8")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "gray").save(img)
    monkeypatch.setattr("clipinvert.weights.download.DEFAULT_RETRIES", 0)
    rc = main(["edit", str(img), "x", "--models", str(toml), "--domain", "d", "--download",
               "-o", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and len(err.strip().splitlines()) == 1, err
    assert f"connection refused by 127.0.0.1:{port}" in err
    assert f"put it at {tmp_path / 'home' / 'e.pt'}" in err
    assert "--download" not in err
