"""``clipinvert models …``: list, download, verify and locate the weight files of the registry.

Mounted by the main CLI with ``app.add_typer(models_app, name="models")``.  Commands raise
:mod:`clipinvert.errors` exceptions and leave exit codes to ``clipinvert.cli.main`` (2 usage,
3 weights missing or invalid).  Results (tables, JSON, paths) go to stdout; download progress
and per-file notes go to stderr, so scripts can capture the one and show the other.
The registry is light (TOML, no torch); :mod:`clipinvert.weights` and the tiny demo models
(torch) are imported in the function bodies: importing this module (``clipinvert --help``)
loads no torch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.filesize import decimal as human_size
from rich.markup import escape
from rich.table import Table

from .errors import UsageError, WeightsError
from .registry import EDIT_ROLES, TRAIN_EVAL_ROLES

if TYPE_CHECKING:
    from .registry import Registry, WeightEntry

models_app = typer.Typer(
    help="List, download, verify and locate the weight files named in models.toml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelsOpt = Annotated[Path | None, typer.Option(
    "--models", envvar="CLIPINVERT_MODELS", help="Extra models.toml merged over the packaged one.",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
OfflineOpt = Annotated[bool, typer.Option(
    "--offline", help="Never touch the network (also CLIPINVERT_OFFLINE=1, HF_HUB_OFFLINE=1).")]
DEFAULT_DOMAIN = "faces"


def _out() -> Console:
    return Console(soft_wrap=False)


def _err() -> Console:
    # soft_wrap: one line per message, whatever the terminal width (scripts grep these).
    return Console(stderr=True, highlight=False, soft_wrap=True)


def registry_label(path: Path) -> str:
    """Where an entry came from, short: ``packaged``, ``user``, or the --models file."""
    from .registry import PACKAGED_REGISTRY, user_registry

    path = Path(path)
    if path.resolve() == PACKAGED_REGISTRY.resolve():
        return "packaged"
    if path.resolve() == user_registry().resolve():
        return "user"
    return str(path)


@dataclass
class Row:
    """One weight file of the merged registry, as ``models list`` shows it."""

    domain: str | None
    role: str | None
    weights: str | None  # the [weights.NAME], None for a plain path
    file: str
    status: str  # present / missing
    path: str  # where it was found, else where it would go first
    size: int | None
    license: str | None
    registry: str  # the models.toml the entry (or the domain, for a path) came from
    origin: str  # packaged / user / the --models file
    note: str | None = None
    needed_by: list[str] = field(default_factory=list)  # edit / train / eval
    url: str | None = None  # the first download URL
    label: str | None = None  # the domain's label, e.g. "random weights"
    made_by: str | None = None  # the command that makes a file nobody publishes


def collect_rows(reg: Registry, only: str | None = None) -> list[Row]:
    """Every domain role (of domain ``only`` if given), then — unless ``only`` — the
    [weights.*] entries that no domain names."""
    from .registry import NEEDED_BY
    from .weights.download import find_file, made_by, places_for

    rows: list[Row] = []
    used: set[str] = set()
    for dname, domain in reg.domains.items():
        if only is not None and dname != only:
            continue
        for role, ref in domain.weights.items():
            places, entry = reg.candidates(domain, role)
            found = next((p for p in places if p.is_file()), None)
            src = entry.source if entry else domain.source
            if entry:
                used.add(entry.name)
            rows.append(Row(
                domain=dname, role=role, weights=entry.name if entry else None,
                file=entry.file if entry else ref,
                status="present" if found else "missing",
                path=str(found or (places[-1] if entry else places[0])),
                size=found.stat().st_size if found else None,
                license=entry.license if entry else None, registry=str(src),
                origin=registry_label(src),
                note=None if found or entry else domain.note,
                needed_by=list(NEEDED_BY.get(role, ())),
                url=entry.urls[0] if entry and entry.urls else None, label=domain.label,
                made_by=made_by(entry) if entry else None))
    for name, entry in reg.weights.items():
        if name in used or only is not None:
            continue
        found = find_file(entry)
        rows.append(Row(
            domain=None, role=None, weights=name, file=entry.file,
            status="present" if found else "missing",
            path=str(found or places_for(entry)[-1]),
            size=found.stat().st_size if found else None, license=entry.license,
            registry=str(entry.source), origin=registry_label(entry.source),
            url=entry.urls[0] if entry.urls else None, made_by=made_by(entry)))
    return rows


LIST_COLUMNS = ("DOMAIN", "ROLE", "STATUS", "SIZE", "NEEDED-BY", "FILE", "SOURCE")


def text_table(rows: list[Row]) -> list[str]:
    """One line per file, columns aligned with spaces and never wrapped or folded.

    A box table folds long names over several lines in a narrow terminal and in a pipe, which
    breaks both reading and ``grep``/``awk``; these lines stay whole (the terminal may still
    soft-wrap a long line on screen, but it is one line of output).  No cell has a space.
    """
    cells = [LIST_COLUMNS] + [(
        r.domain or "—", r.role or "—", r.status,
        human_size(r.size).replace(" ", "") if r.size is not None else "—",
        ",".join(r.needed_by) or "—", r.file, r.url or "—") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(LIST_COLUMNS) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
            for row in cells]


@models_app.command("list")
def list_(
    domain: Annotated[str | None, typer.Argument(
        help="Only this domain's files.", show_default=False)] = None,
    models: ModelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One line per weight file: domain, role, present/missing, size, which commands need it
    (edit / train / eval) and its download URL.  --json adds licence and source registry."""
    from .registry import Registry, cache_dir

    reg = Registry.load(models)
    if domain is not None:
        reg.domain(domain)  # an unknown name is a usage error listing the known ones
    rows = collect_rows(reg, domain)
    if as_json:
        typer.echo(json.dumps({"cache": str(cache_dir()),
                               "registries": [str(p) for p in reg.files],
                               "weights": [asdict(r) for r in rows]}, indent=2))
        return
    for line in text_table(rows):
        typer.echo(line.rstrip())
    err = _err()
    err.print(escape(f"cache: {cache_dir()}"))
    notes = {(r.domain, r.label or r.note) for r in rows if r.label or r.note}
    for dname, text in sorted(notes, key=lambda n: str(n[0])):
        err.print(escape(f"{dname}: {text}"))
    for r in rows:
        if r.made_by and r.status == "missing":
            err.print(escape(f"{r.domain or r.weights} {r.role or ''}".rstrip()
                             + f": {r.file} has no download; make it with `{r.made_by}`"))


@dataclass
class Selection:
    """What ``models download``/``verify`` act on for their DOMAIN and NAME targets."""

    entries: list[WeightEntry]
    unavailable: list[str]  # "DOMAIN ROLE: why" — requested, missing, and no download
    notes: list[str]  # "DOMAIN ROLE: how to make it" — missing --all additions nobody publishes


def _select(reg: Registry, targets: Iterable[str],
            roles: Iterable[str] | None = None) -> Selection:
    """Weight entries for DOMAIN or NAME targets, and why any requested file has no download.

    For a domain only ``roles`` are taken (all when None); a NAME is always taken.  A missing
    file that only training or evaluation reads and that nobody publishes (the attribute
    classifier: you make it) is a note, not a failure: ``download faces --all`` must be able
    to succeed.
    """
    from .registry import EDIT_ROLES
    from .weights.download import find_file, made_by

    sel = Selection([], [], [])
    entries: dict[str, WeightEntry] = {}
    for target in targets:
        if target in reg.domains:
            domain = reg.domains[target]
            for role in domain.weights:
                if roles is not None and role not in roles:
                    continue
                places, entry = reg.candidates(domain, role)
                optional = role not in EDIT_ROLES
                if entry is not None and (entry.urls or not optional or find_file(entry)):
                    entries.setdefault(entry.name, entry)
                elif entry is not None:
                    how = (f"make it with `{made_by(entry)}`" if entry.made_by
                           else entry.description or "no download is published")
                    sel.notes.append(f"{target} {role}: {entry.file} has no download; {how}")
                elif not any(p.is_file() for p in places):
                    (sel.notes if optional else sel.unavailable).append(
                        f"{target} {role}: {places[0]} is missing and has no download"
                        + (f" — {domain.note}" if domain.note else ""))
        elif target in reg.weights:
            entries.setdefault(target, reg.weights[target])
        else:
            raise UsageError(
                f"unknown domain or weights name {target!r} (domains: "
                f"{', '.join(sorted(reg.domains)) or 'none'}; weights: "
                f"{', '.join(sorted(reg.weights)) or 'none'})")
    sel.entries = list(entries.values())
    return sel


@models_app.command("download")
def download(
    targets: Annotated[list[str] | None, typer.Argument(
        help=f"Domains and/or weights names (default: {DEFAULT_DOMAIN}).",
        show_default=False)] = None,
    models: ModelsOpt = None,
    offline: OfflineOpt = False,
    force: Annotated[bool, typer.Option(
        "--overwrite/--no-overwrite", "--force/--no-force",
        help="Download again even if present (--force is an alias).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    all_roles: Annotated[bool, typer.Option(
        "--all", help="For a domain, also the files only train/eval read ("
        + ", ".join(TRAIN_EVAL_ROLES) + "); by default only what editing needs ("
        + ", ".join(EDIT_ROLES) + "). Files nobody publishes are listed with the command "
        "that makes them.")] = False,
) -> None:
    """Download the weight files of domains or named entries into the cache (verified)."""
    from .registry import Registry, cache_dir
    from .weights.download import fetch, find_file, is_offline, payload_problem

    reg = Registry.load(models)
    sel = _select(reg, targets or [DEFAULT_DOMAIN], None if all_roles else EDIT_ROLES)
    err = _err()
    off = is_offline(offline)
    problems: list[tuple[str, str]] = []  # (what, one-line reason)
    for line in sel.notes:
        what, _, why = line.partition(": ")
        err.print(f"[yellow]not downloadable[/] {escape(what)}: {escape(why)}")
    for line in sel.unavailable:
        what, _, why = line.partition(": ")
        problems.append((what, why))
        err.print(f"[red]unavailable[/] {escape(what)}: {escape(why)}")
    for entry in sel.entries:
        found = find_file(entry)
        problem = payload_problem(found, entry) if found is not None else None
        if found is not None and problem is None and not force:
            if not quiet:
                err.print(f"present     {escape(entry.name)}: {escape(str(found))}")
            typer.echo(str(found))  # stdout: the result, one path per file ready
            continue
        if found is not None and problem and found != cache_dir() / entry.file:
            # An explicit path wins over the cache, so downloading would not fix it.
            reason = f"{found} {problem}; replace or remove that file"
            problems.append((entry.name, reason))
            err.print(f"[red]bad[/]         {escape(entry.name)}: {escape(reason)}")
            continue
        try:
            got = fetch(entry, offline=off, progress=not quiet, force=force)
        except WeightsError as exc:
            problems.append((entry.name, str(exc)))
            err.print(f"[red]failed[/]      {escape(entry.name)}: {escape(str(exc))}")
            continue
        if not quiet:
            err.print(f"downloaded  {escape(entry.name)}: {escape(str(got))} "
                      f"({human_size(got.stat().st_size)})")
        typer.echo(str(got))
    if len(problems) == 1:
        raise WeightsError(problems[0][1])
    if problems:
        raise WeightsError(f"{len(problems)} weight files are missing or failed to download: "
                           + ", ".join(p[0] for p in problems) + " (reasons above)")


@dataclass
class Check:
    name: str
    path: str | None
    status: str  # ok / unverified / bad / missing
    detail: str
    sha256: str | None = None
    size: int | None = None


def _verify_entry(entry: WeightEntry, *, required: bool) -> Check:
    from .weights.download import find_file, places_for, verify_file

    found = find_file(entry)
    if found is None:
        return Check(entry.name, None, "bad" if required else "missing",
                     f"not found in {', '.join(str(p) for p in places_for(entry))}")
    v = verify_file(found, entry)
    return Check(entry.name, str(found), v.status, v.detail, v.sha256, v.size)


@models_app.command("verify")
def verify(
    names: Annotated[list[str] | None, typer.Argument(
        help="Domains and/or weights names [default: every file present].",
        show_default=False)] = None,
    models: ModelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check size and sha256 of present files; exit 3 if any is bad.

    The expected sha256 is the registry's, else the one recorded at the first verified
    download (<cache>/checksums.json).
    """
    from .registry import Registry, WeightEntry
    from .weights.download import verify_file

    reg = Registry.load(models)
    checks: list[Check] = []
    if names:
        sel = _select(reg, names)
        checks += [_verify_entry(e, required=True) for e in sel.entries]
        checks += [Check(u.split(":", 1)[0], None, "bad", u) for u in sel.unavailable]
        checks += [Check(u.split(":", 1)[0], None, "missing", u) for u in sel.notes]
    else:
        checks += [_verify_entry(e, required=False) for e in reg.weights.values()]
        for dname, domain in reg.domains.items():  # plain paths: present ones are sanity-checked
            for role in domain.weights:
                places, entry = reg.candidates(domain, role)
                if entry is None and places[0].is_file():
                    plain = WeightEntry(name=f"{dname}:{role}", file=places[0].name,
                                        source=domain.source)
                    v = verify_file(places[0], plain, dest_dir=places[0].parent)
                    checks.append(Check(plain.name, str(places[0]), v.status, v.detail,
                                        v.sha256, v.size))
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        table = Table(title="clipinvert weights check")
        for col in ("Weights", "Status", "Size", "Path", "Detail"):
            table.add_column(col, overflow="fold")
        colour = {"ok": "green", "unverified": "yellow", "bad": "red", "missing": "dim"}
        for c in checks:
            detail = c.detail + (f" (sha256 {c.sha256})" if c.status == "unverified" else "")
            table.add_row(escape(c.name), f"[{colour[c.status]}]{c.status}[/]",
                          human_size(c.size) if c.size is not None else "—",
                          escape(c.path or "—"), escape(detail))
        _out().print(table)
    bad = [c for c in checks if c.status == "bad"]
    if bad:
        raise WeightsError(f"{len(bad)} weight file(s) failed verification: "
                           + " | ".join(f"{c.name}: {c.detail}" for c in bad))


@models_app.command("path")
def path(
    name: Annotated[str, typer.Argument(help="A weights name, or DOMAIN:ROLE (e.g. faces:e4e).",
                                        show_default=False)],
    models: ModelsOpt = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Download the file if it is missing.")] = False,
    offline: OfflineOpt = False,
) -> None:
    """Print the resolved path of a weight file (exit 3 when it is missing)."""
    from .registry import Registry
    from .weights.download import find_or_fetch

    reg = Registry.load(models)
    if name in reg.weights:
        found = find_or_fetch(reg.weights[name], download=download, offline=offline or None,
                              progress=sys.stderr.isatty())
    elif ":" in name:
        dname, _, role = name.partition(":")
        domain = reg.domain(dname)
        _, entry = reg.candidates(domain, role)
        if entry is not None:
            found = find_or_fetch(entry, download=download, offline=offline or None,
                                  progress=sys.stderr.isatty())
        else:
            found = reg.locate(domain, role)
    else:
        raise UsageError(f"unknown weights name {name!r} (known: "
                         f"{', '.join(sorted(reg.weights)) or 'none'}; or use DOMAIN:ROLE)")
    typer.echo(str(found))


@models_app.command("import", epilog="\n".join((  # the Examples lines of -h, one per line
    "clipinvert models import afhqcat.pkl -o stylegan2-afhqcat.pt",
    "clipinvert models import network-snapshot-025000.pkl -o horses.pt --domain horses")))
def import_(
    source: Annotated[Path, typer.Argument(
        help="An NVlabs StyleGAN2-ADA / StyleGAN3 (stylegan2) network pickle, an NVlabs "
        "TensorFlow StyleGAN2 pickle, or a rosinality .pt.", show_default=False)],
    out: Annotated[Path, typer.Option(
        "-o", "--output", help="The rosinality-layout .pt to write.", show_default=False)],
    domain: Annotated[str | None, typer.Option(
        "--domain", help="Register the result as this domain's stylegan2 file (and its "
        "resolution), in your models.toml or --models FILE; a new name creates the domain.",
        show_default=False)] = None,
    models: Annotated[Path | None, typer.Option(
        "--models", help="The models.toml to register in (default: your "
        "~/.config/clipinvert/models.toml).", show_default=False)] = None,
) -> None:
    """Convert a StyleGAN2 generator to the rosinality layout clipinvert trains with.

    Takes G_ema (never G), renames and reshapes, reads sizes from the file, keeps its
    conv_clamp; never runs code from the pickle.  Conditional, resnet/orig and StyleGAN3-T/R
    generators are refused.  Prints OUT; the source's sha256 and the conversion are recorded in
    OUT (clipinvert_import).
    """
    import re

    from .registry import register_role, user_registry
    from .weights.convert import import_generator, save_imported

    if domain is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", domain):
        raise UsageError(f"--domain {domain!r}: use letters, digits, '-' and '_' only")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {out} is a folder; name the .pt file to write")
    if out.resolve() == source.resolve():
        raise UsageError(f"-o {out} is the source file; write the result elsewhere")
    imported = import_generator(source)
    save_imported(imported, out)
    info = imported.info
    err = _err()
    clamp = info["conv_clamp"]
    err.print(escape(
        f"imported {info['format']} generator: {info['resolution']} px, {info['n_mlp']} mapping "
        f"layers, channel multiplier {info['channel_multiplier'] or 'none (custom table)'}, "
        f"conv_clamp {clamp if clamp is not None else 'none'}"))
    if info["n_mlp"] != 8 or info["channel_multiplier"] != 2:
        err.print(escape("note: e4e and the released CLIPInverter code build 8 mapping layers "
                         "and channel multiplier 2; this file loads in clipinvert and in "
                         "rosinality's Generator built with its own sizes"))
    if domain is not None:
        registry = (models or user_registry()).expanduser()
        replaced = register_role(registry, domain, "stylegan2", str(out.resolve()),
                                 resolution=int(info["resolution"]))
        err.print(escape(f"{'updated' if replaced else 'added'} domain {domain!r} in "
                         f"{registry}: stylegan2 = {out.resolve()}"))
    typer.echo(str(out))


DEMO_CAPTIONS = "captions"  # the demo's tiny captioned image set, for `train --data`


@models_app.command("demo")
def demo(
    directory: Annotated[Path, typer.Argument(
        help="Folder to write the demo domain into (new or empty).", show_default=False)],
    name: Annotated[str, typer.Option(help="Domain name to register it under.")] = "demo",
    register: Annotated[bool, typer.Option(
        "--register/--no-register",
        help="Add the domain to your ~/.config/clipinvert/models.toml (else use --models).")
    ] = True,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Write into DIR even if it holds other files.")] = False,
) -> None:
    """Try it without weights: a random-weight domain (tiny models) that every command runs on.

    Writes DIR/models.toml, random-* weight files and DIR/captions/ (a few captioned images for
    `train`), then registers the domain in your registry.  Its results are noise: it is for
    trying the commands, not for real edits.  Prints the models.toml written.
    """
    import re

    from .fileio import atomic_write_text
    from .registry import PACKAGED_REGISTRY, Registry, set_domain_table, toml_table, user_registry

    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise UsageError(f"--name {name!r}: use letters, digits, '-' and '_' only")
    packaged = Registry.load(PACKAGED_REGISTRY, user=False).domains
    if name in packaged:
        raise UsageError(f"--name {name}: that would hide the packaged domain {name!r}; "
                         "choose another name")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a folder")
    if directory.is_dir() and not overwrite:
        present = sorted(p.name for p in directory.iterdir())
        if present:
            raise UsageError(f"{directory} already holds {len(present)} entries ("
                             f"{', '.join(present[:3])}{', …' if len(present) > 3 else ''}); "
                             "choose a new or empty folder, or pass --overwrite")
    from .testing.models import DEMO_LABEL, write_demo_files
    from .testing.training import write_caption_set

    err = _err()
    err.print(escape(f"writing random-weight models into {directory} …"))
    files = write_demo_files(directory)
    write_caption_set(directory / DEMO_CAPTIONS, n=6)
    head: dict[str, str | int] = {
        "description": "Demo: the tests' tiny models with random weights (32 px faces)",
        "label": DEMO_LABEL, "resolution": 32, "align": "ffhq"}
    toml = directory.resolve() / "models.toml"
    atomic_write_text(toml, "# Written by `clipinvert models demo`: " + DEMO_LABEL + ".\n"
                      + toml_table(f"domains.{name}", {**head, **files}))
    if register:
        where = directory.resolve()
        user = user_registry()
        replaced = set_domain_table(user, name, {**head, **{k: str(where / v)
                                                            for k, v in files.items()}})
        err.print(escape(f"{'replaced' if replaced else 'added'} domain {name!r} in {user}; "
                         f"try: clipinvert edit PHOTO \"blond hair\" --domain {name} -o out/"))
    else:
        err.print(escape(f"not registered: pass --models {toml} --domain {name}"))
    err.print(escape(f"{name}: {DEMO_LABEL}; train on it with --data "
                     f"{directory.resolve() / DEMO_CAPTIONS}"))
    typer.echo(str(toml))
