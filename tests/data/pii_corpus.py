"""A labelled set of German, French and English sentences for measuring the PII detectors: every
planted value with its type and exact span, and hard negatives beside them (4-part version
strings, SAP document numbers, order numbers, amounts, dates, reference numbers) that must stay
untouched. Values are made by the rules of each identifier (check digits computed, phone numbers
valid for their country), from a seeded generator, so the set is the same on every run.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import phonenumbers

from lorafleet.data.pii_checks import luhn_valid


@dataclass(frozen=True)
class Sample:
    language: str
    text: str
    gold: frozenset[tuple[str, int, int]]  # (type, start, end)


# --- values ---------------------------------------------------------------------------------------

GIVEN = ["Anna", "Klaus", "Sabine", "Jürgen", "Marie", "Jean", "Camille", "François", "John", "Sarah", "Emily", "David"]
SURNAMES = [
    "Schmidt",
    "Müller",
    "Weber",
    "Hoffmann",
    "Dupont",
    "Martin",
    "Lefèvre",
    "Moreau",
    "Smith",
    "Taylor",
    "Brown",
    "O'Brien",
    "Kowalski",
    "Nguyen",
    "Becker",
    "Fischer",
    "Girard",
    "Lambert",
    "Walker",
    "Hughes",
]
DOMAINS = ["firma.de", "beispiel.de", "exemple.fr", "societe.fr", "example.co.uk", "acme-corp.com"]


def digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(count))


def email(rng: random.Random) -> str:
    local = rng.choice(
        [
            "anna.schmidt",
            "j.weber",
            "marie.dupont",
            "john.smith",
            "jürgen.müller",
            "françois.lefèvre",
            "zoë.brown",
            "klaus_becker",
            "s.taylor+hr",
        ]
    )
    domain = rng.choice(DOMAINS)
    name, tld = domain.rsplit(".", 1)
    return rng.choice(
        [
            f"{local}@{domain}",
            f"{local}@{domain}",
            f"{local} [at] {domain}",
            f"{local}(at){name}(dot){tld}",
            f"{local} (at) {name} (dot) {tld}",
            f"{local} at {name} dot {tld}",
            f"{local}[at]{domain}",
        ]
    )


def phone(rng: random.Random) -> str:
    region, prefixes = rng.choice(
        [("DE", ["30", "89", "40", "221", "170", "151"]), ("FR", ["1", "6", "4"]), ("GB", ["20", "7700", "161"])]
    )
    while True:
        prefix = rng.choice(prefixes)
        lengths = {"DE": 10 if prefix[0] == "1" else 9, "FR": 9, "GB": 10}
        number = phonenumbers.parse(
            "+"
            + str(phonenumbers.country_code_for_region(region))
            + prefix
            + digits(rng, lengths[region] - len(prefix))
        )
        if phonenumbers.is_valid_number(number):
            break
    style = rng.choice(["national", "international", "00", "other"])
    international = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    if style == "international":
        return international
    if style == "00":
        return "00" + international[1:]
    if style == "other":  # as people also write them: 030/901820, 06.12.34.56.78, +44 (0)20 7946 0958
        area, _, rest = national.partition(" ")
        other = {
            "DE": f"{area}/{rest.replace(' ', '')}",
            "FR": national.replace(" ", "."),
            "GB": international.replace(" ", " (0)", 1),
        }
        return other[region]
    return national


def iban(rng: random.Random) -> str:
    country, length = rng.choice([("DE", 22), ("FR", 27), ("GB", 22), ("AT", 20), ("NL", 18), ("ES", 24), ("IT", 27)])
    bban = digits(rng, length - 4)
    if country in ("GB", "NL"):
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + bban[4:]
    if country == "IT":
        bban = "X" + bban[1:]
    numeric = "".join(str(int(char, 36)) for char in bban + country + "00")
    code = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    grouped = " ".join(code[i : i + 4] for i in range(0, len(code), 4))
    return rng.choice([grouped, grouped, code, grouped.lower(), code.lower(), grouped.replace(" ", "-")])


def with_check_digit(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def card(rng: random.Random) -> str:
    kind = rng.choice(["visa", "mastercard", "mastercard2", "amex"])
    if kind == "amex":
        number = with_check_digit(rng.choice(["34", "37"]) + digits(rng, 12))
        return rng.choice([f"{number[:4]} {number[4:10]} {number[10:]}", number])
    first = {"visa": "4", "mastercard": str(rng.randint(51, 55)), "mastercard2": str(rng.randint(2221, 2720))}[kind]
    number = with_check_digit(first + digits(rng, 15 - len(first)))
    groups = [number[i : i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ".join(groups), "-".join(groups), number])


def ip(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "2001:db8:" + ":".join(f"{rng.randint(1, 0xFFFF):x}" for _ in range(6))
    return f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def steuer_id(rng: random.Random) -> str:
    while True:
        first_ten = [rng.choice("123456789")] + [rng.choice("0123456789") for _ in range(9)]
        counts = sorted((first_ten.count(d) for d in set(first_ten)), reverse=True)
        if counts[0] == 2 and counts[1] == 1:
            break
    product = 10
    for digit in first_ten:
        product = ((int(digit) + product) % 10 or 10) * 2 % 11
    number = "".join(first_ten) + str((11 - product) % 10)
    return rng.choice([number, f"{number[:2]} {number[2:5]} {number[5:8]} {number[8:]}"])


def rvnr(rng: random.Random) -> str:
    area = rng.choice(["12", "15", "25", "53", "65", "38"])
    birth = f"{rng.randint(1, 28):02d}{rng.randint(1, 12):02d}{rng.randint(40, 99):02d}"
    letter, serial = rng.choice("ABCDEFGHKLMNPRSTW"), f"{rng.randint(0, 99):02d}"
    numeric = area + birth + f"{ord(letter) - 64:02d}" + serial
    products = (int(d) * w for d, w in zip(numeric, (2, 1, 2, 5, 7, 1, 2, 1, 2, 1, 2, 1), strict=True))
    check = sum(p // 10 + p % 10 for p in products) % 10
    return rng.choice([f"{area} {birth} {letter} {serial}{check}", f"{area}{birth}{letter}{serial}{check}"])


def steuernummer(rng: random.Random) -> str:
    layout = rng.choice(["2/3/5", "3/3/5", "5/5", "3/4/4", "federal"])
    if layout == "federal":  # 13 digits, the fifth 0: found only after its label
        return digits(rng, 4) + "0" + digits(rng, 8)
    return "/".join(digits(rng, int(n)) for n in layout.split("/"))


def insee(rng: random.Random) -> str:
    body = (
        rng.choice("12") + f"{rng.randint(40, 99):02d}{rng.randint(1, 12):02d}{rng.randint(1, 95):02d}" + digits(rng, 6)
    )
    number = body + f"{97 - int(body) % 97:02d}"
    return rng.choice(
        [number, f"{number[0]} {number[1:3]} {number[3:5]} {number[5:7]} {number[7:10]} {number[10:13]} {number[13:]}"]
    )


def spi(rng: random.Random) -> str:
    body = rng.choice("0123") + digits(rng, 9)
    number = body + f"{int(body) % 511:03d}"
    return rng.choice([number, f"{number[:2]} {number[2:4]} {number[4:7]} {number[7:10]} {number[10:]}"])


def bsn(rng: random.Random) -> str:
    while True:
        number = digits(rng, 9)
        total = sum(int(d) * w for d, w in zip(number[:8], range(9, 1, -1), strict=True)) - int(number[8])
        if total % 11 == 0 and total > 0:
            return number


def dni(rng: random.Random) -> str:
    number = digits(rng, 8)
    return number + "TRWAGMYFPDXBNJZSQVHLCKE"[int(number) % 23]


def nino(rng: random.Random) -> str:
    prefix = rng.choice(["AB", "CE", "JG", "PR", "WT", "ZA"])
    return f"{prefix} {digits(rng, 2)} {digits(rng, 2)} {digits(rng, 2)} {rng.choice('ABCD')}"


def ssn(rng: random.Random) -> str:
    return f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


MONTHS = {
    "de": [
        "Januar",
        "Februar",
        "März",
        "April",
        "Mai",
        "Juni",
        "Juli",
        "August",
        "September",
        "Oktober",
        "November",
        "Dezember",
    ],
    "fr": [
        "janvier",
        "février",
        "mars",
        "avril",
        "mai",
        "juin",
        "juillet",
        "août",
        "septembre",
        "octobre",
        "novembre",
        "décembre",
    ],
    "en": [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
}


def a_date(rng: random.Random, language: str, years: tuple[int, int] = (1950, 2004)) -> str:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(*years)
    name = MONTHS[language][month - 1]
    textual = {"de": f"{day}. {name} {year}", "fr": f"{day} {name} {year}", "en": f"{day} {name} {year}"}[language]
    return rng.choice(
        [f"{day:02d}.{month:02d}.{year}", f"{day:02d}/{month:02d}/{year}", f"{year}-{month:02d}-{day:02d}", textual]
    )


STREETS = {
    "de": [
        "Hauptstraße",
        "Lindenweg",
        "Berliner Straße",
        "Kaiser-Wilhelm-Allee",
        "Goethestr.",
        "Marktplatz",
        "Schillerring",
        "Am Stadtpark",
    ],
    "fr": [
        "rue de la Paix",
        "avenue Victor Hugo",
        "boulevard Haussmann",
        "place de la République",
        "chemin des Vignes",
        "allée des Tilleuls",
        "quai de la Loire",
    ],
    "en": ["Baker Street", "High Street", "Station Road", "Park Lane", "Oak Avenue", "Church Close", "Elm Grove"],
}
TOWNS = {
    "de": [("10115", "Berlin"), ("80331", "München"), ("50667", "Köln"), ("04109", "Leipzig")],
    "fr": [("75002", "Paris"), ("69003", "Lyon"), ("13001", "Marseille"), ("33000", "Bordeaux")],
    "en": [("SW1A 2AA", "London"), ("M1 1AE", "Manchester"), ("EH1 1YZ", "Edinburgh")],
}


def address(rng: random.Random, language: str) -> str:
    street, (postcode, town) = rng.choice(STREETS[language]), rng.choice(TOWNS[language])
    number = f"{rng.randint(1, 180)}{rng.choice(['', '', 'a', 'b'] if language != 'fr' else ['', '', ' bis'])}"
    if language == "de":
        return (
            f"{street} {number}, {postcode} {town}"
            if street.startswith("Am ") or rng.random() < 0.6
            else (f"{street} {number}")
        )
    if language == "fr":
        return f"{number} {street}, {postcode} {town}" if rng.random() < 0.6 else f"{number}, {street}"
    return f"{number} {street}, {town} {postcode}" if rng.random() < 0.6 else f"{number} {street}"


# --- hard negatives: look like personal data, are not --------------------------------------------


def version(rng: random.Random) -> str:
    marker = rng.choice(
        [
            "Version ",
            "version ",
            "v",
            "Release ",
            "Build ",
            "Firmware ",
            "Version: ",
            "v. ",
            "Patch ",
            "Abschnitt ",
            "section ",
            "chapitre ",
        ]
    )
    return marker + ".".join(str(rng.randint(0, 20)) for _ in range(3)) + f".{rng.randint(1, 250)}"


def sap_number(rng: random.Random) -> str:
    prefix = rng.choice(["45", "51", "49", "19", "01", "009", "008", "14", "18", "50"])
    return prefix + digits(rng, 10 - len(prefix))


def order_number(rng: random.Random) -> str:
    return rng.choice(
        [
            f"{digits(rng, 4)}-{digits(rng, 4)}",
            f"#{digits(rng, 8)}-{rng.randint(1, 9)}",
            f"RE-2024-{digits(rng, 5)}",
            digits(rng, 9),
            digits(rng, 11),
            digits(rng, 13),
        ]
    )


def amount(rng: random.Random) -> str:
    value = rng.randint(100, 9_999_999)
    german = f"{value:,}".replace(",", ".") + f",{rng.randint(0, 99):02d}"
    return rng.choice(
        [
            f"{german} EUR",
            f"€ {german}",
            f"${value:,}.{rng.randint(0, 99):02d}",
            f"{value:,}".replace(",", " ") + " €",
            f"CHF {value:,}".replace(",", "'"),
        ]
    )


def reference(rng: random.Random) -> str:
    """Long reference numbers that pass Luhn but belong to no card scheme, as banks and shops print them."""
    first = rng.choice(["1", "7", "8", "9", "2024", "0"])
    number = with_check_digit(first + digits(rng, rng.choice([15, 17, 18]) - len(first)))
    return rng.choice([number, " ".join(number[i : i + 4] for i in range(0, len(number), 4))])


def plain_date(rng: random.Random, language: str) -> str:
    return a_date(rng, language, (2019, 2027))


# --- sentences ------------------------------------------------------------------------------------

POSITIVE = {
    "EMAIL": {
        "de": ["Bitte schreiben Sie an {EMAIL} bis {date}."],
        "fr": ["Écrivez à {EMAIL} avant le {date}."],
        "en": ["Please reply to {EMAIL} before {date}."],
    },
    "PHONE": {
        "de": ["Rückruf unter {PHONE}, Auftrag {sap}.", "Erreichbar: {PHONE} (Bestellung {order})."],
        "fr": ["Rappelez le {PHONE} au sujet de la commande {order}.", "Téléphone : {PHONE}, dossier {sap}."],
        "en": ["Call back on {PHONE} about order {order}.", "Phone {PHONE}; invoice {sap} is open."],
    },
    "IBAN": {
        "de": ["Überweisen Sie {amount} auf {IBAN}."],
        "fr": ["Virement de {amount} sur l'IBAN {IBAN}."],
        "en": ["Transfer {amount} to {IBAN} by {date}."],
    },
    "CARD": {
        "de": ["Karte {CARD} wurde belastet, Referenz {reference}."],
        "fr": ["La carte {CARD} a été débitée, référence {reference}."],
        "en": ["Card {CARD} was charged; reference {reference}."],
    },
    "IP": {
        "de": ["Anmeldung von {IP} mit Client {version}."],
        "fr": ["Connexion depuis {IP} avec le client {version}."],
        "en": ["Login from {IP} using client {version}."],
    },
    "DE_STEUER_ID": {"de": ["Steuer-ID {DE_STEUER_ID}, Gehalt {amount}."], "en": ["Tax ID {DE_STEUER_ID} is on file."]},
    "DE_RVNR": {"de": ["Sozialversicherungsnummer {DE_RVNR} liegt vor.", "RV-Nummer: {DE_RVNR}, Eintritt {date}."]},
    "DE_STEUERNUMMER": {
        "de": ["Steuernummer {DE_STEUERNUMMER}, Bescheid vom {date}."],
        "en": ["Our Steuernummer is {DE_STEUERNUMMER}."],
    },
    "FR_INSEE": {"fr": ["Numéro de sécurité sociale {FR_INSEE} reçu le {date}."]},
    "FR_SPI": {"fr": ["Numéro fiscal {FR_SPI} sur l'avis d'imposition.", "Votre SPI : {FR_SPI}, montant {amount}."]},
    "NL_BSN": {"en": ["Dutch BSN {NL_BSN} was checked."], "de": ["BSN: {NL_BSN} geprüft."]},
    "ES_DNI": {"en": ["Spanish DNI {ES_DNI} on file."], "fr": ["DNI {ES_DNI} vérifié."]},
    "UK_NINO": {"en": ["National insurance number {UK_NINO} is on file."]},
    "US_SSN": {"en": ["SSN {US_SSN} for the US payroll."]},
    "DATE_OF_BIRTH": {
        "de": [
            "Der Bewerber, geb. {DATE_OF_BIRTH}, beginnt am {date}.",
            "Geburtsdatum: {DATE_OF_BIRTH}",
            "geboren am {DATE_OF_BIRTH} in Köln",
        ],
        "fr": ["La salariée, née le {DATE_OF_BIRTH}, commence le {date}.", "Date de naissance : {DATE_OF_BIRTH}"],
        "en": [
            "The applicant (born {DATE_OF_BIRTH}) starts on {date}.",
            "DOB: {DATE_OF_BIRTH}",
            "Date of birth: {DATE_OF_BIRTH}",
        ],
    },
    "ADDRESS": {
        "de": ["Lieferadresse: {ADDRESS}.", "Neue Anschrift: {ADDRESS}."],
        "fr": ["Adresse de livraison : {ADDRESS}.", "Il habite au {ADDRESS}."],
        "en": ["Ship to {ADDRESS}.", "She moved to {ADDRESS} last month."],
    },
    "PERSON": {
        "de": [
            "Herr {SURNAME} hat am {date} angerufen.",
            "Sehr geehrte Frau {SURNAME},",
            "Frau Dr. {FULL_NAME} übernimmt die Stelle.",
            "Ansprechpartner: {FULL_NAME}",
            "Mit freundlichen Grüßen\n{FULL_NAME}",
            "{FULL_NAME} hat den Antrag {order} gestellt.",
            "Rückfrage bitte an {BARE_SURNAME} weiterleiten.",
        ],
        "fr": [
            "Mme {SURNAME} a appelé le {date}.",
            "M. {FULL_NAME} rejoint l'équipe.",
            "Cordialement,\n{FULL_NAME}",
            "Bonjour {GIVEN_ALONE}, merci pour le dossier {order}.",
            "Le dossier est suivi par {BARE_SURNAME} depuis lundi.",
        ],
        "en": [
            "Mr {FULL_NAME} called on {date}.",
            "Dear Ms {SURNAME},",
            "Kind regards,\n{FULL_NAME}",
            "{FULL_NAME} approved invoice {sap}.",
            "Hi {GIVEN_ALONE}, the report is attached.",
            "Ask {BARE_SURNAME} about the budget.",
        ],
    },
}
NEGATIVE = {
    "de": [
        "Version {version} ist installiert; Beleg {sap} gebucht am {date}.",
        "Sehr geehrte Damen und Herren, Platz 3 im Ranking ging an das Team Nord; im Jahr 2024 waren es 12 Teams.",
        "Hallo Team, der Arbeitsplatz 12 ist am Montag 12 Stunden belegt; Eintritt am {date} um 10:30:00.",
        "Bestellung {order} über {amount}, Lieferung am {date}.",
        "Referenznummer {reference}, Betrag {amount}.",
        "Update auf {version}; Buchung {sap} storniert.",
        "Rechnung {sap} vom {date}, fällig {amount}.",
    ],
    "fr": [
        "La {version} est déployée ; pièce {sap} du {date}.",
        "Madame, Monsieur, les 3 cours de Mathématiques commencent le {date} ; 2 places restent.",
        "Commande {order} de {amount}, livrée le {date}.",
        "Référence {reference}, montant {amount}.",
        "Facture {sap} du {date} : {amount}.",
    ],
    "en": [
        "{version} is installed; document {sap} posted on {date}.",
        "Dear Customer, the 2 Supreme Court rulings of {date} are attached; 98.5% of 4 Key Accounts agreed.",
        "Order {order} for {amount}, due {date}.",
        "Reference {reference} for {amount}.",
        "Upgraded to {version}; invoice {sap} is due {date}.",
    ],
}
PATTERN_TYPES = [
    "EMAIL",
    "PHONE",
    "IBAN",
    "CARD",
    "IP",
    "DE_STEUER_ID",
    "DE_RVNR",
    "DE_STEUERNUMMER",
    "FR_INSEE",
    "FR_SPI",
    "NL_BSN",
    "ES_DNI",
    "UK_NINO",
    "US_SSN",
    "DATE_OF_BIRTH",
]
CONTEXT_TYPES = ["ADDRESS", "PERSON"]


def _slot(name: str, rng: random.Random, language: str) -> tuple[str, str | None]:
    """The text of a slot and the type it is labelled with (None: a hard negative)."""
    given, surname = rng.choice(GIVEN), rng.choice(SURNAMES)
    values = {
        "EMAIL": email,
        "PHONE": phone,
        "IBAN": iban,
        "CARD": card,
        "IP": ip,
        "DE_STEUER_ID": steuer_id,
        "DE_RVNR": rvnr,
        "DE_STEUERNUMMER": steuernummer,
        "FR_INSEE": insee,
        "FR_SPI": spi,
        "NL_BSN": bsn,
        "ES_DNI": dni,
        "UK_NINO": nino,
        "US_SSN": ssn,
        "version": version,
        "sap": sap_number,
        "order": order_number,
        "amount": amount,
        "reference": reference,
    }
    if name in values:
        return values[name](rng), name if name.isupper() else None
    labelled = {
        "DATE_OF_BIRTH": (a_date(rng, language), "DATE_OF_BIRTH"),
        "ADDRESS": (address(rng, language), "ADDRESS"),
        "SURNAME": (surname, "PERSON"),
        "FULL_NAME": (f"{given} {surname}", "PERSON"),
        "GIVEN_ALONE": (given, "PERSON"),
        "BARE_SURNAME": (surname, "PERSON"),
        "date": (plain_date(rng, language), None),
    }
    return labelled[name]


def fill(template: str, rng: random.Random, language: str) -> Sample:
    text, gold = "", set()
    for piece in re.split(r"(\{\w+\})", template):
        if piece.startswith("{"):
            value, kind = _slot(piece[1:-1], rng, language)
            if kind:
                gold.add((kind, len(text), len(text) + len(value)))
            piece = value
        text += piece
    return Sample(language, text, frozenset(gold))


def labelled_set(per_type: int = 60, negatives: int = 300, seed: int = 0) -> list[Sample]:
    """`per_type` sentences planting each type (spread over the languages its templates have) and
    `negatives` sentences of hard negatives only."""
    rng, samples = random.Random(seed), []
    for templates in POSITIVE.values():
        languages = sorted(templates)
        for index in range(per_type):
            language = languages[index % len(languages)]
            samples.append(fill(rng.choice(templates[language]), rng, language))
    for index in range(negatives):
        language = ["de", "fr", "en"][index % 3]
        samples.append(fill(rng.choice(NEGATIVE[language]), rng, language))
    return samples
