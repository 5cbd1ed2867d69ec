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
from .locations import cache_dir, is_offline
from .weights.download import find_or_fetch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PACKAGED_REGISTRY = Path(__file__).with_name("models.toml")
WEIGHT_ROLES = ("clip", "e4e", "clipinverter", "stylegan2", "arcface", "moco", "lpips",
                "inception", "attributes", "landmarks")
# What align/invert/edit/interpolate need; the others (stylegan2, arcface, moco, lpips: the
# LPIPS AlexNet trunk) serve training and evaluation.
EDIT_ROLES = ("clip", "e4e", "clipinverter", "landmarks")
ALIGN_METHODS = ("ffhq", "none")


def user_registry() -> Path:
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

    @property
    def base_dir(self) -> Path:
        return self.source.parent


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
        # Consent to download (``--download``) and offline mode (``--offline``; None = from env).
        self.download = False
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
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read registry {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"registry {path} is not valid TOML: {exc}") from None
        self.add_mapping(data, path)

    def add_mapping(self, data: Mapping[str, object], source: Path) -> None:
        self.files.append(source)
        for name, t in dict(data.get("weights", {})).items():  # type: ignore[call-overload]
            if not isinstance(t, dict) or not ("file" in t or "path" in t):
                raise UsageError(f"registry {source}: [weights.{name}] needs a 'file' or 'path'")
            self.weights[name] = WeightEntry(
                name=name, file=str(t.get("file") or Path(str(t["path"])).name),
                urls=_as_tuple(t.get("urls", t.get("url"))), sha256=t.get("sha256") or None,
                size=t.get("size"), license=t.get("license"), description=t.get("description"),
                path=t.get("path"), source=source)
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
            self.domains[name] = Domain(
                name=name, resolution=resolution, align=align,
                clip_arch=str(t.get("clip_arch", "ViT-B-32-quickgelu")), weights=roles,
                description=t.get("description"), note=t.get("note"), source=source)

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
        missing file keeps its own, more detailed message."""
        found: dict[str, Path] = {}
        missing: list[tuple[str, WeightsError]] = []
        for role in roles:
            try:
                found[role] = self.locate(domain, role)
            except WeightsError as exc:
                missing.append((role, exc))
        if len(missing) == 1:
            raise MissingWeights(str(missing[0][1]), [missing[0][0]])
        if missing:
            names = [r for r, _ in missing]
            raise MissingWeights(self.missing_message(domain, names), names)
        return found

    def missing_message(self, domain: Domain, roles: list[str]) -> str:
        """One line naming every missing file of ``roles`` and the one command that gets them."""
        named, fixable, fetchable = [], [], False
        for role in roles:
            places, entry = self.candidates(domain, role)
            if role not in domain.weights:
                named.append(f"{role} (not named by the domain)")
            elif entry is None:
                named.append(f"{role} ({places[0]})")
                fixable.append(role)
            else:
                named.append(f"{role} ({entry.file})")
                fetchable = fetchable or bool(entry.urls)
        msg = (f"{len(roles)} weight files of domain {domain.name!r} not found: "
               f"{', '.join(named)}; looked in {cache_dir()}")
        if fetchable:
            cmd = f"`clipinvert models download {domain.name}`"
            msg += (f"; offline mode is on: with network access run {cmd}"
                    if is_offline(self.offline)
                    else f"; get them all with {cmd} (or pass --download)")
        if fixable:
            msg += f"; fix the paths of {', '.join(fixable)} in {domain.source}"
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
            raise WeightsError(f"domain {domain.name!r} ({domain.source}) names no {role} "
                               f"weights{note}")
        places, entry = self.candidates(domain, role)
        if entry is not None:
            try:
                return find_or_fetch(entry, download=self.download, offline=self.offline)
            except WeightsError as exc:
                raise WeightsError(f"{role} weights for domain {domain.name!r}{note}: "
                                   f"{exc}") from None
        if places[0].is_file():
            return places[0]
        raise WeightsError(f"{role} weights for domain {domain.name!r} not found{note}; looked "
                           f"in {places[0]}; fix the path in {domain.source}")
