"""One person's identifiers, as a data-subject request names them, and where they occur in a text.

A person file (YAML or JSON) lists what identifies the person:

    names:  [Anna Schmidt, "Schmidt, Anna"]
    emails: [anna.schmidt@example.org]
    phones: ["+49 30 12345678"]
    ibans:  [DE89 3704 0044 0532 0130 00]
    ids:    ["12 345 678 903"]          # national IDs, customer or staff numbers: any identifier

A text holds the person where one of them occurs, compared as redaction compares values
(`data/redact.py`'s `canonical_value`): names case- and spacing-insensitively, e-mail addresses
however they are obfuscated ("anna.schmidt [at] example (dot) org"), numbers whatever separators
they are written with ("DE89-3704-0044...", "de89370400440532013000"), and phone numbers in any
format the PII detector reads (+49 30 ..., 0049 30 ..., 030 ...: the same E.164 number). A name
is matched as written in the file, whole: list the other forms the person goes by.

The identifiers themselves are never written anywhere by lorafleet: reports give where and which
kind, the audit log a SHA-256 (`Person.sha256`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import phonenumbers

from lorafleet.config import read_yaml
from lorafleet.data.pii import PiiDetector, email_address
from lorafleet.data.pii_checks import iban_valid
from lorafleet.data.redact import canonical_value
from lorafleet.errors import ConfigError

KINDS = {"names": "NAME", "emails": "EMAIL", "phones": "PHONE", "ibans": "IBAN", "ids": "ID"}
# Separators people write inside numbers: "DE89 3704", "12.345.678", "030/1234-5678", "(030)".
_NUMBER_SEPARATORS = r"[\s./()-]*"


@dataclass(frozen=True)
class Person:
    """Canonical identifiers by kind (NAME, EMAIL, PHONE, IBAN, ID), as `canonical_value` writes them."""

    identifiers: dict[str, tuple[str, ...]]

    @property
    def sha256(self) -> str:
        """What the audit log keeps of a request: one hash over the canonical identifiers."""
        text = json.dumps({kind: sorted(values) for kind, values in self.identifiers.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(values) for kind, values in self.identifiers.items() if values}


def load_person(path: str | Path, regions: list[str]) -> Person:
    """A person file, validated: unknown keys, empty lists, malformed e-mails, IBANs whose check
    digits fail and phone numbers no region reads are errors that name the field."""
    path = Path(path)
    raw = read_yaml(path, "person file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with any of {', '.join(KINDS)} (each a list of strings)")
    unknown = sorted(set(raw) - set(KINDS))
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r}; known fields: {', '.join(KINDS)}")
    identifiers = {}
    for key, kind in KINDS.items():
        values = raw.get(key) or []
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            raise ConfigError(f"{path}: {key} must be a list of non-empty strings")
        identifiers[kind] = tuple(sorted({_canonical(kind, v, regions, f"{path}: {key}") for v in values}))
    if not any(identifiers.values()):
        raise ConfigError(f"{path}: lists no identifier; give at least one of {', '.join(KINDS)}")
    return Person(identifiers)


def _canonical(kind: str, value: str, regions: list[str], where: str) -> str:
    if kind == "NAME":
        return canonical_value("PERSON", value)
    if kind == "EMAIL":
        address = email_address(value.strip())
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", address):
            raise ConfigError(f"{where}: {value!r} is not an e-mail address")
        return address
    if kind == "PHONE":
        number = e164(value, regions)
        if number is None:
            raise ConfigError(
                f"{where}: {value!r} is not a phone number of {', '.join(regions)} nor one with a country code "
                "(+49 ...)"
            )
        return number
    compact = canonical_value(kind, value)
    if kind == "IBAN" and not iban_valid(compact):
        raise ConfigError(f"{where}: {value!r} is not a valid IBAN (length or check digits); check it for a typo")
    if not compact:
        raise ConfigError(f"{where}: {value!r} holds no letter or digit")
    return compact


def e164(value: str, regions: list[str]) -> str | None:
    """A phone number as +<country><number>, read with a country code or in the first region's
    national format that is a valid number; None when none reads it."""
    for region in regions or ["DE"]:
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return None


@dataclass(frozen=True)
class Match:
    kind: str  # NAME, EMAIL, PHONE, IBAN, ID
    start: int
    end: int


class PersonMatcher:
    """Where a text holds one of a person's identifiers: literal patterns for every identifier
    (whatever the spacing, case or separators) and, for e-mails and phones, the PII detector's
    findings compared by their canonical values (obfuscated addresses, other phone formats)."""

    def __init__(self, person: Person, detector: PiiDetector) -> None:
        self.person = person
        self.detector = detector
        self.regions = detector.patterns.phone_regions
        self.patterns = [(kind, _pattern(kind, value, self.regions)) for kind, value in _pairs(person)]
        self._detected = {"EMAIL", "PHONE"} & {kind for kind, values in person.identifiers.items() if values}

    def matches(self, text: str) -> list[Match]:
        found = [Match(kind, m.start(), m.end()) for kind, regex in self.patterns for m in regex.finditer(text)]
        if self._detected and _may_hold_contact(text):
            found += [
                Match(finding.type, finding.start, finding.end)
                for finding in self.detector.find(text)
                if finding.type in self._detected and self._is_person(finding.type, finding.value)
            ]
        return _merged(found)

    def _is_person(self, kind: str, value: str) -> bool:
        canonical = email_address(value) if kind == "EMAIL" else e164(value, self.regions)
        return canonical in self.person.identifiers[kind]

    def redact(self, text: str) -> str:
        """`text` with every identifier of the person replaced by `<KIND_ERASED>`."""
        pieces, position = [], 0
        for match in self.matches(text):
            pieces += [text[position : match.start], f"<{match.kind}_ERASED>"]
            position = match.end
        return "".join(pieces) + text[position:]


def _pairs(person: Person) -> list[tuple[str, str]]:
    return [(kind, value) for kind, values in person.identifiers.items() for value in values]


def _pattern(kind: str, value: str, regions: list[str]) -> re.Pattern:
    if kind == "NAME":  # words in order, any spacing, any case; never inside a longer word
        words = r"\s+".join(re.escape(word) for word in value.split())
        return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)
    if kind == "EMAIL":
        # never the start of a longer address: "...@example.org.uk" is another domain
        return re.compile(rf"(?<![\w.+-]){re.escape(value)}(?![\w-]|\.\w)", re.IGNORECASE)
    if kind == "PHONE":  # +49 30 ..., 0049 30 ... or the national 030 ..., any separators
        number = phonenumbers.parse(value)
        country, national = str(number.country_code), str(number.national_number)
        forms = [rf"(?:\+|00){_loose(country)}{_NUMBER_SEPARATORS}{_loose(national)}", rf"0{_loose(national)}"]
        return re.compile(rf"(?<![\w+])(?:{'|'.join(forms)})(?!\d)")
    return re.compile(rf"(?<![A-Za-z0-9]){_loose(value)}(?![A-Za-z0-9])", re.IGNORECASE)


def _loose(compact: str) -> str:
    """A compact number or code, each character allowed to stand apart from the next."""
    return _NUMBER_SEPARATORS.join(re.escape(char) for char in compact)


def _may_hold_contact(text: str) -> bool:
    """Whether the detector can find anything of ours here: an '@' or 'at' (e-mails) or digits (phones)."""
    return "@" in text or re.search(r"(?i)\bat\b|\d", text) is not None


def _merged(matches: list[Match]) -> list[Match]:
    """Overlapping matches as one, sorted, of the kind that starts first."""
    merged: list[Match] = []
    for match in sorted(matches, key=lambda m: (m.start, -m.end)):
        if merged and match.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Match(last.kind, last.start, max(last.end, match.end))
        else:
            merged.append(match)
    return merged


def strings_in(value: object) -> list[str]:
    """Every string inside a JSON value (keys included: a record is searched whatever its layout)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (*strings_in(key), *strings_in(item))]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return []


def redact_json(value: object, matcher: PersonMatcher) -> object:
    """A JSON value with the person's identifiers replaced in every string (keys included)."""
    if isinstance(value, str):
        return matcher.redact(value)
    if isinstance(value, dict):
        return {matcher.redact(key): redact_json(item, matcher) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item, matcher) for item in value]
    return value
