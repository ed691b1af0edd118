"""Find personal data in text: e-mail addresses (plain, with non-ASCII letters, or written
"name [at] firma.de"), phone numbers, IBANs, payment cards, IP addresses, national identifiers from
an editable pattern list, dates of birth, street addresses and names of people (offline, by their
context: `pii_context`), and (with a local NER model) names of organisations and places too.

Every detector that can be checked is checked (`pii_checks`): an IBAN must be of its country's
length and pass ISO 13616's mod-97 checksum, a card number must fall in a card scheme's issuer
range and length and pass Luhn's check, a national ID its country's check digit where it has one.
That is what keeps order numbers, amounts and reference numbers out. Two more kinds of number are
told apart by rule rather than checksum:

- an IPv4 address right after a version marker ("v", "version", "Version", "Release", "Build",
  "Firmware", "Patch", ...) is a version string, after a section marker ("Abschnitt", "section",
  "chapitre", "§") a section number, and one whose first part is 0 or last part 0 or
  255 names a network, not a host: neither is personal data;
- a phone number must be written as people write them: with a country code (+49, 0049), or in
  the national format of one of `phone_regions` (starting with the trunk prefix, 0 in most of
  Europe, and grouped as the country groups its numbers; (415) 555-0132 in North America). A run
  of digits such as an SAP document number counts only right after a phone word ("Tel."), and a
  date (12.03.2024, 2024-03-12) or a version string is never read as a number.

We do not use Presidio's analyzer: by default it loads a spaCy model (en_core_web_lg, which
cannot be downloaded here) before any pattern recognizer runs, and what we need of it — regexes
with checksums — is a few tested lines each. Organisations and places come from a spaCy pipeline
the organisation chooses and keeps on disk (`--ner-model`).
A `Finding` holds the matched value only so that the same value gets the same placeholder; no
report or log writes it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers

from lorafleet.config import read_yaml
from lorafleet.data.pii_checks import IBAN_LENGTHS, VALIDATORS, card_valid, iban_valid, is_calendar_date
from lorafleet.data.pii_context import find_addresses, find_dates_of_birth, find_names
from lorafleet.errors import ConfigError

DEFAULT_PATTERNS = Path(__file__).with_name("pii_patterns.yaml")
DEFAULT_PHONE_REGIONS = ["DE", "AT", "CH", "FR", "BE", "GB", "IE"]
CONTEXT_TYPES = {"DATE_OF_BIRTH": find_dates_of_birth, "ADDRESS": find_addresses, "PERSON": find_names}
CONTEXT_CHARS = 40  # how far before a national ID its pattern's `context` may stand


@dataclass(frozen=True)
class Finding:
    type: str  # EMAIL, PHONE, IBAN, CARD, IP, a national ID's type, DATE_OF_BIRTH, ADDRESS, PERSON, ORG, LOCATION
    start: int
    end: int
    value: str


@dataclass(frozen=True)
class IdPattern:
    type: str
    regex: re.Pattern
    validator: str | None = None
    context: re.Pattern | None = None  # must occur in the CONTEXT_CHARS before a match


@dataclass
class PiiPatterns:
    phone_regions: list[str] = field(default_factory=lambda: list(DEFAULT_PHONE_REGIONS))
    national_ids: list[IdPattern] = field(default_factory=list)
    context_types: list[str] = field(default_factory=lambda: list(CONTEXT_TYPES))


def load_patterns(path: str | Path | None = None) -> PiiPatterns:
    """The national-ID patterns, phone regions and context detectors of a YAML/JSON file (default:
    the shipped EU pattern pack)."""
    path = Path(path) if path is not None else DEFAULT_PATTERNS
    raw = read_yaml(path, "PII pattern file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'national_ids' (and optionally 'phone_regions')")
    regions = raw.get("phone_regions", DEFAULT_PHONE_REGIONS)
    unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS] if isinstance(regions, list) else None
    if unknown is None or unknown:
        raise ConfigError(f"{path}: phone_regions must be a list of ISO country codes; unknown: {unknown}")
    context_types = raw.get("context_types", list(CONTEXT_TYPES))
    if not isinstance(context_types, list) or not set(context_types) <= set(CONTEXT_TYPES):
        raise ConfigError(f"{path}: context_types must be a list of {', '.join(CONTEXT_TYPES)}; got {context_types}")
    return PiiPatterns(
        regions,
        [_id_pattern(entry, f"{path}: national_ids[{i}]") for i, entry in enumerate(raw.get("national_ids") or [])],
        context_types,
    )


def _id_pattern(entry: object, where: str) -> IdPattern:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or not isinstance(entry.get("regex"), str):
        raise ConfigError(f"{where} needs a 'type' and a 'regex'")
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", entry["type"]):
        raise ConfigError(
            f"{where}: type {entry['type']!r} must be upper-case letters, digits and _ (it names placeholders)"
        )
    validator = entry.get("validator")
    if validator is not None and validator not in VALIDATORS:
        raise ConfigError(f"{where}: unknown validator {validator!r}; known: {', '.join(VALIDATORS)}")
    flags = re.IGNORECASE if entry.get("flags") == "ignorecase" else 0
    regex = _compile(rf"(?<![A-Za-z0-9])(?:{entry['regex']})(?![A-Za-z0-9])", flags, where, "regex")
    context = entry.get("context")
    if context is not None and not isinstance(context, str):
        raise ConfigError(f"{where}: context must be a regular expression (a string)")
    return IdPattern(
        entry["type"], regex, validator, _compile(context, re.IGNORECASE, where, "context") if context else None
    )


def _compile(pattern: str, flags: int, where: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as err:
        raise ConfigError(f"{where}: {key} does not compile: {err}") from err


# \w takes letters of every script: "jürgen.müller@firma.de", "info@bücher.de".
_LABEL = r"[^\W_](?:[\w-]*[^\W_])?"
_TLD = r"[^\W\d_]{2,}"
_LOCAL = r"[\w%+-]+(?:\.[\w%+-]+)*"
_EMAIL = re.compile(rf"(?<![\w.+-]){_LOCAL}@(?:{_LABEL}\.)+{_TLD}(?![\w-])")
# Written to escape harvesters: "name [at] firma.de", "name(at)firma(dot)de", "name at firma dot de".
_AT = r"\s*(?:\[\s*(?i:at|ät|@)\s*\]|\(\s*(?i:at|ät|@)\s*\)|\{\s*(?i:at|@)\s*\})\s*|\s+@\s+"
_DOT = r"(?:\s*(?:\[\s*(?i:dot|punkt|point|\.)\s*\]|\(\s*(?i:dot|punkt|point|\.)\s*\)|\{\s*(?i:dot|\.)\s*\})\s*|\.)"
_OBFUSCATED_EMAILS = [
    re.compile(rf"(?<![\w.+-]){_LOCAL}(?:{_AT})(?:{_LABEL}{_DOT})+{_TLD}(?![\w-])"),
    re.compile(
        rf"(?<![\w.+-]){_LOCAL}\s+(?i:at)\s+(?:{_LABEL}(?:\.{_LABEL})*\s+(?i:dot|punkt|point)\s+)+{_TLD}(?![\w-])"
    ),
]
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])(?=[A-Za-z]{2}\d{2}[ -]?[A-Za-z0-9])")
_IBAN_CHAR = re.compile(r"[ -]?([A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_VERSION_BEFORE = re.compile(
    r"(?:(?<![A-Za-z])[vV]\.?\s?|\b(?i:ver|version|versión|release|rel|build|firmware|fw|patch|update|revision|rev|"
    r"stand|edition|driver|treiber|kb|sp|section|abschnitt|kapitel|chapter|chapitre|ziffer|nr|no|§)\.?\s*[:#]?\s*)$"
)
# Dates and date-like runs that libphonenumber would read as numbers: 12.03.2024, 12/03/24, 2024-03-12.
_DATE_LIKE = re.compile(
    r"(?<![\d.])(?:(?P<d>\d{1,2})[./-](?P<m>\d{1,2})[./-](?P<y>\d{4}|\d{2})|(?P<Y>\d{4})-(?P<M>\d{2})-(?P<D>\d{2}))"
    r"(?![./-]?\d)"
)
NER_LABELS = {"PERSON": "PERSON", "PER": "PERSON", "ORG": "ORG", "GPE": "LOCATION", "LOC": "LOCATION"}


class EntityRecognizer:
    """Names of people, organisations and places from a spaCy pipeline on disk (`spacy.load(path)`:
    a trained model unpacked there, or any pipeline saved with `nlp.to_disk`). Never downloads."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"--ner-model {path} is not a directory; pass a spaCy pipeline saved on disk")
        try:
            import spacy
        except ImportError as err:
            raise ConfigError("--ner-model needs spaCy: pip install 'lorafleet[ner]'") from err
        try:
            self.nlp = spacy.load(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--ner-model {path} is not a spaCy pipeline: {err}") from err

    def find(self, text: str) -> list[Finding]:
        return [
            Finding(NER_LABELS[e.label_], e.start_char, e.end_char, e.text)
            for e in self.nlp(text).ents
            if e.label_ in NER_LABELS
        ]


class PiiDetector:
    """All detectors over one text; where two findings overlap the more specific one wins
    (e-mail, IBAN, card, national IDs, IP, date of birth, address, phone, then names)."""

    def __init__(self, patterns: PiiPatterns | None = None, ner: EntityRecognizer | None = None):
        self.patterns = patterns or load_patterns()
        self.ner = ner

    @property
    def types(self) -> list[str]:
        ids = list(dict.fromkeys(p.type for p in self.patterns.national_ids))
        names = ["EMAIL", "IBAN", "CARD", *ids, "IP", *self._context_types("DATE_OF_BIRTH", "ADDRESS"), "PHONE"]
        names += self._context_types("PERSON") + (["ORG", "LOCATION"] if self.ner else [])
        return list(dict.fromkeys(names + (["PERSON"] if self.ner else [])))

    def _context_types(self, *types: str) -> list[str]:
        return [t for t in types if t in self.patterns.context_types]

    def find(self, text: str) -> list[Finding]:
        taken = _first_wins(
            [
                *_emails(text),
                *_ibans(text),
                *_cards(text),
                *(f for p in self.patterns.national_ids for f in _national_ids(text, p)),
                *_ips(text),
                *self._by_context(text, "DATE_OF_BIRTH", "ADDRESS"),
            ]
        )
        # libphonenumber parses every run of digits once per region, the bulk of the time: search
        # the text with what is already found, every date and dotted quad blanked out (offsets unchanged), and
        # only if it has enough digits left to hold a number.
        masked = _blank(text, taken + _dates(text) + _dotted_quads(text))
        if _MAYBE_PHONE.search(masked):
            taken = _first_wins(taken + _phones(masked, self.patterns.phone_regions))
        taken = _first_wins(taken + self._by_context(text, "PERSON"))
        if self.ner:
            taken = _first_wins(taken + self.ner.find(text))
        return sorted(taken, key=lambda f: f.start)

    def _by_context(self, text: str, *types: str) -> list[Finding]:
        return [
            Finding(kind, start, end, text[start:end])
            for kind in self._context_types(*types)
            for start, end in CONTEXT_TYPES[kind](text)
        ]


_MAYBE_PHONE = re.compile(r"\d(?:[\s().\-/]{0,3}\d){5}")


def _first_wins(findings: list[Finding]) -> list[Finding]:
    """The findings, in priority order, that overlap none before them."""
    taken: list[Finding] = []
    for finding in findings:
        if all(finding.end <= t.start or finding.start >= t.end for t in taken):
            taken.append(finding)
    return taken


def _blank(text: str, findings: list[Finding]) -> str:
    for finding in findings:
        text = text[: finding.start] + " " * (finding.end - finding.start) + text[finding.end :]
    return text


def email_address(value: str) -> str:
    """An e-mail finding as an address: "Name [at] Firma (dot) de" -> "name@firma.de"."""
    value = re.sub(rf"^({_LOCAL})\s+(?i:at)\s+", r"\1@", value)
    value = re.sub(_AT, "@", value)
    value = re.sub(r"\s+(?i:dot|punkt|point)\s+", ".", value)
    return re.sub(_DOT, ".", value).casefold()


def _emails(text: str) -> list[Finding]:
    found = [Finding("EMAIL", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]
    for regex in _OBFUSCATED_EMAILS:
        found += [Finding("EMAIL", m.start(), m.end(), m.group()) for m in regex.finditer(text)]
    return _first_wins(found)


def _ibans(text: str) -> list[Finding]:
    """IBANs as people write them: upper or lower case, grouped by spaces or hyphens or not at all,
    of a country of the IBAN registry, ending after that country's length in characters."""
    found = []
    for start in (m.start() for m in _IBAN_START.finditer(text)):
        chars, ends, position = [], [], start
        while len(chars) < 34 and (char := _IBAN_CHAR.match(text, position)):
            chars.append(char.group(1).upper())
            ends.append(position := char.end())
        code = "".join(chars)
        length = IBAN_LENGTHS.get(code[:2], 0)
        if length and len(code) >= length and not _runs_on(text, ends[length - 1]) and iban_valid(code[:length]):
            found.append(Finding("IBAN", start, ends[length - 1], text[start : ends[length - 1]]))
    return _first_wins(found)


def _runs_on(text: str, end: int) -> bool:
    """A letter or digit right after the last character: the IBAN would be longer than its country's."""
    return end < len(text) and text[end].isalnum()


def _cards(text: str) -> list[Finding]:
    found = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if card_valid(digits) and _grouped_like_a_card(match.group()):
            found.append(Finding("CARD", match.start(), match.end(), match.group()))
    return found


def _grouped_like_a_card(raw: str) -> bool:
    """Unbroken, in fours (the last group shorter), or as American Express and Diners print them
    (4-6-5, 4-6-4): a reference number grouped otherwise is no card."""
    lengths = [len(group) for group in re.split(r"[ -]", raw)]
    if len(lengths) == 1:
        return True
    return (all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4) or lengths in ([4, 6, 5], [4, 6, 4])


def _national_ids(text: str, pattern: IdPattern) -> list[Finding]:
    found = []
    for match in pattern.regex.finditer(text):
        compact = re.sub(r"[\s./-]", "", match.group()).upper()
        if pattern.validator is not None and not VALIDATORS[pattern.validator](compact):
            continue
        if pattern.context is not None and not pattern.context.search(
            text, max(0, match.start() - CONTEXT_CHARS), match.start()
        ):
            continue
        found.append(Finding(pattern.type, match.start(), match.end(), match.group()))
    return found


def _ips(text: str) -> list[Finding]:
    found = []
    for regex in (_IPV4, _IPV6):
        for match in regex.finditer(text):
            try:
                address = ipaddress.ip_address(match.group())
            except ValueError:
                continue
            if address.version == 4 and not _host_address(
                match.group(), text[max(0, match.start() - 30) : match.start()]
            ):
                continue
            found.append(Finding("IP", match.start(), match.end(), match.group()))
    return found


def _host_address(dotted: str, before: str) -> bool:
    """An IPv4 address of a host, not a version string ("Version 10.2.3.4", "v2.1.0.7") nor a
    network or broadcast address (x.y.z.0, x.y.z.255, 0.y.z.w)."""
    parts = [int(part) for part in dotted.split(".")]
    return parts[0] != 0 and parts[3] not in (0, 255) and not _VERSION_BEFORE.search(before)


def _dotted_quads(text: str) -> list[Finding]:
    """Every a.b.c.d, an address or not: "Version 0.13.2.17" is no phone number either."""
    return [Finding("DOTTED", m.start(), m.end(), m.group()) for m in _IPV4.finditer(text)]


def _dates(text: str) -> list[Finding]:
    found = []
    for match in _DATE_LIKE.finditer(text):
        day, month, year = (match["d"], match["m"], match["y"]) if match["d"] else (match["D"], match["M"], match["Y"])
        if is_calendar_date(int(day), int(month), int(year) % 100 + 2000 if len(year) == 2 else int(year)):
            found.append(Finding("DATE", match.start(), match.end(), match.group()))
    return found


def _phones(text: str, regions: list[str]) -> list[Finding]:
    found: list[Finding] = []
    for region in regions:
        # STRICT_GROUPING: the digits grouped as the country groups them ("030 901820", not an
        # order number's "0556-1675"), or not grouped at all.
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING):
            if _written_as_a_phone_number(match.raw_string, region, text[max(0, match.start - 30) : match.start]):
                found.append(Finding("PHONE", match.start, match.end, match.raw_string))
        text = _blank(text, found)  # a number found for one region is not parsed again for the next
    return found


_PHONE_WORD = re.compile(
    r"(?i:\b(?:tel|telefon|phone|mobil|mobile|handy|fax|cell|call|anrufen|ruf|erreichbar|tél|portable|appel|"
    r"appelez|joindre|whatsapp)\w*\.?)"
    r"[^\w\n]{0,3}(?:[^\W\d]+[^\w\n]{1,3})?$"  # right before the number, one word between at most ("Tel. privat:")
)


def _written_as_a_phone_number(raw: str, region: str, before: str) -> bool:
    """With a country code (+49 ..., 0049 ...), or in the region's national format: its trunk
    prefix first (030 ..., 01 23 ..., 020 ...; grouped as (415) 555-0132 where there is none or it
    is dropped, as in North America, Italy and Spain). Digits in one run, like an SAP document
    number (4500012345, 0100000123, 0090012345), count only right after a phone word ("Tel.",
    "Handy:", "appelez le")."""
    number = raw.lstrip("( ")
    if number.startswith("+"):
        return True
    grouped = bool(re.search(r"\d[\s().\-/]+\d", raw))
    if not grouped and not _PHONE_WORD.search(before):
        return False
    if number.startswith("00"):
        return True
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata.national_prefix and metadata.country_code != 1:
        return number.startswith(metadata.national_prefix)
    return grouped
