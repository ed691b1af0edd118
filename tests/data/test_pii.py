"""Each detector finds its kind of personal data, and a number that fails its checksum is left alone."""

from __future__ import annotations

import pytest

from lorafleet.data.pii import PiiDetector, load_patterns
from lorafleet.errors import ConfigError

# One valid value of every supported type, as people write them.
PLANTED = {
    "EMAIL": "maria.lopez@example-corp.eu",
    "PHONE": "+44 20 7946 0958",
    "IBAN": "DE89 3704 0044 0532 0130 00",
    "CARD": "4111 1111 1111 1111",
    "IP": "192.168.17.42",
    "US_SSN": "536-22-8745",
    "UK_NINO": "AB 12 34 56 C",
    "DE_STEUER_ID": "86095742719",
    "FR_INSEE": "1 84 12 76 451 089 46",
    "NL_BSN": "111222333",
    "ES_DNI": "12345678Z",
}


@pytest.fixture(scope="module")
def detector():
    return PiiDetector()


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_every_supported_type_is_found_in_a_sentence(detector, kind):
    value = PLANTED[kind]
    text = f"For the file, the value is {value}, as noted."
    findings = detector.find(text)
    assert [(f.type, text[f.start : f.end]) for f in findings] == [(kind, value)]


def test_ipv6_and_local_phone_numbers_are_found(detector):
    text = "The gateway 2001:db8::8a2e:370:7334 answered; call (415) 555-0132 or 030 901820."
    assert [f.type for f in detector.find(text)] == ["IP", "PHONE", "PHONE"]


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 was declined.",  # Luhn fails
        "IBAN DE89 3704 0044 0532 0130 01 is wrong.",  # mod 97 fails
        "Steuer-ID 86095742718 has a bad check digit.",
        "SSN 000-12-3456 is never issued.",
        "Version 10.2.3.4.5 shipped; 999.1.1.1 is no address.",
        "Order 4481-2290, total $1,250.00, due 2024-03-12 at 10:30:00, ticket 123456789.",
    ],
)
def test_numbers_that_fail_their_checks_are_not_personal_data(detector, text):
    assert detector.find(text) == []


def test_an_iban_followed_by_capitals_ends_where_its_checksum_does(detector):
    text = "Pay to DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX."
    (finding,) = detector.find(text)
    assert text[finding.start : finding.end] == "DE89 3704 0044 0532 0130 00"


def test_a_pattern_file_replaces_the_national_id_list(tmp_path):
    path = tmp_path / "ids.yaml"
    path.write_text(
        "phone_regions: [DE]\nnational_ids:\n  - {type: STAFF_ID, regex: 'EMP-\\d{6}'}\n"
        "  - {type: CARD_LIKE, regex: '\\d{16}', validator: luhn}\n"
    )
    detector = PiiDetector(load_patterns(path))
    text = "EMP-004211 paid with 4111111111111111; SSN 536-22-8745 is not in this list."
    assert [f.type for f in detector.find(text)] == ["STAFF_ID", "CARD"]  # CARD outranks CARD_LIKE
    assert "US_SSN" not in detector.types


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("national_ids:\n  - {type: X}\n", "needs a 'type' and a 'regex'"),
        ("national_ids:\n  - {type: lower, regex: 'a'}\n", "must be upper-case"),
        ("national_ids:\n  - {type: X, regex: '('}\n", "does not compile"),
        ("national_ids:\n  - {type: X, regex: 'a', validator: crc}\n", "unknown validator 'crc'"),
        ("phone_regions: [XX]\n", "unknown: \\['XX'\\]"),
        ("[1, 2]\n", "expected a mapping"),
    ],
)
def test_a_bad_pattern_file_says_which_entry_and_why(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_patterns(path)
