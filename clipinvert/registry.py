"""The model registry: which weight files each domain needs and where they are.

Registry files are TOML (``models.toml``).  They are merged in order, later ones overriding
earlier tables of the same name: the packaged file, the user's
``~/.config/clipinvert/models.toml`` (XDG config dir), then ``--models FILE`` or
``$CLIPINVERT_MODELS``.  Each domain/weights entry remembers which file it came from, and a
relative path is resolved against *that* file's folder, so a registry can be moved together
with its weights.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .errors import UsageError, WeightsError
from .fileio import read_toml
from .locations import cache_dir, is_offline
from .weights.download import find_or_fetch, made_by

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PACKAGED_REGISTRY = Path(__file__).with_name("models.toml")
WEIGHT_ROLES = ("clip", "e4e", "clipinverter", "stylegan2", "arcface", "moco", "lpips",
                "inception", "attributes", "landmarks", "encoder_init")
# Which commands read each role's file.  ``models list`` shows it ("needed by"), and
# ``models download DOMAIN`` takes the "edit" roles (align/invert/edit/interpolate need them)
# unless --all: then also TRAIN_EVAL_ROLES, the files only ``train`` and ``eval`` read.
NEEDED_BY: dict[str, tuple[str, ...]] = {
    "clip": ("edit", "train", "eval"),
    "e4e": ("edit", "train", "eval"),
    "clipinverter": ("edit", "eval"),
    "stylegan2": ("train",),
    "arcface": ("train", "eval"),
    "moco": ("train", "eval"),
    "lpips": ("train", "eval"),
    "inception": ("eval",),
    "attributes": ("eval",),
    "landmarks": ("edit",),
    # The IR-SE50 body `train --stage e4e` starts its encoder from (e4e's `ir_se50` path): the
    # ArcFace file, but its own role, apart from the identity network — a cats domain starts
    # its encoder from ArcFace's body yet keeps MoCo as its identity loss and metric.
    "encoder_init": ("train",),
}
EDIT_ROLES = tuple(r for r in WEIGHT_ROLES if "edit" in NEEDED_BY[r])
TRAIN_EVAL_ROLES = tuple(r for r in WEIGHT_ROLES if r not in EDIT_ROLES)
# Either network serves the identity loss (train) and the ID metric (eval): ArcFace for faces,
# MoCo for other domains; a domain names one of them.
IDENTITY_ROLES = ("arcface", "moco")
ALIGN_METHODS = ("ffhq", "none")
# How align = "none" domains square a non-square input (imaging.fit_square); stretch: the default.
RESIZE_POLICIES = ("stretch", "center-crop", "pad")


def user_registry() -> Path:
    """The user's own registry, merged over the packaged one (``models demo`` writes to it)."""
    return Path(platformdirs.user_config_dir("clipinvert", appauthor=False)) / "models.toml"


class MissingWeights(WeightsError):
    """Weight files not found; ``roles`` says which (callers may word the message)."""

    def __init__(self, message: str, roles: list[str]) -> None:
        super().__init__(message)
        self.roles = roles


@dataclass(frozen=True)
class WeightEntry:
    """A ``[weights.NAME]`` table: a file and how to get it."""

    name: str
    file: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    license: str | None = None
    description: str | None = None
    path: str | None = None  # an explicit location, relative to the registry file
    source: Path = PACKAGED_REGISTRY
    # For a file nobody publishes: the command that makes it ("{path}": where it is looked
    # for).  ``models download`` then lists it in a note instead of failing.
    made_by: str | None = None
    # A published file that must be converted after download ("nvlabs": an NVlabs network
    # pickle → rosinality .pt, as ``clipinvert models import`` does); ``sha256``/``size`` then
    # describe the published file, and the converted one's checksum is recorded at download.
    convert: str | None = None

    def places(self) -> list[Path]:
        """Where the file may be, in search order: the explicit ``path``, then the cache."""
        places = []
        if self.path:
            places.append(self.source.parent / Path(self.path).expanduser())
        places.append(cache_dir() / self.file)
        return places


@dataclass(frozen=True)
class Domain:
    """A ``[domains.NAME]`` table."""

    name: str
    resolution: int
    align: str
    clip_arch: str
    weights: Mapping[str, str] = field(default_factory=dict)  # role -> weights name or path
    description: str | None = None
    note: str | None = None  # e.g. "no released model: train one with clipinvert train"
    source: Path = PACKAGED_REGISTRY
    # Shown by ``models list`` next to each of the domain's files (e.g. "random weights").
    label: str | None = None
    resize: str = "stretch"  # non-square inputs on align = "none": RESIZE_POLICIES
    # The captions manifest `clipinvert caption --register` made for this domain's images:
    # `train` reads it when no --captions is given (docs/new-domain.md#the-chain).
    captions: str | None = None

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    @property
    def captions_path(self) -> Path | None:
        """``captions`` as a path: relative to the models.toml that names it."""
        if self.captions is None:
            return None
        return self.base_dir / Path(self.captions).expanduser()


CONVERTERS = ("nvlabs",)


def _convert_kind(value: object, source: Path, name: str) -> str | None:
    if value is None:
        return None
    if value not in CONVERTERS:
        raise UsageError(f"registry {source}: [weights.{name}] convert must be one of "
                         f"{', '.join(CONVERTERS)}, not {value!r}")
    return str(value)


def _as_tuple(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)  # type: ignore[union-attr]


class Registry:
    """Merged registry files; resolves a domain's weight roles to files on disk."""

    def __init__(self) -> None:
        self.domains: dict[str, Domain] = {}
        self.weights: dict[str, WeightEntry] = {}
        self.files: list[Path] = []
        # Consent to download (``--download``; None: the command has no such option, so
        # messages do not offer it) and offline mode (``--offline``; None = from env).
        self.download: bool | None = None
        self.offline: bool | None = None

    @classmethod
    def load(cls, models: Path | str | None = None, *, user: bool = True) -> Registry:
        """Packaged registry, then the user's config file, then ``models`` / $CLIPINVERT_MODELS."""
        reg = cls()
        reg.add_file(PACKAGED_REGISTRY)
        if user and user_registry().is_file():
            reg.add_file(user_registry())
        extra = models or os.environ.get("CLIPINVERT_MODELS")
        if extra:
            path = Path(extra).expanduser()
            if not path.is_file():
                raise UsageError(f"registry file not found: {path}")
            reg.add_file(path)
        return reg

    def add_file(self, path: Path) -> None:
        path = path.resolve()
        self.add_mapping(read_toml(path, "registry"), path)

    def add_mapping(self, data: Mapping[str, object], source: Path) -> None:
        self.files.append(source)
        for name, t in dict(data.get("weights", {})).items():  # type: ignore[call-overload]
            if not isinstance(t, dict) or not ("file" in t or "path" in t):
                raise UsageError(f"registry {source}: [weights.{name}] needs a 'file' or 'path'")
            self.weights[name] = WeightEntry(
                name=name, file=str(t.get("file") or Path(str(t["path"])).name),
                urls=_as_tuple(t.get("urls", t.get("url"))), sha256=t.get("sha256") or None,
                size=t.get("size"), license=t.get("license"), description=t.get("description"),
                path=t.get("path"), source=source, made_by=t.get("made_by"),
                convert=_convert_kind(t.get("convert"), source, name))
        for name, t in dict(data.get("domains", {})).items():  # type: ignore[call-overload]
            if not isinstance(t, dict):
                raise UsageError(f"registry {source}: [domains.{name}] must be a table")
            align = str(t.get("align", "none"))
            if align not in ALIGN_METHODS:
                raise UsageError(f"registry {source}: domain {name}: align must be one of "
                                 f"{', '.join(ALIGN_METHODS)}, not {align!r}")
            try:
                resolution = int(t["resolution"])
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"registry {source}: domain {name} needs resolution = "
                                 "<generator size>") from None
            roles = {r: str(t[r]) for r in WEIGHT_ROLES if t.get(r)}
            resize = str(t.get("resize", "stretch"))
            if resize not in RESIZE_POLICIES:
                raise UsageError(f"registry {source}: domain {name}: resize must be one of "
                                 f"{', '.join(RESIZE_POLICIES)}, not {resize!r}")
            self.domains[name] = Domain(
                name=name, resolution=resolution, align=align,
                clip_arch=str(t.get("clip_arch", "ViT-B-32-quickgelu")), weights=roles,
                description=t.get("description"), note=t.get("note"), source=source,
                label=t.get("label"), resize=resize,
                captions=str(t["captions"]) if t.get("captions") else None)

    def domain(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            known = ", ".join(sorted(self.domains)) or "none"
            raise UsageError(f"unknown domain {name!r} (known: {known})") from None

    def candidates(self, domain: Domain, role: str) -> tuple[list[Path], WeightEntry | None]:
        """Every place a role's file may be, in search order, and its registry entry if any."""
        ref = domain.weights.get(role)
        if ref is None:
            return [], None
        entry = self.weights.get(ref)
        if entry is None:  # a plain path, relative to the registry that names it
            return [(domain.base_dir / Path(ref).expanduser())], None
        return entry.places(), entry


    def locate_all(self, domain: Domain, roles: list[str]) -> dict[str, Path]:
        """:meth:`locate` for every role, without loading anything; what is missing is named in
        one message (a first run should not discover the files one failure at a time).  A single
        missing file keeps its own, more detailed message, and so does each file when a
        download was tried (its reason is what the user needs)."""
        found: dict[str, Path] = {}
        missing: list[tuple[str, WeightsError]] = []
        for role in roles:
            try:
                found[role] = self.locate(domain, role)
            except WeightsError as exc:
                missing.append((role, exc))
        names = [r for r, _ in missing]
        if len(missing) == 1:
            raise MissingWeights(str(missing[0][1]), names)
        if missing and self.download and not is_offline(self.offline):
            raise MissingWeights(f"{len(missing)} weight files of domain {domain.name!r} are "
                                 "missing: " + " | ".join(str(e) for _, e in missing), names)
        if missing:
            raise MissingWeights(self.missing_message(domain, names), names)
        return found

    def role_words(self, domain: Domain, role: str) -> str:
        """``role``, or "arcface or moco" when the domain names neither (either serves)."""
        if role in IDENTITY_ROLES and not set(IDENTITY_ROLES) & set(domain.weights):
            return " or ".join(IDENTITY_ROLES)
        return role

    def example_file(self, role: str) -> str:
        """A file name for ``role`` in messages: the one a packaged domain uses, else ROLE.pt."""
        for domain in self.domains.values():
            entry = self.weights.get(domain.weights.get(role, ""))
            if entry is not None:
                return entry.file
        return f"{role}.pt"

    def naming_hint(self, domain: Domain, role: str) -> str:
        """How to name a file the domain lacks: a line in the models.toml that defines it."""
        roles = self.role_words(domain, role).split(" or ")
        lines = " or ".join(f'{r} = "/path/to/{self.example_file(r)}"' for r in roles)
        hint = f"add {lines} under [domains.{domain.name}]"
        if domain.source.resolve() != PACKAGED_REGISTRY.resolve():
            return f"{hint} in {domain.source}, or pass --models FILE"
        # A table replaces the packaged one whole, so the copy must keep every other key.
        return (f"{hint} in {user_registry()} (a copy of the packaged table in "
                f"{PACKAGED_REGISTRY}, which it replaces whole), or pass --models FILE")

    def missing_message(self, domain: Domain, roles: list[str]) -> str:
        """One line naming every missing file of ``roles`` and the one command that gets them."""
        named, fixable, unnamed, fetchable = [], [], [], []
        for role in roles:
            places, entry = self.candidates(domain, role)
            if role not in domain.weights:
                named.append(f"{self.role_words(domain, role)} (not named by the domain)")
                unnamed.append(role)
            elif entry is None:
                named.append(f"{role} ({places[0]})")
                fixable.append(role)
            else:
                named.append(f"{role} ({entry.file})")
                if entry.urls:
                    fetchable.append(role)
                elif made_by(entry):
                    named[-1] = f"{role} ({entry.file}: make it with `{made_by(entry)}`)"
        msg = (f"{len(roles)} weight files of domain {domain.name!r} not found: "
               f"{', '.join(named)}; looked in {cache_dir()}")
        if fetchable:
            everything = " --all" if set(fetchable) - set(EDIT_ROLES) else ""
            cmd = f"`clipinvert models download {domain.name}{everything}`"
            if is_offline(self.offline):
                msg += f"; offline mode is on: with network access run {cmd}"
            else:
                msg += f"; get them all with {cmd}"
                msg += " (or pass --download)" if self.download is False else ""
        if fetchable or len(fixable) + len(unnamed) < len(roles):
            msg += (f"; files fetched by hand go in {cache_dir()} under the names above, or name "
                    f"each with path = \"…\" in a [weights.NAME] table of {user_registry()}")
        if fixable:
            msg += f"; fix the paths of {', '.join(fixable)} in {domain.source}"
        for role in unnamed:
            msg += f"; {self.naming_hint(domain, role)}"
        if domain.note:
            msg += f" ({domain.note})"
        return msg

    def locate(self, domain: Domain, role: str) -> Path:
        """The file for ``role`` of ``domain``: explicit path → cache → (with consent) its URLs.

        A file that is not there is a one-line exit-3 error saying where it looked and how to
        get it.
        """
        note = f" ({domain.note})" if domain.note else ""
        if role not in domain.weights:
            raise WeightsError(f"domain {domain.name!r} ({domain.source}) names no "
                               f"{self.role_words(domain, role)} weights{note}; "
                               f"{self.naming_hint(domain, role)}")
        places, entry = self.candidates(domain, role)
        if entry is not None:
            try:
                # A progress bar only on a terminal: a log or a pipe wants the one result line.
                return find_or_fetch(entry, download=self.download, offline=self.offline,
                                     progress=sys.stderr.isatty())
            except WeightsError as exc:
                raise WeightsError(f"{role} weights for domain {domain.name!r}{note}: "
                                   f"{exc}") from None
        if places[0].is_file():
            return places[0]
        raise WeightsError(f"{role} weights for domain {domain.name!r} not found{note}; looked "
                           f"in {places[0]}; fix the path in {domain.source}")


# ---- writing registries ---------------------------------------------------------------------

def toml_table(header: str, values: Mapping[str, str | int]) -> str:
    """``[header]`` and ``key = value`` lines (strings quoted as TOML basic strings).

    Only flat tables of strings and integers are ever written (a domain), which JSON's string
    escapes cover exactly, so no TOML writer is needed.
    """
    import json

    lines = [f"[{header}]"]
    lines += [f"{k} = {v if isinstance(v, int) else json.dumps(str(v), ensure_ascii=False)}"
              for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _without_table(text: str, header: str) -> tuple[str, bool]:
    """``text`` with the ``[header]`` table (header line up to the next table) removed."""
    import re

    dotted = r"\s*\.\s*".join(f'"?{re.escape(part)}"?' for part in header.split("."))
    start = re.compile(rf"^\s*\[\s*{dotted}\s*\]\s*(#.*)?$")
    out: list[str] = []
    skipping = found = False
    for line in text.splitlines(keepends=True):
        if start.match(line):
            skipping = found = True
            continue
        if skipping and line.lstrip().startswith("["):
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out), found


def set_domain_table(path: Path, name: str, values: Mapping[str, str | int]) -> bool:
    """Add or replace ``[domains.NAME]`` in the registry file ``path``, keeping every other
    line — the user's comments and tables — as it is; returns whether one was replaced.

    The edit is textual (no TOML writer keeps comments, and none is a dependency), so the result
    is parsed and compared before it is written: every other table must be unchanged and the
    domain must read back as ``values``, else nothing is written (a usage error says what to add
    by hand).  The new file replaces the old atomically.
    """
    from .fileio import atomic_write_text

    table = toml_table(f"domains.{name}", values)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    try:
        before = tomllib.loads(old)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"registry {path} is not valid TOML ({exc}); fix it, or add this "
                         f"table by hand: {table!r}") from None
    kept, replaced = _without_table(old, f"domains.{name}")
    text = kept.rstrip("\n") + ("\n\n" if kept.strip() else "") + table
    after = tomllib.loads(text)
    want = dict(before)
    want["domains"] = {**want.get("domains", {}), name: dict(values)}
    if after != want:
        raise UsageError(f"could not update {path} safely (an unusual layout around "
                         f"[domains.{name}]); add this table by hand: {table!r}")
    atomic_write_text(path, text)
    return replaced


DOMAIN_FIELDS = ("description", "note", "label", "resolution", "align", "clip_arch", "resize",
                 "captions")
# Domain keys that are files (relative to their models.toml) but not weights: what a step of
# the chain makes that is not a network (``caption --register``).
PATH_FIELDS = ("captions",)


def domain_table(domain: Domain, reg: Registry, where: Path) -> dict[str, str | int]:
    """The complete ``[domains.NAME]`` table of a merged domain, to be written into ``where``.

    A plain-path role is relative to the file that named it, so it is made absolute when the
    table moves to another file; names of ``[weights.*]`` entries stay as they are.
    """
    table: dict[str, str | int] = {}
    for key in DOMAIN_FIELDS:
        value = getattr(domain, key)
        if value is not None:
            table[key] = value
    moved = domain.source.resolve().parent != where.resolve().parent
    arch = Path(domain.clip_arch).expanduser()
    if moved and domain.clip_arch.lower().endswith(".json") and not arch.is_absolute():
        table["clip_arch"] = str((domain.base_dir / arch).resolve())  # a config beside it
    for key in PATH_FIELDS:
        path = getattr(domain, f"{key}_path")
        if moved and path is not None:
            table[key] = str(path.resolve())
    for role, ref in domain.weights.items():
        if moved and ref not in reg.weights and not Path(ref).expanduser().is_absolute():
            ref = str((domain.base_dir / Path(ref).expanduser()).resolve())
        table[role] = ref
    return table


def register_role(path: Path, domain: str, role: str, value: str,
                  **fields: str | int) -> bool:
    """Name ``value`` (a file path or a ``[weights.*]`` name) as ``domain``'s ``role`` in the
    registry file ``path`` (the user's models.toml or a --models FILE), creating the domain if
    it is new; ``fields`` sets other keys (``resolution=512``, ``note=…``).  Returns whether a
    table was replaced.

    Why the whole table: registries merge table by table, so a ``[domains.NAME]`` written to the
    user's file *replaces* the packaged one.  What is written is therefore the complete merged
    table — every other role (clip, lpips, moco…) and key kept — with this one role set.  The
    one function for every command that produces a domain's file (``models import``,
    ``caption``, ``train``).
    """
    if role not in WEIGHT_ROLES + PATH_FIELDS:
        raise UsageError(f"unknown role {role!r} (roles: {', '.join(WEIGHT_ROLES)}; "
                         f"files: {', '.join(PATH_FIELDS)})")
    unknown = sorted(set(fields) - set(DOMAIN_FIELDS))
    if unknown:
        raise UsageError(f"unknown domain keys {unknown} (known: {', '.join(DOMAIN_FIELDS)})")
    path = Path(path).expanduser()
    is_user = path.resolve() == user_registry().resolve()
    reg = Registry.load(None if is_user or not path.is_file() else path)
    old = reg.domains.get(domain)
    table = domain_table(old, reg, path) if old is not None else {}
    table.update(fields)
    if "resolution" not in table:
        raise UsageError(f"domain {domain!r} is new: its resolution must be given")
    table.setdefault("align", "none")
    table[role] = value
    return set_domain_table(path, domain, table)
