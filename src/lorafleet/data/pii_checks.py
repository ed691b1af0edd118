"""Check digits and issuer rules of the identifiers `pii` finds: what keeps a number that merely
looks like one (an order number, a reference, an amount) out of the findings.

Each function takes the identifier compacted (separators removed, letters upper-case) and says
whether it is well formed *and* its check digit holds. Where an identifier has no check digit, the
structure that real numbers must have is checked instead (issuer ranges, dates inside it, area
codes). Sources: ISO 13616 and the SWIFT IBAN registry (IBAN), ISO/IEC 7812 and the card schemes'
published IIN ranges (cards), VKVV § 2 and its Anlage (German Versicherungsnummer), § 139b AO with
ISO 7064 (Steuer-ID), the EU's TIN specifications (French SPI, NIR, Dutch BSN, Spanish DNI).
"""

from __future__ import annotations

from datetime import date


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, digit in enumerate(int(d) for d in reversed(digits)):
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


# (first digits low, high, lengths): the IIN ranges of the card schemes in use in Europe and the US.
_CARD_RANGES = [
    ("4", "4", {16, 19}),  # Visa (13-digit numbers are no longer issued)
    ("51", "55", {16}),  # Mastercard
    ("2221", "2720", {16}),  # Mastercard 2-series
    ("34", "34", {15}),  # American Express
    ("37", "37", {15}),
    ("300", "305", {14, 15, 16, 17, 18, 19}),  # Diners Club
    ("36", "36", {14, 15, 16, 17, 18, 19}),
    ("38", "39", {16, 17, 18, 19}),
    ("6011", "6011", {16, 17, 18, 19}),  # Discover
    ("644", "649", {16, 17, 18, 19}),
    ("65", "65", {16, 17, 18, 19}),
    ("62", "62", {16, 17, 18, 19}),  # UnionPay
    ("3528", "3589", {16, 17, 18, 19}),  # JCB
    ("2200", "2204", {16, 17, 18, 19}),  # Mir
    ("5018", "5018", {16, 17, 18, 19}),  # Maestro
    ("5020", "5020", {16, 17, 18, 19}),
    ("5038", "5038", {16, 17, 18, 19}),
    ("5893", "5893", {16, 17, 18, 19}),
    ("6304", "6304", {16, 17, 18, 19}),
    ("6759", "6759", {16, 17, 18, 19}),
    ("6761", "6763", {16, 17, 18, 19}),
]


def card_valid(digits: str) -> bool:
    """A payment card: a known scheme's IIN range and length, and Luhn. Luhn alone passes one
    reference number in ten."""
    in_range = any(
        len(digits) in lengths and int(low) <= int(digits[: len(low)]) <= int(high)
        for low, high, lengths in _CARD_RANGES
    )
    return in_range and luhn_valid(digits)


# Lengths of the IBANs of the SWIFT IBAN registry, by country.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def mod97_valid(code: str) -> bool:
    """ISO 13616 (IBAN): country and check digits moved to the end, letters as 10..35, mod 97 == 1."""
    rearranged = code[4:] + code[:4]
    if not rearranged.isalnum() or not rearranged.isascii():
        return False
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def iban_valid(code: str) -> bool:
    """An IBAN of a registry country, of that country's length, passing mod 97."""
    return IBAN_LENGTHS.get(code[:2]) == len(code) and code[2:4].isdigit() and mod97_valid(code)


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


# Bereichsnummern of the pension insurers (VKVV, Anlage); Deutsche Rentenversicherung Bund adds 40
# to a regional insurer's number.
_RVNR_REGIONAL = {2, 3, 4, *range(8, 22), 23, 24, 25, 26, 28, 29}
_RVNR_AREAS = _RVNR_REGIONAL | {n + 40 for n in _RVNR_REGIONAL} | {38, 39, 40, 80, 81, 82, 89}


def de_rvnr_valid(code: str) -> bool:
    """German social-insurance number (Versicherungsnummer, VKVV § 2): insurer's area number,
    birth date ddmmyy, first letter of the birth name, serial, check digit. The letter counts as
    its two-digit position in the alphabet; digits times 2,1,2,5,7,1,2,1,2,1,2,1, the digit sums of
    the products added, mod 10."""
    if len(code) != 12 or not (code[:8].isdigit() and "A" <= code[8] <= "Z" and code[9:].isdigit()):
        return False
    day, month = int(code[2:4]), int(code[4:6])
    if int(code[:2]) not in _RVNR_AREAS or not (1 <= day <= 31 and 1 <= month <= 12):
        return False
    digits = code[:8] + f"{ord(code[8]) - 64:02d}" + code[9:11]
    products = (int(d) * w for d, w in zip(digits, (2, 1, 2, 5, 7, 1, 2, 1, 2, 1, 2, 1), strict=True))
    return sum(p // 10 + p % 10 for p in products) % 10 == int(code[11])


def de_steuernummer_valid(digits: str) -> bool:
    """German Steuernummer (per Finanzamt): 10 or 11 digits in a Land's layout, or 13 in the
    federal one, whose fifth digit is 0. Its check digit follows one of several Land-specific
    procedures that are not all published, so only the layout is checked: the pattern's context
    (a label such as "Steuernummer") carries the rest."""
    return len(digits) in (10, 11) or (len(digits) == 13 and digits[4] == "0")


def fr_insee_valid(digits: str) -> bool:
    """French social security number (NIR): key = 97 - (first 13 digits mod 97); Corsica's 2A/2B
    count as 19/18."""
    number = digits[:13].replace("2A", "19").replace("2B", "18")
    return len(digits) == 15 and 97 - int(number) % 97 == int(digits[13:])


def fr_spi_valid(digits: str) -> bool:
    """French numéro fiscal de référence (SPI): 13 digits, the first 0-3, the last three the first
    ten mod 511."""
    return (
        len(digits) == 13
        and digits[0] in "0123"
        and int(digits[:10]) > 0
        and int(digits[:10]) % 511 == int(digits[10:])
    )


def nl_bsn_valid(digits: str) -> bool:
    """Dutch citizen service number: the 'elfproef', weights 9..2 and -1, sum divisible by 11."""
    total = sum(int(d) * w for d, w in zip(digits[:8], range(9, 1, -1), strict=True)) - int(digits[8])
    return total % 11 == 0 and total > 0


def es_dni_valid(compact: str) -> bool:
    return "TRWAGMYFPDXBNJZSQVHLCKE"[int(compact[:8]) % 23] == compact[8]


def is_calendar_date(day: int, month: int, year: int) -> bool:
    try:
        date(year, month, day)
    except ValueError:
        return False
    return True


VALIDATORS = {
    "luhn": luhn_valid,
    "card": card_valid,
    "mod97": mod97_valid,
    "iban": iban_valid,
    "us_ssn": us_ssn_valid,
    "de_steuer_id": de_steuer_id_valid,
    "de_rvnr": de_rvnr_valid,
    "de_steuernummer": de_steuernummer_valid,
    "fr_insee": fr_insee_valid,
    "fr_spi": fr_spi_valid,
    "nl_bsn": nl_bsn_valid,
    "es_dni": es_dni_valid,
}
