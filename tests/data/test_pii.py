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
    label = "BSN" if kind == "NL_BSN" else "value"  # nine digits pass the BSN check one time in eleven
    text = f"For the file, the {label} is {value}, as noted."
    findings = detector.find(text)
    assert [(f.type, text[f.start : f.end]) for f in findings] == [(kind, value)]


def test_ipv6_and_local_phone_numbers_are_found(detector):
    text = "The gateway 2001:db8::8a2e:370:7334 answered; call +1 415 555 0132 or 030 901820."
    assert [f.type for f in detector.find(text)] == ["IP", "PHONE", "PHONE"]


def test_national_numbers_are_read_for_the_configured_regions_only_and_the_default_has_no_us(detector, tmp_path):
    text = "Call (415) 555-0132 today."
    assert detector.find(text) == []
    path = tmp_path / "us.yaml"
    path.write_text("phone_regions: [US]\nnational_ids: []\n")
    assert [f.value for f in PiiDetector(load_patterns(path)).find(text)] == ["(415) 555-0132"]


@pytest.mark.parametrize(
    "text",
    [
        "Version 10.2.3.4 is installed.",
        "Update auf v2.1.0.7 erfolgt.",
        "La v. 1.13.1.56 est déployée.",
        "Build 1.2.3.4, Release 4.1.2.3, Firmware: 3.2.1.7, patch 7.70.3.1.",
        "Siehe Abschnitt 3.2.1.4.",
        "The 10.20.30.0 network and 10.20.30.255 broadcast.",
    ],
)
def test_version_strings_and_networks_are_not_ip_addresses(detector, text):
    assert detector.find(text) == []


@pytest.mark.parametrize("number", ["4500012345", "5100000123", "5164280715", "0100000123", "0090012345", "1900000012"])
def test_sap_document_numbers_are_not_phone_numbers(detector, number):
    assert detector.find(f"Beleg {number} gebucht; invoice {number} posted; pièce {number}.") == []


@pytest.mark.parametrize("date", ["05.02.2027", "08.07.1998", "31.12.2023", "01.02.03", "2024-03-12"])
def test_dates_are_not_phone_numbers(detector, date):
    assert detector.find(f"Termin am {date} bestätigt.") == []


def test_phone_numbers_are_found_as_people_write_them(detector):
    written = [
        "030 901820",
        "030/901820",
        "+49 (0)30 901820",
        "0171-1234567",
        "0049 171 1234567",
        "01 23 45 67 89",
        "06.12.34.56.78",
        "+33 6 12 34 56 78",
        "020 7946 0958",
        "+44 (0)20 7946 0958",
    ]
    for number in written:
        assert [f.value for f in detector.find(f"Rufen Sie {number} an.")] == [number]
    assert [f.value for f in detector.find("Tel. 01701234567, Beleg 01701234567")] == ["01701234567"]


@pytest.mark.parametrize(
    "reference",
    ["7000 1234 5678 9015", "2024031512345678", "8000000000000002", "4457194418123", "4111 111111 111111"],
)
def test_reference_numbers_that_pass_luhn_but_are_no_card_are_left_alone(detector, reference):
    assert detector.find(f"Referenz {reference} erhalten.") == []


def test_cards_of_every_scheme_are_found_in_their_printed_groups(detector):
    cards = ["4111 1111 1111 1111", "5555-5555-5555-4444", "2223000048400011", "3782 822463 10005", "6011111111111117"]
    for number in cards:
        assert [(f.type, f.value) for f in detector.find(f"Karte {number} belastet.")] == [("CARD", number)]


@pytest.mark.parametrize(
    "iban",
    [
        "de89370400440532013000",
        "de89 3704 0044 0532 0130 00",
        "DE89-3704-0044-0532-0130-00",
        "FR1420041010050500013M02606",
        "GB29 NWBK 6016 1331 9268 19",
    ],
)
def test_ibans_are_found_in_lower_case_and_grouped_by_hyphens(detector, iban):
    assert [(f.type, f.value) for f in detector.find(f"IBAN {iban} BIC COBADEFFXXX.")] == [("IBAN", iban)]


@pytest.mark.parametrize(
    "email",
    [
        "jürgen.müller@firma.de",
        "françois.lefèvre@exemple.fr",
        "info@bücher.de",
        "max [at] firma.de",
        "max(at)firma(dot)de",
        "max (at) firma (punkt) de",
        "max at firma dot de",
        "anna.schmidt[at]example.co.uk",
    ],
)
def test_e_mails_with_non_ascii_letters_or_written_to_escape_harvesters_are_found(detector, email):
    assert [(f.type, f.value) for f in detector.find(f"Schreiben Sie an {email} bitte.")] == [("EMAIL", email)]


@pytest.mark.parametrize(
    ("kind", "value", "wrong"),
    [
        ("DE_RVNR", "15 070649 C 103", "15 070649 C 104"),  # the VKVV's own example, and its check digit off by one
        ("DE_RVNR", "12150380M020", "12150380M021"),
        ("FR_SPI", "30 23 217 600 053", "30 23 217 600 054"),
        ("DE_STEUERNUMMER", "21/815/08150", None),
        ("DE_STEUERNUMMER", "181/815/08155", None),
    ],
)
def test_the_eu_pattern_pack_finds_social_insurance_and_tax_numbers_by_their_check_digits(detector, kind, value, wrong):
    assert [(f.type, f.value) for f in detector.find(f"Nummer {value} liegt vor.")] == [(kind, value)]
    if wrong:
        assert detector.find(f"Nummer {wrong} liegt vor.") == []


def test_an_unslashed_steuernummer_needs_its_label(detector):
    assert [f.type for f in detector.find("Steuernummer: 2181508150")] == ["DE_STEUERNUMMER"]
    assert [f.type for f in detector.find("St.-Nr. 9181081508155")] == ["DE_STEUERNUMMER"]
    assert detector.find("Auftrag 2181508150 und 9181081508155") == []


@pytest.mark.parametrize(
    "text",
    [
        "Der Bewerber, geb. 12.03.1985, beginnt.",
        "Geburtsdatum: 12. März 1985",
        "née le 3 mars 1978 à Lyon",
        "Date de naissance : 12 mai 1969",
        "born on May 4, 1980",
        "DOB: 1980-05-04",
        "date of birth 04/05/1980",
    ],
)
def test_dates_of_birth_are_found_after_their_keyword_and_other_dates_are_not(detector, text):
    (finding,) = detector.find(text)
    assert finding.type == "DATE_OF_BIRTH" and finding.value[-2:].isdigit() and finding.value[0].isalnum()
    assert detector.find(text.replace("geb.", "gebucht").replace("Geburtsdatum", "Datum")) == [] or "geb" not in text


@pytest.mark.parametrize(
    "address",
    [
        "Hauptstraße 12, 10115 Berlin",
        "Kaiser-Wilhelm-Allee 5a",
        "Berliner Straße 7",
        "Am Markt 3, 04109 Leipzig",
        "12 rue de la Paix, 75002 Paris",
        "3 bis avenue Victor Hugo",
        "221B Baker Street, London NW1 6XE",
        "10 Downing Street",
    ],
)
def test_street_addresses_are_found_in_german_french_and_english_formats(detector, address):
    assert [(f.type, f.value) for f in detector.find(f"Adresse: {address}.")] == [("ADDRESS", address)]


@pytest.mark.parametrize(
    "text",
    [
        "Platz 3 im Ranking, Arbeitsplatz 12, Parkplatz 4.",
        "Im Jahr 2024 waren es 12.",
        "Am Montag 12 Bewerber.",
        "les 3 cours de Mathématiques",
        "the 2 Supreme Court rulings",
    ],
)
def test_words_that_look_like_streets_are_not_addresses(detector, text):
    assert detector.find(text) == []


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("Sehr geehrte Frau Dr. Anna Schmidt, bitte geben Sie Herrn Müller Bescheid.", ["Anna Schmidt", "Müller"]),
        (
            "Mme Dupont et M. Jean Martin, Mr John Smith, Ms. O'Brien",
            ["Dupont", "Jean Martin", "John Smith", "O'Brien"],
        ),
        ("Ansprechpartner: Tomasz Kowalski\nNom : Girard", ["Tomasz Kowalski", "Girard"]),
        ("Mit freundlichen Grüßen\nZed Zyla", ["Zed Zyla"]),
        ("Hi John, Anna-Lena Becker called. Frau von der Leyen too.", ["John", "Anna-Lena Becker", "von der Leyen"]),
        ("Herr der Ringe, M. le Maire, Sehr geehrte Damen und Herren, Dear Customer, Hallo Team", []),
    ],
)
def test_names_are_found_without_a_model_after_titles_labels_greetings_and_closings(detector, text, names):
    assert [f.value for f in detector.find(text) if f.type == "PERSON"] == names


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
        ("context_types: [NAMES]\n", "context_types must be a list of DATE_OF_BIRTH, ADDRESS, PERSON"),
        ("national_ids:\n  - {type: X, regex: 'a', context: '('}\n", "context does not compile"),
    ],
)
def test_a_bad_pattern_file_says_which_entry_and_why(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_patterns(path)


def test_a_pattern_file_can_turn_the_context_detectors_off(tmp_path):
    path = tmp_path / "ids.yaml"
    path.write_text("context_types: [ADDRESS]\nnational_ids: []\n")
    detector = PiiDetector(load_patterns(path))
    text = "Herr Müller, geb. 12.03.1985, Hauptstraße 12"
    assert [f.type for f in detector.find(text)] == ["ADDRESS"]
    assert "PERSON" not in detector.types and "DATE_OF_BIRTH" not in detector.types
