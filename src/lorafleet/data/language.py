"""Which language a text is in, offline: German, French or English, by counting their commonest
words (articles, pronouns, auxiliaries, prepositions). Enough to ask a document's questions in its
own language; a text with none of them is taken for English.

Words two of the languages share ("in", "an", "des", "die") are left out of every list, so a
count is evidence for one language only. A library (langdetect, lingua) would know more languages
but brings profiles or models for dozens we do not ask questions in.
"""

from __future__ import annotations

import re
import unicodedata

STOPWORDS = {
    "de": set(
        "der das und ist nicht ein eine einen einem dem den zu mit von für auf sich auch werden wird sind im bei "
        "nach oder wie aus über noch nur wenn kann muss sie wir ihr es vom zum zur sowie dass wurde haben hat "
        "müssen diese dieser dieses alle".split()
    ),
    "fr": set(
        "le la les et est une un du au aux pour dans sur pas par avec que qui ce cette sont être il elle nous "
        "vous leur ne plus se sa son ses ou doit doivent peut été avant après chaque tous".split()
    ),
    "en": set(
        "the and is are of to that for with on as by this it be was were not or from have has will can at which "
        "their must should any each all been these those".split()
    ),
}
LANGUAGES = tuple(STOPWORDS)


def words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.findall(r"[^\W\d_]+(?:['’][^\W\d_]+)?", text)


def detect_language(text: str, default: str = "en") -> str:
    """ "de", "fr" or "en": the language whose common words occur most often in `text`."""
    found = words(text)
    counts = {language: sum(word in stop for word in found) for language, stop in STOPWORDS.items()}
    best = max(counts, key=lambda language: counts[language])
    return best if counts[best] > 0 else default
