"""A person's identifiers are found however they are written, compared as redaction compares values,
and nothing else is: a longer word, another person, another number."""

from __future__ import annotations

import pytest
import yaml

from lorafleet.data.person import PersonMatcher, load_person
from lorafleet.data.pii import PiiDetector
from lorafleet.errors import ConfigError

PERSON = {
    "names": ["Anna Schmidt"],
    "emails": ["Anna.Schmidt@Example.org"],
    "phones": ["+49 30 12345678"],
    "ibans": ["DE89 3704 0044 0532 0130 00"],
    "ids": ["K-4711-0815"],
}


@pytest.fixture(scope="module")
def matcher(tmp_path_factory) -> PersonMatcher:
    path = tmp_path_factory.mktemp("person") / "person.yaml"
    path.write_text(yaml.safe_dump(PERSON))
    detector = PiiDetector()
    return PersonMatcher(load_person(path, detector.patterns.phone_regions), detector)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("Bitte an ANNA  schmidt schreiben", "Bitte an <NAME_ERASED> schreiben"),
        ("Anna Schmidt's file", "<NAME_ERASED>'s file"),
        ("anna.schmidt [at] example (dot) org", "<EMAIL_ERASED>"),
        ("mail: ANNA.SCHMIDT@EXAMPLE.ORG.", "mail: <EMAIL_ERASED>."),
        ("Tel. 030 / 1234 5678", "Tel. <PHONE_ERASED>"),
        ("+49 (30) 1234-5678 or 0049 30 12345678", "<PHONE_ERASED> or <PHONE_ERASED>"),
        ("IBAN de89-3704-0044-0532-0130-00 ok", "IBAN <IBAN_ERASED> ok"),
        ("Kundennr K4711 0815", "Kundennr <ID_ERASED>"),
    ],
)
def test_identifiers_are_found_in_any_spelling_and_replaced(matcher, text, redacted):
    assert matcher.redact(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "Annas Schmidtke",
        "Hannah Schmidt",
        "Anna Schmidtova",
        "Tel 030 12345679",
        "anna.schmidt@example.org.uk",
        "IBAN DE89370400440532013001",
        "K47110815X",
    ],
)
def test_other_people_and_numbers_are_left_alone(matcher, text):
    assert matcher.matches(text) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"name": ["Anna"]}, "unknown field 'name'"),
        ({"ibans": ["DE89 3704 0044 0532 0130 01"]}, "not a valid IBAN"),
        ({"emails": ["anna"]}, "not an e-mail address"),
        ({"phones": ["12"]}, "not a phone number"),
        ({"names": [""]}, "non-empty strings"),
        ({}, "lists no identifier"),
    ],
)
def test_a_bad_person_file_names_the_field(tmp_path, content, message):
    path = tmp_path / "person.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=message):
        load_person(path, ["DE"])


def test_the_audit_hash_is_the_same_however_the_identifiers_are_written(tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump({"names": ["Anna Schmidt"], "phones": ["030 12345678"]}))
    two.write_text(yaml.safe_dump({"names": ["anna   SCHMIDT"], "phones": ["+49 30 1234 5678"]}))
    assert load_person(one, ["DE"]).sha256 == load_person(two, ["DE"]).sha256
