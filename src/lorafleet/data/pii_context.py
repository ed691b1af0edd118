"""Personal data that has no check digit and is found by its context: dates of birth, street
addresses and names of people, in German, French and English, without a model.

- **Dates of birth**: a date (numeric, ISO or with the month's name) right after a birth keyword:
  "geb.", "geboren am", "Geburtsdatum", "né(e) le", "date de naissance", "born (on)", "DOB",
  "date of birth". A date without one is a date, not personal data.
- **Street addresses**: a street name ending in a street word (-straße, -weg, -platz, ...; "rue",
  "avenue", ...; "Street", "Road", ...) with its house number where each language puts it, and the
  postcode and town after it when they follow. German street names made of a preposition ("Am
  Markt") and English street words that are ordinary words too ("Court", "Place", "Way", "Drive")
  count only with a postcode or town after them, as "Im Jahr 2024" and "the 2 Supreme Court
  rulings" read the same otherwise.
- **Names**: a capitalised name after a salutation or title (Herr, Frau, Mme, M., Mr, Ms, Dr,
  Prof, ...), after a form label ("Name:", "Ansprechpartner:", "Nom :"), on the line after a
  letter's closing ("Mit freundlichen Grüßen", "Cordialement", "Best regards"), or a given name
  of `pii_first_names` followed by a surname. A surname after a title is one word unless the
  first word is a known given name, as German capitalises the nouns that may follow ("Frau
  Schmidt Bescheid geben").

Limits: a name with none of these cues ("Schmidt called back"), a lower-case name, a name written
surname-first, or a given name missing from the list is not found; an address without its street
word ("Baker 221B") is not found. `--ner-model` adds a trained model's names, places and
organisations on top.
"""

from __future__ import annotations

import re

from lorafleet.data.pii_first_names import FIRST_NAMES

UPPER = "A-ZÀ-ÖØ-ÞŒ"
LOWER = "a-zß-öø-ÿœ"
# One capitalised name: "Müller", "O'Brien", "Mary-Jane", "McDonald", "d'Artagnan"-less forms.
NAME_WORD = rf"[{UPPER}](?:[{LOWER}]+|['’][{UPPER}][{LOWER}]+)(?:(?:-|['’])?[{UPPER}][{LOWER}]+)*"
# Particles of surnames; never "der", "la", "le" alone ("Herr der Ringe", "M. le Maire").
PARTICLE = r"(?:von der|von dem|van der|van den|de la|von|van|de|du|da|di|del|dos|zu|ten|ter)"
# Capitalised words that follow a title or a given name without being a name.
_NOT_NAMES = set(
    "Der Die Das Den Dem Des Ein Eine Einen Und Oder Aber Wir Sie Ihr Ihre Ihnen Er Es Ich Bitte Danke The A An "
    "And Or But We You He She It Le La Les Un Une Et Ou Mais Nous Vous Il Elle Merci Team Kunde Kundin Kollege "
    "Kollegin Colleague Customer Client Cliente Sir Madam Madame Monsieur Herr Frau Mme Mr Mrs Ms Dr Prof "
    "Montag Dienstag Mittwoch Donnerstag Freitag Samstag Sonntag Monday Tuesday Wednesday Thursday Friday "
    "Saturday Sunday Lundi Mardi Mercredi Jeudi Vendredi Samedi Dimanche GmbH AG SE SA SAS SARL Ltd Inc".split()
)


def find_dates_of_birth(text: str) -> list[tuple[int, int]]:
    return [m.span("date") for m in _DATE_OF_BIRTH.finditer(text)]


def find_addresses(text: str) -> list[tuple[int, int]]:
    spans = []
    for regex in (_DE_STREET, _DE_PREPOSITION_STREET, _FR_STREET, _EN_STREET, _EN_STREET_WITH_TOWN):
        spans += [m.span() for m in regex.finditer(text)]
    return spans


def find_names(text: str) -> list[tuple[int, int]]:
    spans = [_title_name(match.start("name"), match["name"]) for match in _AFTER_TITLE.finditer(text)]
    for regex in (_AFTER_LABEL, _SIGNATURE):
        spans += [match.span("name") for match in regex.finditer(text) if _plausible(match["name"])]
    for word in _WORD.finditer(text):  # every word, not finditer's non-overlapping matches of a name
        if _given_name(word.group()) and (match := _NAME_AT.match(text, word.start())):
            span = _title_name(match.start(), match.group())
            spans += [span] if text[span[0] : span[1]] != word.group() else []  # a surname must follow
    spans += [match.span("name") for match in _GREETING.finditer(text) if _given_name(match["name"])]
    return [span for span in spans if span[1] > span[0]]


def _given_name(word: str) -> bool:
    """A known given name, or a hyphenated one that starts with one ("Anna-Lena", "Jean-Pierre")."""
    return word in FIRST_NAMES or word.split("-")[0] in FIRST_NAMES


def _plausible(name: str) -> bool:
    return not any(word in _NOT_NAMES for word in name.split())


def _title_name(start: int, name: str) -> tuple[int, int]:
    """The person in up to three name words: given name(s) and surname when the first word is a
    known given name (a second known one is a middle name), the first word alone otherwise."""
    words = list(re.finditer(NAME_WORD, name))
    if not words or words[0].group() in _NOT_NAMES:
        return start, start
    count = 1
    if _given_name(words[0].group()) and len(words) > 1 and words[1].group() not in _NOT_NAMES:
        middle = len(words) > 2 and _given_name(words[1].group()) and words[2].group() not in _NOT_NAMES
        count = 3 if middle else 2
    return start, start + words[count - 1].end()


# --- dates of birth -------------------------------------------------------------------------------

_MONTHS = (
    r"Januar|Jänner|Februar|März|Maerz|April|Mai|Juni|Juli|August|September|Oktober|November|Dezember|"
    r"janvier|février|fevrier|mars|avril|juin|juillet|août|aout|septembre|octobre|novembre|décembre|decembre|"
    r"January|February|March|May|June|July|October|December|"
    r"Jan|Feb|Mär|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Okt|Oct|Nov|Dez|Dec|janv|févr|avr|juil|sept|oct|déc"
)
_DATE = (
    r"(?:\d{1,2}\s?[./-]\s?\d{1,2}\s?[./-]\s?(?:19|20)?\d{2}(?!\d)"  # 12.03.1985, 12/03/85
    r"|(?:19|20)\d{2}-\d{2}-\d{2}"  # 1985-03-12
    rf"|(?:1er|\d{{1,2}})(?:\.|st|nd|rd|th)?\s(?:of\s)?(?i:{_MONTHS})\.?,?\s(?:19|20)\d{{2}}"  # 12. März 1985
    rf"|(?i:{_MONTHS})\.?\s\d{{1,2}}(?:st|nd|rd|th)?,?\s(?:19|20)\d{{2}})"  # March 12, 1985
)
_BIRTH_WORDS = (
    r"geb\.|geboren|Geburtsdatum|Geb\.-Datum|Geburtstag|n[ée]e?|date de naissance|naissance|"
    r"born|DOB|D\.O\.B\.?|date of birth|birth ?date|birthday"
)
_DATE_OF_BIRTH = re.compile(
    rf"(?<![\w.])(?i:{_BIRTH_WORDS})"
    r"(?:\s+(?:in|à|a|en)\s+[\w-]+)?"  # born in Lyon on ...
    r"\s*[:,]?\s*(?:(?i:am|le|on|the|den)\s+)?"
    rf"(?P<date>{_DATE})"
)

# --- street addresses ------------------------------------------------------------------------------

# German house numbers have at most three digits: "Arbeitsmarkt 2024" is a year.
_HOUSE_NUMBER = r"\d{1,3}\s?[a-zA-Z]?(?:\s?[-–/]\s?\d{1,3}[a-zA-Z]?)?(?![\w.,]?\d)(?![\w])"
_DE_POSTCODE_TOWN = (
    rf"(?:,?\s+(?:D-|A-|CH-)?\d{{4,5}}\s+[{UPPER}][{LOWER}]+(?:[\s-](?:am|an der|im|/)?\s?[{UPPER}][\w.]*)?)"
)
_DE_STREET_WORD = (
    r"(?:[Ss]tra(?:ß|ss)e|[Ss]tr\.|[Ww]eg|[Gg]asse|[Pp]latz|[Aa]llee|[Rr]ing|[Dd]amm|[Uu]fer|[Cc]haussee|"
    r"[Pp]fad|[Ss]teig|[Ss]tieg|[Mm]arkt|[Gg]raben|[Kk]amp|[Aa]nger)"
)
# An adjective before a street word ("Berliner Straße", "Alte Gasse"), never an article.
_DE_ADJECTIVE = (
    rf"(?!(?:Der|Die|Das|Eine|Ihre|Seine|Unsere|Meine|Jede|Diese|Alle|Keine)\s)[{UPPER}][{LOWER}]+(?:er|e|es)\s"
)
# Compounds that end in a street word and are places of another kind ("Parkplatz 12").
_DE_NOT_STREETS = r"(?!\w*(?:[Aa]rbeits|[Pp]ark|[Ss]tell|[Ss]itz|[Ss]piel|[Aa]usbildungs|[Ss]tudien|[Kk]ita)platz)"
_DE_STREET = re.compile(
    rf"(?<![\w-]){_DE_NOT_STREETS}(?:(?:{_DE_ADJECTIVE}){_DE_STREET_WORD}|[{UPPER}][{LOWER}]*(?:-[{UPPER}]?[{LOWER}]+)*-?{_DE_STREET_WORD})"
    rf"\s+{_HOUSE_NUMBER}{_DE_POSTCODE_TOWN}?"
)
_DE_PREPOSITION_STREET = re.compile(
    r"(?<![\w-])(?:Am|An der|An den|Auf der|Auf dem|Im|In der|In den|Unter den|Zum|Zur|Hinter der|Vor dem)\s"
    rf"[{UPPER}][{LOWER}]+(?:-[{UPPER}]?[{LOWER}]+)*\s+{_HOUSE_NUMBER}{_DE_POSTCODE_TOWN}"
)
_FR_STREET = re.compile(
    r"(?<![\w])\d{1,4}(?:\s?(?:bis|ter|[A-D])\b)?,?\s"
    # not "cours", "passage" or "voie": in "3 cours de Mathématiques" they are no street
    r"(?i:rue|avenue|av\.|boulevard|bd|place|chemin|allée|allee|impasse|quai|route|square|rond-point|faubourg|"
    r"esplanade|parvis|sentier)\s"
    rf"(?:(?:de la|de l'|de|du|des|d'|l'|la|le|les)\s?)?[{UPPER}][\w'’-]+"
    rf"(?:\s(?:(?:de la|de l'|de|du|des|d'|l'|la|le|les|et)\s?)?[{UPPER}][\w'’-]+){{0,4}}"
    rf"(?:,?\s+\d{{5}}\s+[{UPPER}][\w'’-]+(?:[\s-][{UPPER}][\w'’-]+)*(?:\s(?:Cedex|CEDEX)(?:\s\d{{1,2}})?)?)?"
)
_EN_TOWN = (
    r",\s(?:[A-Z][a-z]+(?:\s[A-Z][a-z]+)?)"  # town
    r"(?:,?\s(?:[A-Z]{2}\s\d{5}(?:-\d{4})?|[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}))?"  # US state + ZIP, UK postcode
)
_EN_STREET_START = r"(?<![\w.,])\d{1,5}[A-Za-z]?,?\s(?:[A-Z][a-z]+\s){1,3}"
_EN_STREET = re.compile(
    rf"{_EN_STREET_START}(?:Street|St\.|Road|Rd\.|Avenue|Ave\.|Lane|Crescent|Terrace|Boulevard|Blvd\.|Mews)(?![\w])"
    rf"(?:\s(?:NW|NE|SW|SE))?(?:{_EN_TOWN})?"
)
# Street words that are ordinary words too ("the 2 Supreme Court rulings"): only with a town after.
_EN_STREET_WITH_TOWN = re.compile(
    rf"{_EN_STREET_START}(?:Court|Place|Way|Close|Drive|Walk|Row|Parade|Square|Gardens|Grove)(?:{_EN_TOWN})"
)

# --- names -----------------------------------------------------------------------------------------

_NAME = rf"(?:{PARTICLE} )?{NAME_WORD}(?: (?:{PARTICLE} )?{NAME_WORD}){{0,2}}"  # on one line
_TITLE = (
    r"Herrn|Herr|Frau|Hr\.|Fr\.|Madame|Mademoiselle|Monsieur|Mme\.?|Mlle\.?|Mr\.?|Mrs\.?|Ms\.?|Miss|Mx\.?|Sir|"
    r"Dr\.?|Prof\.?|Professor|Professorin|M\."
)
_ACADEMIC = r"(?:(?:Dr\.|Prof\.|Dipl\.-[A-Z][a-z]+\.|med\.|rer\. nat\.|h\.c\.|Ing\.|Mag\.|Me)\s)*"
_AFTER_TITLE = re.compile(rf"(?<![\w.])(?:{_TITLE})\s{_ACADEMIC}(?P<name>{_NAME})")
_AFTER_LABEL = re.compile(
    r"(?<![\w])(?i:name|full name|vorname|nachname|ansprechpartner(?:in)?|kontakt(?:person)?|"
    r"sachbearbeiter(?:in)?|mitarbeiter(?:in)?|bewerber(?:in)?|contact|employee|applicant|candidate|"
    r"nom|prénom|nom complet|salarié(?:e)?|employé(?:e)?|candidat(?:e)?|interlocut(?:eur|rice))"
    rf"\s?:\s*(?P<name>{_NAME})"
)
_SIGNATURE = re.compile(
    r"(?i:mit freundlichen grüßen|mit besten grüßen|freundliche grüße|viele grüße|beste grüße|liebe grüße|"
    r"herzliche grüße|mfg|best regards|kind regards|warm regards|regards|best wishes|many thanks|sincerely|"
    r"yours sincerely|yours faithfully|cordialement|bien cordialement|bien à vous|salutations distinguées|"
    r"meilleures salutations|amitiés)"
    rf"[,.!]?[ \t]*\n\s*(?P<name>{_NAME})[ \t]*(?=$|\n|,)"
)
_WORD = re.compile(rf"(?<![\w.-]){NAME_WORD}")
_NAME_AT = re.compile(_NAME)
_GREETING = re.compile(
    rf"(?<![\w])(?i:hi|hello|hallo|dear|liebe|lieber|bonjour|salut|cher|chère|servus|moin)\s(?P<name>{NAME_WORD})\b"
)
