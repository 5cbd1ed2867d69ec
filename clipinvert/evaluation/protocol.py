"""The paper's evaluation protocol: which attributes, prompts and inputs (docs/evaluation.md).

Faces (§4.3): 15 CelebA attributes scored by the attribute classifier, each edited with a fixed
phrase on 50 seeded test images that lack it (AMA-single), and 7 combinations of two or three of
them (AMA-multiple).  Cats and birds: CLIP as a zero-shot classifier — each attribute belongs to
a category, and every class of that category gets a caption; an edit is correct when its
attribute's caption wins.  The paper names neither the combinations nor the cat and bird
lists; ours are documented in docs/evaluation.md#protocol.  The cat and bird lists live in the
packaged caption vocabularies (:mod:`clipinvert.vocabulary`), read here, so the captions
``clipinvert caption`` writes and the attributes AMA scores come from one file.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..vocabulary import Vocabulary, load_vocabulary

if TYPE_CHECKING:
    import torch

CLIP_LOGIT_SCALE = 100.0  # CLIP's trained temperature, as zero-shot classification uses it

# CelebA attribute → the phrase the authors' earlier code used ("This person" + phrase).
FACE_PHRASES: dict[str, str] = {
    "Blond_Hair": "has blond hair",
    "Bushy_Eyebrows": "has bushy eyebrows",
    "Chubby": "is chubby",
    "Double_Chin": "has double chin",
    "Eyeglasses": "has eyeglasses",
    "Goatee": "has a goatee",
    "Gray_Hair": "has gray hair",
    "Heavy_Makeup": "wears heavy makeup",
    "Male": "This is a male.",
    "Mouth_Slightly_Open": "has mouth slightly open",
    "Mustache": "has a mustache",
    "Rosy_Cheeks": "has rosy cheeks",
    "Smiling": "is smiling",
    "Wearing_Lipstick": "is wearing lipstick",
    "Wearing_Necktie": "is wearing a necktie",
}
FACE_ATTRIBUTES: tuple[str, ...] = tuple(FACE_PHRASES)
ALWAYS_HE = frozenset({"Double_Chin", "Goatee", "Mustache", "Wearing_Necktie"})
ALWAYS_SHE = frozenset({"Heavy_Makeup", "Rosy_Cheeks", "Wearing_Lipstick"})
# AMA-multiple: the paper edits "combinations of two or three attributes", 7 of them, without
# listing them.  Ours pair attributes that can hold at once and that the classifier separates
# well; three of the seven name three attributes.
FACE_COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("Blond_Hair", "Smiling"),
    ("Eyeglasses", "Mustache"),
    ("Gray_Hair", "Eyeglasses"),
    ("Wearing_Lipstick", "Heavy_Makeup"),
    ("Blond_Hair", "Smiling", "Mouth_Slightly_Open"),
    ("Goatee", "Mustache", "Bushy_Eyebrows"),
    ("Gray_Hair", "Chubby", "Double_Chin"),
)
SAMPLES_PER_TARGET = 50  # edits per attribute and per combination
AMA_SINGLE_THRESHOLD = 0.5  # the paper leaves it unstated
AMA_MULTIPLE_THRESHOLD = 0.9  # the paper's


def face_prompt(attributes: Sequence[str], *, male: bool | None = None,
                gendered: bool = False) -> str:
    """The edit prompt for one attribute or a combination.

    Subject "This person" (the paper's example), or with ``gendered`` "She"/"He" by the input's
    CelebA ``Male`` label — except attributes that only fit one (a goatee: "He"; lipstick:
    "She").  ``Male`` has a sentence of its own; in a combination the phrases are joined with
    commas and "and".
    """
    unknown = [a for a in attributes if a not in FACE_PHRASES]
    if unknown:
        raise ValueError(f"not an evaluated face attribute: {', '.join(unknown)}")
    if list(attributes) == ["Male"]:
        return FACE_PHRASES["Male"]
    subject = "This person"
    if gendered:
        he = any(a in ALWAYS_HE for a in attributes) or (
            male is True and not any(a in ALWAYS_SHE for a in attributes))
        subject = "He" if he else "She"
        # "He has … and is …": the verbs already agree with a singular subject
    phrases = [FACE_PHRASES[a] for a in attributes if a != "Male"]
    text = phrases[0] if len(phrases) == 1 else (", ".join(phrases[:-1]) + " and " + phrases[-1])
    sentence = f"{subject} {text}."
    if "Male" in attributes:
        sentence = f"{FACE_PHRASES['Male']} {sentence}"
    return sentence


@dataclass(frozen=True)
class ZeroShotAttribute:
    """An attribute CLIP scores: its class within a category whose classes all get captions."""

    name: str
    category: str
    label: str  # the class, as it reads in a caption


@dataclass(frozen=True)
class ZeroShotSet:
    """Categories (every class, in order), their caption templates, the evaluated attributes."""

    domain: str
    categories: Mapping[str, tuple[str, ...]]
    templates: Mapping[str, str]  # category → "a photo of a {} cat"
    edit_templates: Mapping[str, str]  # category → the edit prompt
    evaluated: tuple[str, ...]  # "category:label" of the attributes scored

    def attribute(self, name: str) -> ZeroShotAttribute:
        category, _, label = name.partition(":")
        if category not in self.categories or label not in self.categories[category]:
            raise ValueError(f"not a {self.domain} attribute: {name!r} (category:class)")
        return ZeroShotAttribute(name, category, label)

    def captions(self, category: str) -> list[str]:
        return [self.templates[category].format(c) for c in self.categories[category]]

    def prompt(self, name: str) -> str:
        a = self.attribute(name)
        return self.edit_templates[a.category].format(a.label)


def zero_shot_set(vocabulary: Vocabulary) -> ZeroShotSet:
    """The AMA protocol of a caption vocabulary: its groups are the categories, its zero-shot
    prompts the captions, its ``edit`` templates the benchmark's prompts.  One file decides
    both what ``clipinvert caption`` labels and what AMA scores, so they cannot drift apart."""
    missing = [g.name for g in vocabulary.groups if g.edit is None]
    if missing:
        raise ValueError(f"vocabulary {vocabulary.name}: group {missing[0]} has no edit prompt")
    return ZeroShotSet(
        vocabulary.name, {g.name: g.classes for g in vocabulary.groups},
        templates={g.name: g.prompt for g in vocabulary.groups},
        edit_templates={g.name: g.edit or "" for g in vocabulary.groups},
        evaluated=vocabulary.evaluated)


def zero_shot_probabilities(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP as a zero-shot classifier: unit image embeddings (B, D) against unit prompt
    embeddings (C, D) of one category → (B, C) class probabilities (softmax of the cosine
    similarities at CLIP's logit scale).  AMA judges edits with it and ``clipinvert caption``
    labels images with it: the same rule on both sides."""
    return (CLIP_LOGIT_SCALE * images @ texts.to(images).T).softmax(dim=-1)


# AFHQ-Cats (30 classes: 16 breeds, 7 fur colours, 5 moods, 2 ages) and CUB-200-2011 (five
# attribute groups, 40 classes evaluated): the packaged vocabularies clipinvert/vocabularies/
# cats.toml and birds.toml, which say why each list is what it is.
CATS = zero_shot_set(load_vocabulary("cats"))
BIRDS = zero_shot_set(load_vocabulary("birds"))
ZERO_SHOT: dict[str, ZeroShotSet] = {"cats": CATS, "birds": BIRDS}


def choose_inputs(candidates: Mapping[str, Sequence[str]], count: int,
                  seed: int) -> dict[str, list[str]]:
    """For each target (an attribute or a combination's key), ``count`` images drawn without
    replacement, reproducibly from ``seed``, out of the target's candidates (the test images
    that lack it).  A target with fewer candidates takes them all (the caller reports it)."""
    chosen = {}
    for target, names in sorted(candidates.items()):
        rng = random.Random(f"{seed}:{target}")  # independent of the other targets
        pool = sorted(names)
        chosen[target] = sorted(rng.sample(pool, min(count, len(pool))))
    return chosen
