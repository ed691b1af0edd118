"""Find personal data in text: e-mail addresses, phone numbers, IBANs, payment cards, IP addresses,
national identifiers from an editable pattern list, and (with a local NER model) names of people,
organisations and places.

Every detector that can be checked is checked: an IBAN must pass ISO 13616's mod-97 checksum, a
card number Luhn's, an address must parse as IPv4/IPv6 (`ipaddress`), a phone number must be a
valid number for its region (Google's libphonenumber rules, `phonenumbers`), and a national ID its
country's check digit where it has one. A string of digits that fails its checksum is left alone,
which is what keeps order numbers, amounts and dates out of the findings.

We do not use Presidio's analyzer: by default it loads a spaCy model (en_core_web_lg, which
cannot be downloaded here) before any pattern recognizer runs, and what we need of it — regexes
with checksums — is a few tested lines each. Names come from a spaCy pipeline the organisation
chooses and keeps on disk (`--ner-model`).
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
from lorafleet.errors import ConfigError

DEFAULT_PATTERNS = Path(__file__).with_name("pii_patterns.yaml")


@dataclass(frozen=True)
class Finding:
    type: str  # EMAIL, PHONE, IBAN, CARD, IP, a national ID's type, PERSON, ORG, LOCATION
    start: int
    end: int
    value: str


@dataclass(frozen=True)
class IdPattern:
    type: str
    regex: re.Pattern
    validator: str | None = None


@dataclass
class PiiPatterns:
    phone_regions: list[str] = field(default_factory=lambda: ["US"])
    national_ids: list[IdPattern] = field(default_factory=list)


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, digit in enumerate(int(d) for d in reversed(digits)):
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def mod97_valid(code: str) -> bool:
    """ISO 13616 (IBAN): country and check digits moved to the end, letters as 10..35, mod 97 == 1."""
    rearranged = code[4:] + code[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def us_ssn_valid(digits: str) -> bool:
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def de_steuer_id_valid(digits: str) -> bool:
    """German tax ID: no leading 0, one digit of the first ten repeated (2 or 3 times), and an
    ISO 7064 MOD 11,10 check digit."""
    if len(digits) != 11 or digits[0] == "0":
        return False
    counts = sorted((digits[:10].count(d) for d in set(digits[:10])), reverse=True)
    if counts[0] not in (2, 3) or (len(counts) > 1 and counts[1] > 1):
        return False
    product = 10
    for digit in digits[:10]:
        total = (int(digit) + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10 == int(digits[10])


def fr_insee_valid(digits: str) -> bool:
    """French social security number (NIR): key = 97 - (first 13 digits mod 97); Corsica's 2A/2B
    count as 19/18."""
    number = digits[:13].replace("2A", "19").replace("2B", "18")
    return len(digits) == 15 and 97 - int(number) % 97 == int(digits[13:])


def nl_bsn_valid(digits: str) -> bool:
    """Dutch citizen service number: the 'elfproef', weights 9..2 and -1, sum divisible by 11."""
    total = sum(int(d) * w for d, w in zip(digits[:8], range(9, 1, -1), strict=True)) - int(digits[8])
    return total % 11 == 0 and total > 0


def es_dni_valid(compact: str) -> bool:
    return "TRWAGMYFPDXBNJZSQVHLCKE"[int(compact[:8]) % 23] == compact[8]


VALIDATORS = {
    "luhn": luhn_valid,
    "mod97": mod97_valid,
    "us_ssn": us_ssn_valid,
    "de_steuer_id": de_steuer_id_valid,
    "fr_insee": fr_insee_valid,
    "nl_bsn": nl_bsn_valid,
    "es_dni": es_dni_valid,
}


def load_patterns(path: str | Path | None = None) -> PiiPatterns:
    """The national-ID patterns and phone regions of a YAML/JSON file (default: the shipped list)."""
    path = Path(path) if path is not None else DEFAULT_PATTERNS
    raw = read_yaml(path, "PII pattern file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'national_ids' (and optionally 'phone_regions')")
    regions = raw.get("phone_regions", ["US"])
    unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS] if isinstance(regions, list) else None
    if unknown is None or unknown:
        raise ConfigError(f"{path}: phone_regions must be a list of ISO country codes; unknown: {unknown}")
    return PiiPatterns(
        regions,
        [_id_pattern(entry, f"{path}: national_ids[{i}]") for i, entry in enumerate(raw.get("national_ids") or [])],
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
    try:
        regex = re.compile(rf"(?<![A-Za-z0-9])(?:{entry['regex']})(?![A-Za-z0-9])", flags)
    except re.error as err:
        raise ConfigError(f"{where}: regex does not compile: {err}") from err
    return IdPattern(entry["type"], regex, validator)


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
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
    (e-mail, IBAN, card, national IDs, IP, phone, then names)."""

    def __init__(self, patterns: PiiPatterns | None = None, ner: EntityRecognizer | None = None):
        self.patterns = patterns or load_patterns()
        self.ner = ner

    @property
    def types(self) -> list[str]:
        names = ["EMAIL", "IBAN", "CARD"] + [p.type for p in self.patterns.national_ids] + ["IP", "PHONE"]
        return names + (["PERSON", "ORG", "LOCATION"] if self.ner else [])

    def find(self, text: str) -> list[Finding]:
        taken = _first_wins(
            [
                *_emails(text),
                *_ibans(text),
                *_cards(text),
                *(f for p in self.patterns.national_ids for f in _national_ids(text, p)),
                *_ips(text),
            ]
        )
        # libphonenumber parses every run of digits once per region, the bulk of the time: search
        # the text with what is already found blanked out (offsets unchanged), and only if it has
        # enough digits left to hold a number.
        masked = _blank(text, taken)
        if _MAYBE_PHONE.search(masked):
            taken = _first_wins(taken + _phones(masked, self.patterns.phone_regions))
        if self.ner:
            taken = _first_wins(taken + self.ner.find(text))
        return sorted(taken, key=lambda f: f.start)


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


def _emails(text: str) -> list[Finding]:
    return [Finding("EMAIL", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]


def _ibans(text: str) -> list[Finding]:
    found = []
    for match in _IBAN.finditer(text):
        # The pattern runs on into following capitals and digits; take the longest prefix that checks.
        candidate = match.group()
        while len(candidate.replace(" ", "")) >= 15:
            if len(candidate.replace(" ", "")) <= 34 and mod97_valid(candidate.replace(" ", "")):
                found.append(Finding("IBAN", match.start(), match.start() + len(candidate), candidate))
                break
            candidate = candidate[:-1].rstrip()
    return found


def _cards(text: str) -> list[Finding]:
    found = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            found.append(Finding("CARD", match.start(), match.end(), match.group()))
    return found


def _national_ids(text: str, pattern: IdPattern) -> list[Finding]:
    found = []
    for match in pattern.regex.finditer(text):
        compact = re.sub(r"[\s-]", "", match.group()).upper()
        if pattern.validator is None or VALIDATORS[pattern.validator](compact):
            found.append(Finding(pattern.type, match.start(), match.end(), match.group()))
    return found


def _ips(text: str) -> list[Finding]:
    found = []
    for regex in (_IPV4, _IPV6):
        for match in regex.finditer(text):
            try:
                ipaddress.ip_address(match.group())
            except ValueError:
                continue
            found.append(Finding("IP", match.start(), match.end(), match.group()))
    return found


def _phones(text: str, regions: list[str]) -> list[Finding]:
    found: list[Finding] = []
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            found.append(Finding("PHONE", match.start, match.end, match.raw_string))
        text = _blank(text, found)  # a number found for one region is not parsed again for the next
    return found
