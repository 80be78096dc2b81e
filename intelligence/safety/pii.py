"""Offline PII redaction: emails, phone numbers, payment card numbers and IBANs.

Recognizers:

- email: a pattern (local part, ``@``, dotted domain, alphabetic TLD);
- phone: libphonenumber's matcher (``phonenumbers.PhoneNumberMatcher``) at leniency
  VALID, so only numbers valid for their region count; numbers without a country
  code are read in ``phone_region``;
- card: 13 to 19 digits, optionally grouped by spaces or dashes, passing the Luhn
  check (``stdnum.luhn``) and starting with 2 to 6 (the major card networks' ranges),
  so most order numbers and other digit runs are left alone;
- IBAN: two letters, two check digits and the account, with or without spaces,
  passing ``stdnum.iban`` (country length and format, mod-97 checksum).

Redaction works segment by segment, so that it can run on a stream. Text is cut into
segments at whitespace. The exception is a single space between characters that
could both belong to one number or IBAN (``4111 1111``, ``DE89 3704``,
``(650) 253``). That space keeps its neighbours in one segment. Each segment is
redacted on its own. Every item these recognizers find fits inside one segment, and
where a segment ends depends only on the characters next to it. So
:class:`StreamingRedactor` can release text up to the last segment end it is sure
of, and its output is exactly the redaction of the whole text, however the text was
split into deltas.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from intelligence.settings import PII_KINDS, PiiKind

if TYPE_CHECKING:
    from types import ModuleType

LABELS: dict[PiiKind, str] = {
    "email": "[email redacted]",
    "phone": "[phone redacted]",
    "card": "[card number redacted]",
    "iban": "[IBAN redacted]",
}
# When two findings overlap, the stricter recognizer wins (an IBAN's digits can also
# read as a phone number).
_PRIORITY: dict[PiiKind, int] = {"iban": 0, "card": 1, "email": 2, "phone": 3}

_EMAIL = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_DIGIT_GROUPS = re.compile(r"(?<!\d)\d+(?:[ \-]\d+)*(?!\d)")
_DIGITS = re.compile(r"\d+")
_IBAN_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){10,30}")
_WHITESPACE_RUN = re.compile(r"\s+")
# Characters on either side of a single space that may join one item across it.
_JOIN_BEFORE = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ)")
_JOIN_AFTER = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ(+")


@dataclass(frozen=True, slots=True)
class PiiMatch:
    kind: PiiKind
    start: int
    end: int


class PiiRedactor:
    """Finds and redacts the configured kinds of PII in a text (see the module doc)."""

    def __init__(self, kinds: Iterable[PiiKind] = PII_KINDS, *, phone_region: str = "US") -> None:
        # Imported here: libphonenumber's and stdnum's metadata cost ~0.1 s at import, which
        # a deployment without PII redaction should not pay.
        import phonenumbers
        from stdnum import iban, luhn

        self._phonenumbers: ModuleType = phonenumbers
        self._iban: ModuleType = iban
        self._luhn: ModuleType = luhn
        self.kinds: frozenset[PiiKind] = frozenset(kinds)
        if phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {phone_region!r}")
        self.phone_region = phone_region

    def redact(self, text: str) -> str:
        if not self.kinds:
            return text
        out: list[str] = []
        start = 0
        for run in _WHITESPACE_RUN.finditer(text):
            if is_segment_break(text, run.start(), run.end()):
                out.append(self._redact_segment(text[start : run.start()]))
                out.append(run.group(0))
                start = run.end()
        out.append(self._redact_segment(text[start:]))
        return "".join(out)

    def find(self, text: str) -> list[PiiMatch]:
        """What :meth:`redact` would replace, with positions in ``text``."""
        found: list[PiiMatch] = []
        start = 0
        for run in _WHITESPACE_RUN.finditer(text):
            if is_segment_break(text, run.start(), run.end()):
                found += self._segment_matches(text, start, run.start())
                start = run.end()
        found += self._segment_matches(text, start, len(text))
        return found

    def _redact_segment(self, segment: str) -> str:
        matches = self._segment_matches(segment, 0, len(segment))
        if not matches:
            return segment
        parts: list[str] = []
        position = 0
        for match in matches:
            parts += [segment[position : match.start], LABELS[match.kind]]
            position = match.end
        parts.append(segment[position:])
        return "".join(parts)

    def _segment_matches(self, text: str, start: int, end: int) -> list[PiiMatch]:
        segment = text[start:end]
        digits = sum(ch.isdigit() for ch in segment)
        candidates: list[PiiMatch] = []
        # Cheap gates first: most segments are plain words.
        if "email" in self.kinds and "@" in segment:
            candidates += [PiiMatch("email", m.start(), m.end()) for m in _EMAIL.finditer(segment)]
        iban_shaped = [m.span() for m in _IBAN_CANDIDATE.finditer(segment)] if digits >= 4 else []
        if "iban" in self.kinds:
            candidates += _ibans(segment, iban_shaped, self._iban.is_valid)
        if "card" in self.kinds and digits >= 13:
            # Digits inside something shaped like an IBAN are not read as a card number,
            # even when the IBAN's checksum fails.
            candidates += [
                m
                for m in _cards(segment, self._luhn.is_valid)
                if all(m.end <= start or m.start >= end for start, end in iban_shaped)
            ]
        if "phone" in self.kinds and digits >= 5:
            phonenumbers = self._phonenumbers
            candidates += [
                PiiMatch("phone", m.start, m.end)
                for m in phonenumbers.PhoneNumberMatcher(
                    segment, self.phone_region, leniency=phonenumbers.Leniency.VALID
                )
            ]
        chosen: list[PiiMatch] = []
        for candidate in sorted(candidates, key=lambda m: (_PRIORITY[m.kind], m.start)):
            if all(candidate.end <= c.start or candidate.start >= c.end for c in chosen):
                chosen.append(candidate)
        return [
            PiiMatch(m.kind, m.start + start, m.end + start)
            for m in sorted(chosen, key=lambda m: m.start)
        ]


def is_segment_break(text: str, start: int, end: int) -> bool:
    """Whether the whitespace run ``text[start:end]`` ends a segment. Only a single
    space between two characters that can continue a number or an IBAN does not."""
    if end - start != 1 or text[start] != " " or start == 0 or end == len(text):
        return True
    return not (text[start - 1] in _JOIN_BEFORE and text[end] in _JOIN_AFTER)


def _cards(segment: str, luhn_valid: Callable[[str], bool]) -> list[PiiMatch]:
    found: list[PiiMatch] = []
    for run in _DIGIT_GROUPS.finditer(segment):
        offset = run.start()
        groups = [(m.start() + offset, m.end() + offset) for m in _DIGITS.finditer(run.group(0))]
        i = 0
        while i < len(groups):
            best: tuple[int, int] | None = None
            digits = ""
            for j in range(i, len(groups)):
                digits += segment[groups[j][0] : groups[j][1]]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and digits[0] in "23456" and luhn_valid(digits):
                    best = (j, len(digits))
            if best is None:
                i += 1
                continue
            found.append(PiiMatch("card", groups[i][0], groups[best[0]][1]))
            i = best[0] + 1
    return found


def _ibans(
    segment: str, shaped: list[tuple[int, int]], iban_valid: Callable[[str], bool]
) -> list[PiiMatch]:
    found: list[PiiMatch] = []
    for start, end in shaped:
        # Positions of the candidate's characters, spaces left out, so that the longest
        # valid IBAN at its start can be mapped back onto the text.
        positions = [k for k in range(start, end) if segment[k] != " "]
        compact = "".join(segment[p] for p in positions).upper()
        for length in range(min(len(compact), 34), 14, -1):
            if iban_valid(compact[:length]):
                found.append(PiiMatch("iban", start, positions[length - 1] + 1))
                break
    return found


class StreamingRedactor:
    """Redacts a text that arrives in pieces: :meth:`feed` returns the redacted text that
    is safe to release now, :meth:`flush` the rest at the end. The concatenated output
    equals ``redactor.redact`` of the whole text, so no PII item split across pieces
    slips through half-redacted. What is held back is the last, unfinished segment."""

    def __init__(self, redactor: PiiRedactor) -> None:
        self._redactor = redactor
        self._pending = ""

    def feed(self, text: str) -> str:
        self._pending += text
        cut = _last_final_break(self._pending)
        if cut == 0:
            return ""
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self._redactor.redact(ready)

    def flush(self) -> str:
        ready, self._pending = self._pending, ""
        return self._redactor.redact(ready) if ready else ""


def _last_final_break(text: str) -> int:
    """End of the last whitespace run that surely ends a segment: one followed by a
    character already received (a run at the very end may still grow or join)."""
    cut = 0
    for run in _WHITESPACE_RUN.finditer(text):
        if run.end() < len(text) and is_segment_break(text, run.start(), run.end()):
            cut = run.end()
    return cut
