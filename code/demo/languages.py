"""How each of the demo's caption languages names the facts of a tune, and the caption families.

A **family** is an independent way of writing a caption: its own sentence frames, word order, and
renderings of the same facts ("in D major" / "D-maj" / "key of D, major mode"; "6/8" /
"six-eight" / "jig time"). A family is written in every language with the names that language
really uses for keys: letter names in English, German (with H and B, Fis, Es) and Dutch (Fis, Bes),
solfège in French, Spanish and Italian (ré majeur, re mayor, re maggiore). Which families and
languages the demo trains on and which it holds out is ``configs/demo_captions.json``'s; this
module only writes.

``caption(meta, language, family, rng)`` writes one caption from ``demo.captions.tune_metadata``'s
facts; ``rng`` picks one of the family's frames.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LANGUAGES = ("en", "de", "fr", "es", "it", "nl")
FAMILIES = ("sentence", "tag", "catalogue")

# ------------------------------------------------------------------------------------- keys

_SOLFEGE = {"fr": dict(zip("CDEFGAB", ("do", "ré", "mi", "fa", "sol", "la", "si"), strict=True)),
            "es": dict(zip("CDEFGAB", ("do", "re", "mi", "fa", "sol", "la", "si"), strict=True)),
            "it": dict(zip("CDEFGAB", ("do", "re", "mi", "fa", "sol", "la", "si"), strict=True))}
_SOLFEGE_ACCIDENTALS = {"fr": {"#": " dièse", "b": " bémol"}, "es": {"#": " sostenido", "b": " bemol"},
                        "it": {"#": " diesis", "b": " bemolle"}}
_MODE_NAMES = {
    "en": {"major": "major", "minor": "minor", "dorian": "Dorian", "phrygian": "Phrygian", "lydian": "Lydian",
           "mixolydian": "Mixolydian", "locrian": "Locrian"},
    "de": {"major": "Dur", "minor": "Moll", "dorian": "Dorisch", "phrygian": "Phrygisch", "lydian": "Lydisch",
           "mixolydian": "Mixolydisch", "locrian": "Lokrisch"},
    "nl": {"major": "majeur", "minor": "mineur", "dorian": "Dorisch", "phrygian": "Frygisch", "lydian": "Lydisch",
           "mixolydian": "Mixolydisch", "locrian": "Locrisch"},
    "fr": {"major": "majeur", "minor": "mineur", "dorian": "dorien", "phrygian": "phrygien", "lydian": "lydien",
           "mixolydian": "mixolydien", "locrian": "locrien"},
    "es": {"major": "mayor", "minor": "menor", "dorian": "dórico", "phrygian": "frigio", "lydian": "lidio",
           "mixolydian": "mixolidio", "locrian": "locrio"},
    "it": {"major": "maggiore", "minor": "minore", "dorian": "dorico", "phrygian": "frigio", "lydian": "lidio",
           "mixolydian": "misolidio", "locrian": "locrio"},
}
# Short forms a compact caption uses.
_MODE_SHORT = {"en": {"major": "maj", "minor": "min"}, "de": {"major": "Dur", "minor": "Moll"},
               "nl": {"major": "gr.", "minor": "kl."}, "fr": {"major": "maj.", "minor": "min."},
               "es": {"major": "M", "minor": "m"}, "it": {"major": "magg.", "minor": "min."}}
_GERMAN_TONICS = {"B": "H", "Bb": "B", "Eb": "Es", "Ab": "As", "Db": "Des", "Gb": "Ges", "Cb": "Ces", "Fb": "Fes"}
_DUTCH_TONICS = {"Eb": "Es", "Ab": "As"}


def tonic_name(letter: str, accidental: str, language: str) -> str:
    """The tonic as ``language`` names it: ``F-sharp``, ``Fis``, ``fa dièse``, ``fa sostenido``..."""
    if language in _SOLFEGE:
        return _SOLFEGE[language][letter] + _SOLFEGE_ACCIDENTALS[language].get(accidental, "")
    if language == "de":
        return _GERMAN_TONICS.get(letter + accidental, letter + ("is" if accidental == "#" else ""))
    if language == "nl":
        return _DUTCH_TONICS.get(letter + accidental, letter + {"#": "is", "b": "es"}.get(accidental, ""))
    return letter + {"#": "-sharp", "b": "-flat"}.get(accidental, "")


def mode_name(mode: str, language: str) -> str:
    """A mode (``major``, ``minor``, ``dorian``...) as ``language`` names it: Dur, mineur, dórico..."""
    return _MODE_NAMES[language][mode]


def key_name(meta: dict[str, str], language: str, style: str = "plain") -> str | None:
    """The key of ``meta`` (``tonic``, ``accidental``, ``mode``) in ``language``; ``style`` is
    ``plain`` (D major, D-Dur, ré majeur), ``short`` (D maj, re M) or ``spelled`` (key of D, major
    mode; Tonart D-Dur; tonalité de ré majeur). None when the header names no key."""
    if "tonic" not in meta:
        return None
    tonic = tonic_name(meta["tonic"], meta.get("accidental", ""), language)
    mode = meta["mode"]
    if language in ("de", "nl") and mode == "minor":
        tonic = tonic.lower()
    name = mode_name(mode, language)
    if style == "short":
        name = _MODE_SHORT[language].get(mode, name)
    if language == "en":
        return {"plain": f"{tonic} {name}", "short": f"{tonic} {name}",
                "spelled": f"the key of {tonic}, {name} mode" if mode not in ("major", "minor")
                else f"the key of {tonic} {name}"}[style]
    if language == "de":
        return {"plain": f"{tonic}-{name}", "short": f"{tonic}-{name}", "spelled": f"der Tonart {tonic}-{name}"}[style]
    if language == "nl":
        return {"plain": f"{tonic} {name}", "short": f"{tonic} {name}", "spelled": f"de toonsoort {tonic} {name}"}[style]
    if style == "short":
        return f"{tonic[0].upper()}{tonic[1:]} {name}"
    spelled = {"fr": f"la tonalité de {tonic} {name}", "es": f"la tonalidad de {tonic} {name}",
               "it": f"la tonalità di {tonic} {name}"}
    return spelled[language] if style == "spelled" else f"{tonic} {name}"


# ------------------------------------------------------------------------------------- meters

_METER_WORDS = {
    "en": {"2/4": "two-four", "3/4": "three-four", "4/4": "four-four", "6/8": "six-eight", "9/8": "nine-eight",
           "12/8": "twelve-eight", "2/2": "two-two", "3/8": "three-eight", "3/2": "three-two"},
    "de": {"2/4": "Zweivierteltakt", "3/4": "Dreivierteltakt", "4/4": "Viervierteltakt", "6/8": "Sechsachteltakt",
           "9/8": "Neunachteltakt", "12/8": "Zwölfachteltakt", "2/2": "Alla-breve-Takt", "3/8": "Dreiachteltakt",
           "3/2": "Dreihalbetakt"},
    "nl": {"2/4": "tweekwartsmaat", "3/4": "driekwartsmaat", "4/4": "vierkwartsmaat", "6/8": "zesachtstemaat",
           "9/8": "negenachtstemaat", "12/8": "twaalfachtstemaat", "2/2": "alla-brevemaat", "3/8": "drieachtstemaat",
           "3/2": "driehalvemaat"},
    "fr": {"2/4": "deux-quatre", "3/4": "trois-quatre", "4/4": "quatre-quatre", "6/8": "six-huit", "9/8": "neuf-huit",
           "12/8": "douze-huit", "2/2": "deux-deux", "3/8": "trois-huit", "3/2": "trois-deux"},
    "es": {"2/4": "dos por cuatro", "3/4": "tres por cuatro", "4/4": "cuatro por cuatro", "6/8": "seis por ocho",
           "9/8": "nueve por ocho", "12/8": "doce por ocho", "2/2": "dos por dos", "3/8": "tres por ocho",
           "3/2": "tres por dos"},
    "it": {"2/4": "due quarti", "3/4": "tre quarti", "4/4": "quattro quarti", "6/8": "sei ottavi",
           "9/8": "nove ottavi", "12/8": "dodici ottavi", "2/2": "due mezzi", "3/8": "tre ottavi", "3/2": "tre mezzi"},
}
# What players call a meter by the dance or the tradition (English only has many).
_METER_NAMES = {"en": {"4/4": "common time", "2/2": "cut time", "6/8": "jig time", "9/8": "slip-jig time",
                       "3/4": "waltz time", "2/4": "march time"},
                "de": {"2/2": "Alla-breve-Takt", "3/4": "Walzertakt"}, "nl": {"2/2": "alla breve", "3/4": "walsmaat"},
                "fr": {"3/4": "à trois temps", "2/4": "à deux temps", "4/4": "à quatre temps", "2/2": "alla breve"},
                "es": {"4/4": "compasillo", "2/2": "compás partido", "3/4": "compás de vals"},
                "it": {"4/4": "tempo ordinario", "2/2": "tempo tagliato", "3/4": "tempo di valzer"}}


def meter_phrase(meter: str, language: str, style: str) -> str:
    """A meter as a phrase that follows a noun: ``numeric`` (in 6/8 time, im 6/8-Takt), ``words``
    (in six-eight, im Sechsachteltakt, en six-huit) or ``named`` (in jig time, à trois temps; the
    words where the language has no name for that meter)."""
    named = _METER_NAMES[language].get(meter) if style == "named" else None
    words = _METER_WORDS[language].get(meter)
    if style == "numeric" or words is None:
        return {"en": f"in {meter} time", "de": f"im {meter}-Takt", "nl": f"in {meter}-maat",
                "fr": f"à {meter}", "es": f"en compás de {meter}", "it": f"in {meter}"}[language]
    if named is not None:
        if language == "en":
            return f"in {named}"
        if language == "fr" and named.startswith("à "):
            return named
        return {"de": f"im {named}", "nl": f"in {named}", "fr": f"en {named}", "es": f"en {named}",
                "it": f"in {named}"}[language]
    return {"en": f"in {words}", "de": f"im {words}", "nl": f"in {words}", "fr": f"en {words}",
            "es": f"en {words}", "it": f"in {words}"}[language]


# ------------------------------------------------------------------------------------- nouns

# English noun -> {language: (noun, gender)}: gender m/f/n for the articles (nl has one article).
_NOUNS: dict[str, dict[str, tuple[str, str]]] = {
    "reel": {"fr": ("reel", "m"), "es": ("reel", "m"), "it": ("reel", "m"), "nl": ("reel", "")},
    "double jig": {"fr": ("gigue double", "f"), "es": ("giga doble", "f"), "it": ("giga doppia", "f"),
                   "nl": ("dubbele jig", "")},
    "single jig": {"fr": ("gigue simple", "f"), "es": ("giga sencilla", "f"), "it": ("giga semplice", "f"),
                   "nl": ("enkele jig", "")},
    "slip jig": {"fr": ("slip jig", "f"), "es": ("slip jig", "f"), "it": ("slip jig", "f"), "nl": ("slip jig", "")},
    "jig": {"fr": ("gigue", "f"), "es": ("giga", "f"), "it": ("giga", "f"), "nl": ("jig", "")},
    "hornpipe": {"fr": ("hornpipe", "m"), "es": ("hornpipe", "m"), "it": ("hornpipe", "m"), "nl": ("hornpipe", "")},
    "strathspey": {"fr": ("strathspey", "m"), "es": ("strathspey", "m"), "it": ("strathspey", "m"),
                   "nl": ("strathspey", "")},
    "polka": {"fr": ("polka", "f"), "es": ("polca", "f"), "it": ("polka", "f"), "nl": ("polka", "")},
    "waltz": {"fr": ("valse", "f"), "es": ("vals", "m"), "it": ("valzer", "m"), "nl": ("wals", "")},
    "march": {"fr": ("marche", "f"), "es": ("marcha", "f"), "it": ("marcia", "f"), "nl": ("mars", "")},
    "minuet": {"fr": ("menuet", "m"), "es": ("minué", "m"), "it": ("minuetto", "m"), "nl": ("menuet", "")},
    "schottische": {"fr": ("scottish", "f"), "es": ("chotis", "m"), "it": ("scottish", "f"),
                    "nl": ("schottische", "")},
    "air": {"fr": ("air", "m"), "es": ("aire", "m"), "it": ("aria", "f"), "nl": ("air", "")},
    "lament": {"fr": ("complainte", "f"), "es": ("lamento", "m"), "it": ("lamento", "m"), "nl": ("klaagzang", "")},
    "song": {"fr": ("chanson", "f"), "es": ("canción", "f"), "it": ("canzone", "f"), "nl": ("lied", "")},
    "folk song": {"fr": ("chanson populaire", "f"), "es": ("canción popular", "f"), "it": ("canto popolare", "m"),
                  "nl": ("volkslied", "")},
    "tune": {"fr": ("air", "m"), "es": ("melodía", "f"), "it": ("melodia", "f"), "nl": ("melodie", "")},
    "lullaby": {"fr": ("berceuse", "f"), "es": ("canción de cuna", "f"), "it": ("ninna nanna", "f"),
                "nl": ("wiegelied", "")},
    "children's song": {"fr": ("chanson enfantine", "f"), "es": ("canción infantil", "f"),
                        "it": ("canzone per bambini", "f"), "nl": ("kinderlied", "")},
    "Christmas song": {"fr": ("chant de Noël", "m"), "es": ("villancico", "m"), "it": ("canto natalizio", "m"),
                       "nl": ("kerstlied", "")},
    "wedding song": {"fr": ("chant de noces", "m"), "es": ("canción de boda", "f"), "it": ("canto nuziale", "m"),
                     "nl": ("bruiloftslied", "")},
    "drinking song": {"fr": ("chanson à boire", "f"), "es": ("canción báquica", "f"),
                      "it": ("canzone da osteria", "f"), "nl": ("drinklied", "")},
    "soldiers' song": {"fr": ("chanson de soldats", "f"), "es": ("canción de soldados", "f"),
                       "it": ("canto di soldati", "m"), "nl": ("soldatenlied", "")},
    "religious song": {"fr": ("cantique", "m"), "es": ("canto religioso", "m"), "it": ("canto religioso", "m"),
                       "nl": ("geestelijk lied", "")},
    "love song": {"fr": ("chanson d'amour", "f"), "es": ("canción de amor", "f"), "it": ("canzone d'amore", "f"),
                  "nl": ("liefdeslied", "")},
    "ballad": {"fr": ("ballade", "f"), "es": ("balada", "f"), "it": ("ballata", "f"), "nl": ("ballade", "")},
    "dance song": {"fr": ("chanson à danser", "f"), "es": ("canción de baile", "f"), "it": ("canzone a ballo", "f"),
                   "nl": ("danslied", "")},
    "work song": {"fr": ("chant de travail", "m"), "es": ("canción de trabajo", "f"), "it": ("canto di lavoro", "m"),
                  "nl": ("werklied", "")},
    "farewell song": {"fr": ("chant d'adieu", "m"), "es": ("canción de despedida", "f"),
                      "it": ("canto d'addio", "m"), "nl": ("afscheidslied", "")},
    "narrative song": {"fr": ("chanson narrative", "f"), "es": ("canción narrativa", "f"),
                       "it": ("canto narrativo", "m"), "nl": ("verhalend lied", "")},
}
_COUNTRIES = {  # English -> fr, es, it, nl (others keep their English name)
    "Germany": ("Allemagne", "Alemania", "Germania", "Duitsland"), "France": ("France", "Francia", "Francia", "Frankrijk"),
    "Austria": ("Autriche", "Austria", "Austria", "Oostenrijk"), "Switzerland": ("Suisse", "Suiza", "Svizzera", "Zwitserland"),
    "the Netherlands": ("Pays-Bas", "Países Bajos", "Paesi Bassi", "Nederland"),
    "Poland": ("Pologne", "Polonia", "Polonia", "Polen"), "Hungary": ("Hongrie", "Hungría", "Ungheria", "Hongarije"),
    "China": ("Chine", "China", "Cina", "China"), "Italy": ("Italie", "Italia", "Italia", "Italië"),
    "Luxembourg": ("Luxembourg", "Luxemburgo", "Lussemburgo", "Luxemburg"),
    "Russia": ("Russie", "Rusia", "Russia", "Rusland"), "Ireland": ("Irlande", "Irlanda", "Irlanda", "Ierland"),
}
_COUNTRY_COLUMN = {"fr": 0, "es": 1, "it": 2, "nl": 3}


def noun_of(meta: dict[str, str], language: str) -> tuple[str, str]:
    """(noun, gender) of what the tune is (its type, genre, or folk song / tune) in ``language``."""
    english, german, gender = meta["noun_en"], meta["noun_de"], meta.get("noun_gender", "n")
    if language == "en":
        return english, ""
    if language == "de":
        return german, gender
    entry = _NOUNS.get(english) or _NOUNS.get(meta.get("noun_kind", "")) or _NOUNS["folk song"]
    return entry[language]


def region_of(meta: dict[str, str], language: str) -> str | None:
    if "region_en" not in meta:
        return None
    if language in ("en", "de"):
        return meta[f"region_{language}"]
    parts = meta["region_en"].split(", ")
    if parts[-1] in _COUNTRIES:
        parts[-1] = _COUNTRIES[parts[-1]][_COUNTRY_COLUMN[language]]
    return ", ".join(parts)


def indefinite(noun: str, gender: str, language: str) -> str:
    """``a reel``, ``eine Jig``, ``une gigue``, ``un reel``, ``una giga``, ``un'aria``, ``een reel``."""
    if language == "en":
        return ("an " if noun[0].lower() in "aeiou" else "a ") + noun
    if language == "de":
        return ("eine " if gender == "f" else "ein ") + noun
    if language == "nl":
        return "een " + noun
    if language == "fr":
        return ("une " if gender == "f" else "un ") + noun
    if language == "es":
        return ("una " if gender == "f" else "un ") + noun
    if gender == "f":  # it
        return ("un'" if noun[0].lower() in "aeiou" else "una ") + noun
    return ("uno " if noun[:2].lower() in ("sc", "st", "sp", "gn", "ps", "z") else "un ") + noun


# ------------------------------------------------------------------------------------- sources

_SOURCE_WORD = {"en": "Source", "de": "Quelle", "nl": "Bron", "fr": "Source", "es": "Fuente", "it": "Fonte"}
_ESSEN = {"en": "the Essen Folksong Collection", "de": "der Essener Volksliedsammlung",
          "nl": "de Essense volksliedcollectie", "fr": "le recueil de chants populaires d'Essen",
          "es": "la colección de canciones populares de Essen", "it": "la raccolta di canti popolari di Essen"}
_ESSEN_NAME = {"en": "Essen Folksong Collection", "de": "Essener Volksliedsammlung",
               "nl": "Essense volksliedcollectie", "fr": "Recueil de chants populaires d'Essen",
               "es": "Colección de canciones populares de Essen", "it": "Raccolta di canti popolari di Essen"}


def source_from(meta: dict[str, str], language: str, gender: str = "") -> str:
    """"from <the collection>" in ``language`` (aus der Essener..., tiré(e) du recueil..., de la
    colección...); ``gender``: the noun's, for French agreement."""
    name = meta["collection_name"]
    drawn = agree("tiré", gender, "fr")
    if meta["collection"] == "essen":
        phrase = _ESSEN[language]
        return {"en": f"from {phrase}", "de": f"aus {phrase}", "nl": f"uit {phrase}",
                "fr": f"{drawn} du " + phrase.removeprefix("le "), "es": f"de {phrase}",
                "it": "dalla " + phrase.removeprefix("la ")}[language]
    return {"en": f"from {name}", "de": f"aus {name}", "nl": f"uit {name}", "fr": f"{drawn} {_de_fr(name)}",
            "es": f"de {name}", "it": f"da {name}"}[language]


def source_name(meta: dict[str, str], language: str) -> str:
    return _ESSEN_NAME[language] if meta["collection"] == "essen" else meta["collection_name"]


def _by(meta: dict[str, str], language: str) -> str:
    if "composer" not in meta:
        return ""
    word = {"en": "by", "de": "von", "nl": "van", "fr": "de", "es": "de", "it": "di"}[language]
    return f" {word} {meta['composer']}"


def _from_region(meta: dict[str, str], language: str) -> str:
    region = region_of(meta, language)
    if not region:
        return ""
    if language == "fr":
        return " " + _de_fr(region)
    word = {"en": "from", "de": "aus", "nl": "uit", "es": "de", "it": "da"}[language]
    return f" {word} {region}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _de_fr(word: str) -> str:
    """French "de" before a word, elided before a vowel (d'Allemagne)."""
    return f"d'{word}" if word[:1].lower() in "aeiouhéâ" else f"de {word}"


def agree(participle: str, gender: str, language: str) -> str:
    """A participle agreeing with a feminine noun: tiré -> tirée, recogido -> recogida, raccolto -> raccolta."""
    if gender != "f":
        return participle
    if language == "fr":
        return participle + "e"
    if language in ("es", "it") and participle.endswith("o"):
        return participle[:-1] + "a"
    return participle


def source_in(meta: dict[str, str], language: str) -> str:
    """"in <the collection>": in the Essen Folksong Collection, in der Essener..., dans le recueil..."""
    if meta["collection"] == "essen":
        phrase = _ESSEN[language]
        return {"en": f"in {phrase}", "de": f"in {phrase}", "nl": f"in {phrase}", "fr": f"dans {phrase}",
                "es": f"en {phrase}", "it": "nella " + phrase.removeprefix("la ")}[language]
    name = meta["collection_name"]
    return {"en": f"in {name}", "de": f"in {name}", "nl": f"in {name}", "fr": f"dans {name}", "es": f"en {name}",
            "it": f"in {name}"}[language]


# ------------------------------------------------------------------------------------- families

def _in_key(meta: dict[str, str], language: str, style: str = "plain") -> str:
    key = key_name(meta, language, style)
    if key is None:
        return ""
    return {"en": f" in {key}", "de": f" in {key}", "nl": f" in {key}", "fr": f" en {key}", "es": f" en {key}",
            "it": f" in {key}"}[language]


def _meter(meta: dict[str, str], language: str, style: str) -> str:
    return f" {meter_phrase(meta['meter'], language, style)}" if "meter" in meta else ""


def _sentence_frames(meta: dict[str, str], language: str) -> list[Callable[[], str]]:
    """Full sentences, the facts after the noun, the key as players say it, the meter in figures."""
    noun, gender = noun_of(meta, language)
    thing = indefinite(noun, gender, language)
    key, meter, region, by = _in_key(meta, language), _meter(meta, language, "numeric"), _from_region(meta, language), _by(meta, language)
    source = source_from(meta, language, gender)
    frames = [lambda: _capital(f"{thing}{region}{key}{meter}{by}, {source}."),
              lambda: f"{_capital(source_name(meta, language))}: {thing}{key}{meter}{region}{by}."]
    if "title" in meta:
        quote = {"en": "\u201c{}\u201d", "de": "\u201e{}\u201c", "nl": "\u2018{}\u2019", "fr": "\u00ab\u00a0{}\u00a0\u00bb",
                 "es": "\u00ab{}\u00bb", "it": "\u00ab{}\u00bb"}[language].format(meta["title"])
        frames.append(lambda: f"{quote}, {thing}{key}{by}, {source}.")
    return frames


def _tag_frames(meta: dict[str, str], language: str) -> list[Callable[[], str]]:
    """Compact lists: noun first, short key names, figures for the meter, a source label."""
    noun, _ = noun_of(meta, language)
    facts = [key_name(meta, language, "short"), meta.get("meter"), region_of(meta, language),
             meta.get("composer")]
    facts = [fact for fact in facts if fact]
    label = _SOURCE_WORD[language]
    name = source_name(meta, language)
    return [lambda: "; ".join([_capital(noun), *facts, name]) + ".",
            lambda: f"{_capital(noun)}, {', '.join(facts)}. {label}: {name}." if facts
            else f"{_capital(noun)}. {label}: {name}.",
            lambda: f"{name} \u2013 {noun}" + (f" ({', '.join(facts)})" if facts else "")]


def _catalogue_frames(meta: dict[str, str], language: str) -> list[Callable[[], str]]:
    """The facts before the noun, the key spelled out, the meter in words or by its name."""
    noun, gender = noun_of(meta, language)
    thing = indefinite(noun, gender, language)
    key = key_name(meta, language, "spelled")
    where = source_in(meta, language)
    by = _by(meta, language)

    def facts(style: str) -> str:
        parts = []
        if key:
            written = agree({"fr": "écrit", "es": "escrito", "it": "scritto"}.get(language, ""), gender, language)
            parts.append({"en": f"written in {key}", "de": f"notiert in {key}", "nl": f"genoteerd in {key}",
                          "fr": f"{written} dans {key}", "es": f"{written} en {key}",
                          "it": f"{written} nella " + key.removeprefix("la ")}[language])
        if "meter" in meta:
            parts.append(meter_phrase(meta["meter"], language, style))
        return _capital(", ".join(parts)) if parts else ""

    collected = agree({"en": "as collected", "de": "verzeichnet", "nl": "opgenomen", "fr": "recueilli",
                       "es": "recogido", "it": "raccolto"}[language], gender, language)
    colon = " : " if language == "fr" else ": "
    return [lambda: (f"{facts('words')}{colon}" if facts("words") else "") + f"{thing}{by}, {collected} {where}.",
            lambda: (f"{facts('named')} \u2014 " if facts("named") else "") + f"{thing} {collected} {where}{by}."]


_FAMILY_FRAMES = {"sentence": _sentence_frames, "tag": _tag_frames, "catalogue": _catalogue_frames}


def caption(meta: dict[str, str], language: str, family: str, rng: random.Random) -> str:
    """One caption of ``meta`` in ``language``, in one of ``family``'s frames (``rng`` chooses)."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown caption language {language!r}; expected one of {LANGUAGES}")
    if family not in _FAMILY_FRAMES:
        raise ValueError(f"unknown caption family {family!r}; expected one of {FAMILIES}")
    return " ".join(rng.choice(_FAMILY_FRAMES[family](meta, language))().split())
