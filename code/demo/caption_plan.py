"""Which caption fields the demo's training and test records get: the plan in
``configs/demo_captions.json``, fixed before training.

Training records (base and adapters) get one caption per training language, written in one of the
training families (``caption_<lang>``), and, where the tune has a MIDI rendering, a content
description per content language in a training content family (``content_<lang>``). Test records
get the same fields (the in-family rows) and three kinds of held-out field, each its own row in the
report:

* ``heldout_family_<lang>``: a training language written in a held-out family (frames, word order
  and fact renderings no training step saw);
* ``heldout_language_<lang>``: a language no training step saw, in the training families;
* ``heldout_content_<lang>``: a content description in a held-out content family.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fileio import REPO_ROOT

from demo.content import CONTENT_FAMILIES, CONTENT_LANGUAGES
from demo.languages import FAMILIES, LANGUAGES

PLAN_PATH = REPO_ROOT / "configs" / "demo_captions.json"
# Bump when the caption generator writes other texts for the same plan (frames, vocabulary).
CAPTIONS_VERSION = 2
FieldSpec = dict[str, tuple[str, tuple[str, ...]]]  # field -> (language, families to choose from)


@dataclass(frozen=True)
class CaptionPlan:
    training_languages: tuple[str, ...]
    held_out_languages: tuple[str, ...]
    training_families: tuple[str, ...]
    held_out_families: tuple[str, ...]
    content_languages: tuple[str, ...]
    content_training_families: tuple[str, ...]
    content_held_out_families: tuple[str, ...]

    def __post_init__(self) -> None:
        for name, values, allowed in (
                ("training_languages", self.training_languages, LANGUAGES),
                ("held_out_languages", self.held_out_languages, LANGUAGES),
                ("training_families", self.training_families, FAMILIES),
                ("held_out_families", self.held_out_families, FAMILIES),
                ("content_languages", self.content_languages, CONTENT_LANGUAGES),
                ("content_training_families", self.content_training_families, CONTENT_FAMILIES),
                ("content_held_out_families", self.content_held_out_families, CONTENT_FAMILIES)):
            unknown = sorted(set(values) - set(allowed))
            if unknown or not values:
                raise ValueError(f"{name}: {unknown or 'empty'}; expected some of {allowed}")
        for trained, held, what in ((self.training_languages, self.held_out_languages, "languages"),
                                    (self.training_families, self.held_out_families, "families"),
                                    (self.content_training_families, self.content_held_out_families,
                                     "content families")):
            if set(trained) & set(held):
                raise ValueError(f"{what} both trained on and held out: {sorted(set(trained) & set(held))}")
        if not set(self.content_languages) <= set(self.training_languages):
            raise ValueError("content_languages must be training languages")

    @classmethod
    def load(cls, path: str | Path = PLAN_PATH) -> CaptionPlan:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{name: tuple(data[name]) for name in cls.__dataclass_fields__})

    def fingerprint(self) -> str:
        """What a corpus's captions were written with: this plan and the generator's version."""
        text = json.dumps({"plan": asdict(self), "captions_version": CAPTIONS_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def training_fields(self) -> FieldSpec:
        return {f"caption_{lang}": (lang, self.training_families) for lang in self.training_languages}

    def content_training_fields(self) -> FieldSpec:
        return {f"content_{lang}": (lang, self.content_training_families) for lang in self.content_languages}

    def test_fields(self) -> FieldSpec:
        """Every test field: the in-family ones first, then the held-out family, language and content ones."""
        return {**self.training_fields(),
                **{f"heldout_family_{lang}": (lang, self.held_out_families) for lang in self.training_languages},
                **{f"heldout_language_{lang}": (lang, self.training_families) for lang in self.held_out_languages}}

    def content_test_fields(self) -> FieldSpec:
        return {**self.content_training_fields(),
                **{f"heldout_content_{lang}": (lang, self.content_held_out_families)
                   for lang in self.content_languages}}


def field_kind(field_name: str) -> str:
    """``in-family``, ``held-out family``, ``held-out language``, ``content`` or ``held-out content``."""
    for prefix, kind in (("heldout_family_", "held-out family"), ("heldout_language_", "held-out language"),
                         ("heldout_content_", "held-out content"), ("content_", "content"),
                         ("caption_", "in-family")):
        if field_name.startswith(prefix):
            return kind
    return "other"
