"""PII in one document: e-mail addresses, phone numbers, IP addresses, payment cards, IBANs.

What it is: :func:`find` (the spans of personal data in a text, by kind) and :func:`redact` (the
text with each span replaced by a placeholder such as ``<EMAIL>``, plus counts per kind). The
patterns are deliberately narrow, checked where a checksum exists: a payment card number must pass
the Luhn check and start like a card (Visa, Mastercard, Amex, Discover, JCB, Diners); an IBAN must
pass ISO 13616's mod-97 check; an IP address must be a global one (not private, loopback,
documentation or a netmask), and an IPv4 address not version-like (``v1.2.3.4``, ``version
10.0.0.1``, ``2.7.2.2``); a phone number needs a ``+`` country code or
the North American ``(555) 123-4567`` / ``555-123-4567`` shape. So ISBNs, version numbers, dates
and long numeric ids survive -- the near misses the tests pin down.

What it is not: a named-entity recogniser (names and street addresses are not found), or I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip": "<IP_ADDRESS>",
    "card": "<CARD_NUMBER>",
    "iban": "<IBAN>",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b"
)
_IPV4 = re.compile(
    r"(?<![\w.])(?<!v)(?<!version )(?<!Version )(?<!VERSION )"
    r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)(?!\.\w)"
)
# Candidates only: ipaddress decides. At least two colons and hex groups; "::" allowed.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# 13 to 19 digits in a row, or printed as cards are: 4-4-4-4(-3) or Amex's 4-6-5, one separator.
_CARD = re.compile(
    r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{5})"
    r"(?![\w-]|[ -]\d)"
)
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[0689]|6011|65|64[4-9]|35")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?!\w)")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+[1-9]\d{0,2}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]?\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w-]|\.\d)"
)
_DIGIT = re.compile(r"\d")
_IBAN_LENGTHS = {
    "AD": 24,
    "AT": 20,
    "BE": 16,
    "CH": 21,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "ES": 24,
    "FI": 18,
    "FR": 27,
    "GB": 22,
    "GR": 27,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IS": 26,
    "IT": 27,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MT": 31,
    "NL": 18,
    "NO": 15,
    "PL": 28,
    "PT": 25,
    "RO": 24,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "TR": 26,
}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if _IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


def _ipv4_ok(text: str) -> bool:
    # Four one-digit parts read as a version (2.7.2.2); non-global addresses (private, loopback,
    # documentation, netmasks) identify no one -- BigCode's PII pipeline keeps them too.
    return any(len(p) > 1 for p in text.split(".")) and ipaddress.IPv4Address(text).is_global


def _ipv6_ok(text: str) -> bool:
    # Three non-empty groups at least: slices (x[::2]), "a::b" and "::1" are not personal data.
    if sum(1 for g in text.split(":") if g) < 3 or not any(c.isdigit() for c in text):
        return False
    try:
        return ipaddress.IPv6Address(text).is_global
    except ValueError:
        return False


# (kind, pattern, check): tried in this order; a later kind never takes an earlier one's characters.
_RULES = (
    ("email", _EMAIL, None),
    ("iban", _IBAN, iban_ok),
    ("card", _CARD, _card_ok),
    ("ip", _IPV4, _ipv4_ok),
    ("ip", _IPV6, _ipv6_ok),
    ("phone", _PHONE, lambda t: 8 <= sum(c.isdigit() for c in t) <= 15),
)


def find(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every piece of personal data in `text`, in text order."""
    if "@" not in text and not _DIGIT.search(text):
        return []  # the common case, cheaply
    spans: list[tuple[int, int, str]] = []
    taken = bytearray(len(text))
    for kind, pattern, check in _RULES:
        for m in pattern.finditer(text):
            a, b = m.span()
            if any(taken[a:b]) or (check is not None and not check(m.group())):
                continue
            taken[a:b] = b"\x01" * (b - a)
            spans.append((a, b, kind))
    return sorted(spans)


def redact(text: str) -> tuple[str, Counter]:
    """`text` with each piece of personal data replaced by its kind's placeholder; counts per
    kind."""
    spans = find(text)
    if not spans:
        return text, Counter()
    parts, at = [], 0
    for a, b, kind in spans:
        parts += [text[at:a], PLACEHOLDERS[kind]]
        at = b
    parts.append(text[at:])
    return "".join(parts), Counter(kind for _, _, kind in spans)
