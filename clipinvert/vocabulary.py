"""Caption vocabularies: attribute groups, their classes and wording, in editable TOML files.

AFHQ-Cats comes without captions; the paper made them "with the approach of Nie et al. with
CLIP": CLIP labels every image zero-shot over attribute classes, and the labels become
sentences.  One vocabulary file holds everything that decides those labels and sentences —
and, because the AMA of ``eval benchmark`` on cats and birds scores edits with the very same
zero-shot prompts, it is also the single source of that protocol's attributes
(:mod:`clipinvert.evaluation.protocol` reads the packaged ``cats.toml`` and ``birds.toml``).

A vocabulary (docs/new-domain.md#caption-a-data-set)::

    name = "cats"
    captions_per_image = 10          # sentences written per image (fewer if fewer differ)
    threshold = 0.5                  # a group's top class is kept when its probability >= this
    templates = ["This cat {phrases}.", "A cat that {phrases}."]

    [groups.colour]
    classes = ["black", "white", "grey"]
    prompt = "a photo of a cat with {} fur"   # the zero-shot prompt, one per class
    phrase = "has {} fur"                     # the caption phrase of a class
    edit = "This cat has {} fur."             # optional: eval benchmark's edit prompt
    evaluated = ["black", "white"]            # optional: the classes AMA scores (default all)
    threshold = 0.6                           # optional: this group's own threshold
    [groups.colour.words]                     # optional: a class's wording in captions
    grey = "grey-blue"

Nothing here imports torch: the CLI reads and checks a vocabulary before any model loads, and a
malformed one is one :class:`~clipinvert.errors.UsageError` line (exit 2) naming the file, the
table and the problem.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fileio import read_toml

#: Where the packaged vocabularies live (package data).
PACKAGED_DIR = Path(__file__).with_name("vocabularies")
#: The vocabularies shipped with clipinvert, by name.
PACKAGED = ("cats", "birds")

_TOP_KEYS = {"name", "description", "captions_per_image", "threshold", "templates", "groups"}
_GROUP_KEYS = {"classes", "prompt", "phrase", "edit", "evaluated", "threshold", "words"}
# Drawing further subsets stops after this many tries per caption asked for: a group with few
# labels cannot give ten different sentences, and the draw must end.
_TRIES_PER_CAPTION = 20


@dataclass(frozen=True)
class Group:
    """One attribute group (breed, colour, …): its classes and how each is worded."""

    name: str
    classes: tuple[str, ...]
    prompt: str  # zero-shot prompt template, "{}" = the class
    phrase: str  # caption phrase template, "{}" = the class's word
    edit: str | None = None  # eval benchmark's edit prompt template
    evaluated: tuple[str, ...] = ()
    threshold: float = 0.5
    words: Mapping[str, str] = field(default_factory=dict)

    def prompts(self) -> list[str]:
        """The zero-shot prompt of every class, in class order (what CLIP compares with)."""
        return [self.prompt.format(c) for c in self.classes]

    def phrase_for(self, label: str) -> str:
        """The caption phrase of class ``label`` ("has grey fur")."""
        return self.phrase.format(self.words.get(label, label))


@dataclass(frozen=True)
class Vocabulary:
    """A whole vocabulary file, checked (see the module docstring for the format)."""

    name: str
    groups: tuple[Group, ...]
    templates: tuple[str, ...]
    captions_per_image: int = 10
    threshold: float = 0.5
    source: Path | None = None
    description: str | None = None

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def evaluated(self) -> tuple[str, ...]:
        """The ``group:class`` attributes AMA scores (the benchmark's targets)."""
        return tuple(f"{g.name}:{c}" for g in self.groups for c in g.evaluated)

    def settings(self) -> dict[str, Any]:
        """Everything that decides labels and captions: a resumed run must match it."""
        return {"name": self.name, "captions_per_image": self.captions_per_image,
                "templates": list(self.templates),
                "groups": {g.name: {"classes": list(g.classes), "prompt": g.prompt,
                                    "phrase": g.phrase, "threshold": g.threshold,
                                    "words": dict(g.words)} for g in self.groups}}

    def sentences(self, labels: Mapping[str, str], key: str) -> list[str]:
        """Up to :attr:`captions_per_image` different captions of an image with ``labels``
        (group → class); none when it has no label.

        The first names every label, in the vocabulary's group order, with the first template;
        the others name a random non-empty subset in random order with a random template, as
        human captions mention a few traits each.  The draws are seeded by ``key`` (the image's
        name) alone, so a resumed or re-batched run writes the same sentences.
        """
        phrases = [(g.name, g.phrase_for(labels[g.name])) for g in self.groups
                   if g.name in labels]
        if not phrases:
            return []
        out = [self.templates[0].format(phrases=join_phrases([p for _, p in phrases]))]
        rng = random.Random(f"caption:{key}")
        tries = _TRIES_PER_CAPTION * self.captions_per_image
        while len(out) < self.captions_per_image and tries > 0:
            tries -= 1
            chosen = rng.sample(phrases, rng.randint(1, len(phrases)))
            text = rng.choice(self.templates).format(phrases=join_phrases([p for _, p in chosen]))
            if text not in out:
                out.append(text)
        return out


def join_phrases(phrases: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: phrases as one clause."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ---- reading and checking ---------------------------------------------------------------------
def load_vocabulary(spec: str | Path) -> Vocabulary:
    """A packaged vocabulary by name (``cats``, ``birds``) or a TOML file of the user's."""
    text = str(spec)
    path = PACKAGED_DIR / f"{text}.toml" if text in PACKAGED else Path(spec).expanduser()
    if not path.is_file():
        known = ", ".join(PACKAGED)
        what = "is a folder" if path.is_dir() else "not found"
        raise UsageError(f"vocabulary {spec}: {what} (give {known} or a .toml file)")
    return parse_vocabulary(read_toml(path, "vocabulary"), path)


def parse_vocabulary(data: Mapping[str, Any], source: Path | None = None) -> Vocabulary:
    """Check a vocabulary's parsed TOML; every problem is one line naming where it is."""
    where = f"vocabulary {source}" if source is not None else "vocabulary"

    def bad(table: str, problem: str) -> UsageError:
        return UsageError(f"{where}: {table}: {problem}")

    _no_unknown(data, _TOP_KEYS, lambda p: bad("top level", p))
    threshold = _probability(data.get("threshold", 0.5), lambda p: bad("threshold", p))
    per_image = data.get("captions_per_image", 10)
    if isinstance(per_image, bool) or not isinstance(per_image, int) or not 1 <= per_image <= 100:
        raise bad("captions_per_image", f"must be a whole number 1..100, not {per_image!r}")
    templates = data.get("templates")
    if not isinstance(templates, list) or not templates:
        raise bad("templates", 'must be a non-empty list of sentences with "{phrases}"')
    for t in templates:
        _check_template(t, "phrases", lambda p: bad("templates", p))
    raw_groups = data.get("groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise bad("groups", "no [groups.NAME] table: a vocabulary needs at least one group")
    groups = tuple(_group(name, raw, threshold, bad) for name, raw in raw_groups.items())
    name = data.get("name", source.stem if source is not None else "vocabulary")
    if not isinstance(name, str) or not name.strip():
        raise bad("name", "must be a non-empty string")
    description = data.get("description")
    return Vocabulary(name=name, groups=groups, templates=tuple(templates),
                      captions_per_image=per_image, threshold=threshold, source=source,
                      description=description if isinstance(description, str) else None)


def _group(name: str, raw: Any, default_threshold: float, bad) -> Group:
    table = f"[groups.{name}]"
    if not isinstance(raw, dict):
        raise bad(table, "must be a table")
    if ":" in name or not name.strip():
        raise bad(table, "a group name may not be empty or hold ':' (attributes read group:class)")
    _no_unknown(raw, _GROUP_KEYS, lambda p: bad(table, p))
    classes = raw.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise bad(table, "classes must be a non-empty list of names")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise bad(table, f"class {twice[0]!r} is listed twice")
    if len(classes) < 2:
        raise bad(table, "needs at least two classes (zero-shot labelling picks among them)")
    for key in ("prompt", "phrase"):
        if key not in raw:
            raise bad(table, f'no {key} (a sentence with "{{}}" where the class goes)')
        _check_template(raw[key], "", lambda p, k=key: bad(f"{table} {k}", p))
    edit = raw.get("edit")
    if edit is not None:
        _check_template(edit, "", lambda p: bad(f"{table} edit", p))
    evaluated = raw.get("evaluated", classes)
    if not isinstance(evaluated, list) or not all(isinstance(c, str) for c in evaluated):
        raise bad(table, "evaluated must be a list of class names")
    stray = [c for c in evaluated if c not in classes]
    if stray:
        raise bad(table, f"evaluated names {stray[0]!r}, which is not one of its classes")
    words = raw.get("words", {})
    if not isinstance(words, dict) or not all(isinstance(v, str) for v in words.values()):
        raise bad(f"[groups.{name}.words]", "must map class names to their wording")
    stray = [c for c in words if c not in classes]
    if stray:
        raise bad(f"[groups.{name}.words]", f"{stray[0]!r} is not one of the classes")
    threshold = _probability(raw.get("threshold", default_threshold),
                             lambda p: bad(f"{table} threshold", p))
    return Group(name=name, classes=tuple(classes), prompt=raw["prompt"], phrase=raw["phrase"],
                 edit=edit, evaluated=tuple(evaluated), threshold=threshold, words=dict(words))


def _no_unknown(raw: Mapping[str, Any], known: set[str], bad) -> None:
    """A misspelt key (``treshold``) would silently fall back to a default: refuse it."""
    unknown = sorted(set(raw) - known)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _probability(value: Any, bad) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise bad(f"must be a number 0..1, not {value!r}")
    return float(value)


def _check_template(text: Any, field_name: str, bad) -> None:
    """``text`` has exactly one ``{field_name}`` placeholder (``""``: the positional ``{}``)
    and no other braces, so formatting it can never fail mid-run."""
    shown = "{" + field_name + "}"
    if not isinstance(text, str) or not text.strip():
        raise bad(f'must be a sentence with "{shown}"')
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise bad(f"{text!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    if fields != [field_name]:
        raise bad(f'{text!r} must hold "{shown}" once and no other {{…}} field')
