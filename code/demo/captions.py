"""Captions of folk tunes from their ABC header metadata, and the removal of those headers from the music.

A caption is built from what a tune's header says about it: tune type (``R:`` or a type word in
the title), genre and region (Essen's ``R:`` and ``O:``), key and mode (``K:``), meter (``M:``),
composer (``C:``), the collection, and sometimes the title. ``captions_for`` writes one caption per
field a ``demo.caption_plan`` asks for (a language and the families to choose from, written by
``demo.languages``), each chosen by a generator seeded with the piece id and the field, so a rebuild
writes the same texts.

**What the model may see.** Every header field a caption can be built from, and everything free
text could leak through, is removed from the music the model reads: ``T:`` title, ``C:`` composer,
``O:`` origin, ``R:`` rhythm/genre, ``B:`` book, ``N:`` notes, ``S:`` source, ``Z:`` transcriber,
``H:`` history, ``A:`` area, ``D:`` discography, ``F:`` file, ``G:`` group, ``W:``/``w:`` lyrics,
``%`` comments (``%%`` directives too, except the voice layout ``%%score``/``%%staves``) and the
same fields written inline (``[T:...]``). **Key (``K:``) and meter (``M:``) stay in the music**, as
they do in every real score: a caption saying "in D major, 6/8 time" repeats what the notation
itself states, which is what a text-to-music model should learn to read, not a leak of
information the score lacks.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence

from demo import content, languages

# Header fields a caption may be built from, or whose free text could name the piece.
CAPTION_SOURCE_FIELDS = frozenset("ABCDFGHNORSTWZw")
_KEPT_DIRECTIVES = ("%%score", "%%staves")  # voice layout, needed by interleaving; no free text

_FIELD_LINE = re.compile(r"^([A-Za-z+]):")
_INLINE_SOURCE_FIELD = re.compile(r"\[[" + "".join(sorted(CAPTION_SOURCE_FIELDS)) + r"]:[^\]\n]*\]")
_TRAILING_COMMENT = re.compile(r"(?<!\\)%.*$")

COLLECTIONS: dict[str, dict[str, str]] = {
    # from_*: the phrase after "from" / "aus"; *_nominative: a sentence's subject.
    "essen": {"name": "Essen Folksong Collection", "from_en": "the Essen Folksong Collection",
              "from_de": "der Essener Volksliedsammlung", "de_nominative": "Die Essener Volksliedsammlung"},
    "oneills": {"name": "O'Neill's Music of Ireland (1850)", "from_en": "O'Neill's Music of Ireland (1850)",
                "from_de": "O'Neill's Music of Ireland (1850)",
                "de_nominative": "O'Neill's Music of Ireland (1850)"},
    "ryans": {"name": "Ryan's Mammoth Collection", "from_en": "Ryan's Mammoth Collection",
              "from_de": "Ryan's Mammoth Collection", "de_nominative": "Ryan's Mammoth Collection"},
    "airds": {"name": "Aird's Airs", "from_en": "Aird's Selection of Scotch, English, Irish and Foreign Airs",
              "from_de": "Aird's Selection of Scotch, English, Irish and Foreign Airs",
              "de_nominative": "Aird's Selection of Scotch, English, Irish and Foreign Airs"},
}

# Tune types: spelling-free key -> (English, German, German gender m/f/n).
TUNE_TYPES: dict[str, tuple[str, str, str]] = {
    "reel": ("reel", "Reel", "m"), "doublejig": ("double jig", "Double Jig", "f"),
    "singlejig": ("single jig", "Single Jig", "f"), "slipjig": ("slip jig", "Slip Jig", "f"),
    "jig": ("jig", "Jig", "f"), "hornpipe": ("hornpipe", "Hornpipe", "f"),
    "strathspey": ("strathspey", "Strathspey", "m"), "clog": ("clog", "Clog", "m"),
    "highlandfling": ("Highland fling", "Highland Fling", "m"), "fling": ("fling", "Fling", "m"),
    "walkaround": ("walkaround", "Walkaround", "m"), "slide": ("slide", "Slide", "m"),
    "polka": ("polka", "Polka", "f"), "waltz": ("waltz", "Walzer", "m"), "march": ("march", "Marsch", "m"),
    "quickstep": ("quickstep", "Quickstep", "m"), "minuet": ("minuet", "Menuett", "n"),
    "setdance": ("set dance", "Set Dance", "m"), "schottische": ("schottische", "Schottisch", "m"),
    "air": ("air", "Air", "f"), "lament": ("lament", "Klagelied", "n"), "song": ("song", "Lied", "n"),
}
# Title words that name a tune type (Aird's has no R: field; Ryan's titles end in "-- Reel").
_TITLE_TYPE_WORDS = [("double jig", "doublejig"), ("slip jig", "slipjig"), ("quick step", "quickstep"),
                     ("highland fling", "highlandfling"), ("set dance", "setdance"), ("reel", "reel"),
                     ("jig", "jig"), ("hornpipe", "hornpipe"), ("strathspey", "strathspey"), ("waltz", "waltz"),
                     ("march", "march"), ("minuet", "minuet"), ("polka", "polka"), ("lament", "lament")]

# Essen genres (German R: text): first keyword found -> (English, German, gender).
ESSEN_GENRES: list[tuple[str, tuple[str, str, str]]] = [
    ("wiegen", ("lullaby", "Wiegenlied", "n")), ("kinder", ("children's song", "Kinderlied", "n")),
    ("weihnacht", ("Christmas song", "Weihnachtslied", "n")), ("hochzeit", ("wedding song", "Hochzeitslied", "n")),
    ("trink", ("drinking song", "Trinklied", "n")), ("soldaten", ("soldiers' song", "Soldatenlied", "n")),
    ("kriegs", ("soldiers' song", "Soldatenlied", "n")), ("religi", ("religious song", "geistliches Lied", "n")),
    ("geistlich", ("religious song", "geistliches Lied", "n")), ("liebe", ("love song", "Liebeslied", "n")),
    ("ballade", ("ballad", "Ballade", "f")), ("romanze", ("romance", "Romanze", "f")),
    ("tanz", ("dance song", "Tanzlied", "n")), ("arbeit", ("work song", "Arbeitslied", "n")),
    ("abschied", ("farewell song", "Abschiedslied", "n")), ("scherz", ("humorous song", "Scherzlied", "n")),
    ("klage", ("lament", "Klagelied", "n")), ("erzaehl", ("narrative song", "erzählendes Lied", "n")),
    ("xiaodiao", ("xiaodiao (Chinese ditty)", "Xiaodiao (chinesisches Lied)", "n")),
    ("shange", ("shan'ge (Chinese mountain song)", "Shange (chinesisches Berglied)", "n")),
    ("haozi", ("haozi (Chinese work song)", "Haozi (chinesisches Arbeitslied)", "n")),
]

# Essen O: place names (German, ASCII-transliterated as in the files) -> (English, German); countries
# are the ones a caption names last ("Hesse, Germany").
COUNTRIES: dict[str, tuple[str, str]] = {
    "Deutschland": ("Germany", "Deutschland"), "Luxemburg": ("Luxembourg", "Luxemburg"),
    "Frankreich": ("France", "Frankreich"), "Oesterreich": ("Austria", "Österreich"),
    "Schweiz": ("Switzerland", "Schweiz"), "Niederlande": ("the Netherlands", "Niederlande"),
    "Polen": ("Poland", "Polen"), "Ungarn": ("Hungary", "Ungarn"), "Jugoslawien": ("Yugoslavia", "Jugoslawien"),
    "Rumaenien": ("Romania", "Rumänien"), "Tschechoslowakei": ("Czechoslovakia", "Tschechoslowakei"),
    "Russland": ("Russia", "Russland"), "Ukraine": ("Ukraine", "Ukraine"), "Schweden": ("Sweden", "Schweden"),
    "Daenemark": ("Denmark", "Dänemark"), "Norwegen": ("Norway", "Norwegen"), "Irland": ("Ireland", "Irland"),
    "Italien": ("Italy", "Italien"), "Belgien": ("Belgium", "Belgien"), "China": ("China", "China"),
    "Taiwan": ("Taiwan", "Taiwan"),
}
SUBREGIONS: dict[str, tuple[str, str]] = {
    "Lothringen": ("Lorraine", "Lothringen"), "Elsass": ("Alsace", "Elsass"), "Tirol": ("Tyrol", "Tirol"),
    "Steiermark": ("Styria", "Steiermark"), "Schlesien": ("Silesia", "Schlesien"),
    "Pommern": ("Pomerania", "Pommern"), "Ostpreussen": ("East Prussia", "Ostpreußen"),
    "Siebenbuergen": ("Transylvania", "Siebenbürgen"), "Hessen": ("Hesse", "Hessen"),
    "Brandenburg": ("Brandenburg", "Brandenburg"), "Sachsen": ("Saxony", "Sachsen"),
    "Rheinland": ("Rhineland", "Rheinland"), "Westfalen": ("Westphalia", "Westfalen"), "Baden": ("Baden", "Baden"),
    "Bayern": ("Bavaria", "Bayern"), "Schwaben": ("Swabia", "Schwaben"), "Franken": ("Franconia", "Franken"),
    "Thueringen": ("Thuringia", "Thüringen"), "Sudetenland": ("Sudetenland", "Sudetenland"),
    "Galizien": ("Galicia", "Galizien"), "Gottschee": ("Gottschee", "Gottschee"),
}

_MODES = {  # ABC mode spellings -> the mode (demo.languages names it in each language)
    "": "major", "maj": "major", "major": "major", "ion": "major", "ionian": "major", "m": "minor", "min": "minor",
    "minor": "minor", "aeo": "minor", "aeolian": "minor", "dor": "dorian", "dorian": "dorian", "phr": "phrygian",
    "phrygian": "phrygian", "lyd": "lydian", "lydian": "lydian", "mix": "mixolydian", "mixolydian": "mixolydian",
    "loc": "locrian", "locrian": "locrian",
}
_KEY = re.compile(r"^([A-Ga-g])([#b]?)\s*([A-Za-z]*)")


# ----------------------------------------------------------------------------- the model's input


def _cleaned_lines(abc_text: str) -> list[tuple[str, str | None]]:
    """Each line with what remains of it once caption sources are removed (None: the whole line goes)."""
    result: list[tuple[str, str | None]] = []
    dropping_continuation = False
    for line in abc_text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("%"):
            result.append((line, line if stripped.startswith(_KEPT_DIRECTIVES) else None))
            continue
        field = _FIELD_LINE.match(stripped)
        if field and field.group(1) == "+":  # "+:" continues the previous field line
            result.append((line, None if dropping_continuation else line))
            continue
        if field:
            dropping_continuation = field.group(1) in CAPTION_SOURCE_FIELDS
            if dropping_continuation:
                result.append((line, None))
                continue
        cleaned = _INLINE_SOURCE_FIELD.sub("", _TRAILING_COMMENT.sub("", line))
        if cleaned != line:
            cleaned = cleaned.rstrip()
            result.append((line, cleaned if cleaned.strip() else None))
        else:
            result.append((line, line))
    return result


def strip_caption_sources(abc_text: str) -> str:
    """``abc_text`` without the fields and comments captions are built from (see the module
    docstring); ``X:``, ``K:``, ``M:``, ``L:``, ``Q:``, voices and the music are kept byte for byte."""
    return "\n".join(kept for _, kept in _cleaned_lines(abc_text) if kept is not None)


def caption_source_lines(abc_text: str) -> list[str]:
    """The lines of ``abc_text`` that carry a caption source (empty when the text is clean)."""
    return [line for line, kept in _cleaned_lines(abc_text) if kept != line]


# ----------------------------------------------------------------------------- metadata


def _header_fields(abc_text: str) -> dict[str, list[str]]:
    """Header field values up to the first ``K:`` line (the ``K:`` included), in order."""
    fields: dict[str, list[str]] = {}
    for line in abc_text.splitlines():
        match = re.match(r"^([A-Za-z]):\s*(.*?)\s*$", line)
        if not match:
            continue
        fields.setdefault(match.group(1), []).append(match.group(2))
        if match.group(1) == "K":
            break
    return fields


def _tidy(text: str) -> str:
    text = " ".join(text.strip().strip('"').split()).rstrip(".").strip()
    letters = [c for c in text if c.isalpha()]
    if letters and all(c.isupper() for c in letters):  # ALL-CAPS headings of Ryan's
        text = re.sub(r"[A-Za-z]+('[a-z])?", lambda m: m.group().capitalize(), text.lower())
    return text


def _type_key(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def tune_type_of(rhythm: str | None, titles: list[str]) -> str | None:
    """The ``TUNE_TYPES`` key named by an ``R:`` value, else by a type word in a title."""
    if rhythm:
        key = _type_key(rhythm)
        if key in TUNE_TYPES:
            return key
        if key.endswith("s") and key[:-1] in TUNE_TYPES:
            return key[:-1]
    for title in titles:
        lowered = title.lower()
        for word, key in _TITLE_TYPE_WORDS:
            if re.search(rf"\b{word}s?\b", lowered):
                return key
    return None


def essen_genre(rhythm: str | None) -> tuple[str, str, str] | None:
    lowered = (rhythm or "").lower().replace(" ", "").replace("-", "")
    return next((genre for word, genre in ESSEN_GENRES if word in lowered), None)


def essen_region(origin: str | None) -> tuple[str, str] | None:
    """(English, German) place of an Essen ``O:`` value: "Hesse, Germany", "Shaanxi, China"."""
    if not origin:
        return None
    tokens = [re.sub(r"\(.*?\)", "", t).strip() for t in re.split(r"[,;/]", origin.rstrip("]"))]
    tokens = [t for t in tokens if t]
    countries = [t for t in tokens if t in COUNTRIES]
    subregions = [t for t in tokens if t in SUBREGIONS]
    if not countries and not subregions:
        return None
    if not countries:
        return SUBREGIONS[subregions[-1]]
    country = countries[0]
    en, de = COUNTRIES[country]
    if subregions:
        sub_en, sub_de = SUBREGIONS[subregions[-1]]
        return f"{sub_en}, {en}", f"{sub_de}, {de}"
    if country == "China":  # Chinese provinces are proper names, the same in both languages
        after = tokens[tokens.index(country) + 1:]
        if after and re.fullmatch(r"[A-Z][a-z]+", after[0]) and after[0] not in COUNTRIES:
            return f"{after[0]}, China", f"{after[0]}, China"
    return en, de


def key_parts(value: str | None) -> tuple[str, str, str] | None:
    """(tonic letter, accidental ``""``/``#``/``b``, mode) of a ``K:`` value, None when it names no key."""
    match = _KEY.match((value or "").strip())
    if not match or match.group(3).lower() not in _MODES:
        return None
    return match.group(1).upper(), match.group(2), _MODES[match.group(3).lower()]


def parse_key(value: str | None) -> tuple[str, str, str, str] | None:
    """(tonic, English mode, German tonic, German mode) of a ``K:`` value, None when it names no key."""
    parts = key_parts(value)
    if parts is None:
        return None
    letter, accidental, mode = parts
    tonic_de = languages.tonic_name(letter, accidental, "de")
    return (languages.tonic_name(letter, accidental, "en"), languages.mode_name(mode, "en"),
            tonic_de.lower() if mode == "minor" else tonic_de, languages.mode_name(mode, "de"))


def parse_meter(value: str | None) -> str | None:
    value = (value or "").strip()
    if value == "C":
        return "4/4"
    if value == "C|":
        return "2/2"
    return value if re.fullmatch(r"\d+/\d+", value) else None


def tune_metadata(abc_text: str, collection: str) -> dict[str, str]:
    """The caption facts of one tune's header: collection, title, tune_type, genre_en/_de/_gender,
    region_en/_de, key_en/_de, meter, composer (only what the header states)."""
    fields = _header_fields(abc_text)
    titles = [_tidy(t) for t in fields.get("T", []) if _tidy(t)]
    rhythm = (fields.get("R") or [None])[0]
    meta: dict[str, str] = {"collection": collection}
    if titles:
        meta["title"] = titles[0]
    if collection == "essen":
        genre = essen_genre(rhythm)
        if genre:
            meta["genre_en"], meta["genre_de"], meta["genre_gender"] = genre
        region = essen_region((fields.get("O") or [None])[0])
        if region:
            meta["region_en"], meta["region_de"] = region
    else:
        tune_type = tune_type_of(rhythm, titles)
        if tune_type:
            meta["tune_type"] = tune_type
    key = key_parts((fields.get("K") or [None])[-1])
    if key:
        meta["tonic"], meta["accidental"], meta["mode"] = key
        meta["key_en"], meta["key_de"] = languages.key_name(meta, "en"), languages.key_name(meta, "de")
    meter = parse_meter((fields.get("M") or [None])[0])
    if meter:
        meta["meter"] = meter
    composer = _tidy((fields.get("C") or [""])[0])
    if composer and composer.lower() not in {"trad", "traditional", "anon", "anonymous", "unknown"}:
        meta["composer"] = composer
    meta["noun_en"], meta["noun_de"], meta["noun_gender"] = _nouns(meta)
    meta["collection_name"] = COLLECTIONS[collection]["from_en"]
    return meta


def all_titles(abc_text: str) -> list[str]:
    """Every ``T:`` of a tune's header, tidied (a tune may have alternative titles)."""
    return [t for t in (_tidy(v) for v in _header_fields(abc_text).get("T", [])) if t]


# ----------------------------------------------------------------------------- captions


def _nouns(meta: dict[str, str]) -> tuple[str, str, str]:
    if "tune_type" in meta:
        return TUNE_TYPES[meta["tune_type"]]
    if "genre_en" in meta:
        return meta["genre_en"], meta["genre_de"], meta.get("genre_gender", "n")
    if meta.get("collection") == "essen":
        return "folk song", "Volkslied", "n"
    return "tune", "Melodie", "f"


def _generator(rng_seed: int | str) -> random.Random:
    digest = hashlib.sha256(str(rng_seed).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def captions_for(metadata: dict[str, str], rng_seed: int | str,
                 fields: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, str]:
    """One caption per field of ``fields`` (name -> (language, the families to choose from)), from
    ``tune_metadata``'s facts only, each chosen by a generator seeded with ``rng_seed`` and the
    field's name (so adding a field changes no other). The title appears in some frames, always
    beside the type and the collection, never on its own."""
    return _written(languages.caption, metadata, rng_seed, fields)


def content_captions_for(facts: dict, rng_seed: int | str, fields: Mapping[str, tuple[str, Sequence[str]]]
                         ) -> dict[str, str]:
    """``captions_for`` for content descriptions: one per field, from ``demo.content.mtf_facts``' facts."""
    return _written(content.content_caption, facts, rng_seed, fields)


def _written(write: Callable[[dict, str, str, random.Random], str], facts: dict, rng_seed: int | str,
             fields: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, str]:
    """``write(facts, language, family, rng)`` once per field, the family and frame drawn by a
    generator seeded with ``rng_seed`` and the field's name."""
    captions = {}
    for name, (language, families) in fields.items():
        rng = _generator(f"{rng_seed}:{name}")
        captions[name] = write(facts, language, rng.choice(list(families)), rng)
    return captions
