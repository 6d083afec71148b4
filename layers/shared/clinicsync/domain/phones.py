"""Phone normalisation: every phone we write or index is E.164, whatever format the MIS stored."""

from __future__ import annotations

import phonenumbers


def normalise_phone(raw: str | None, default_region: str = "RU") -> str | None:
    """Return the E.164 form, or None when the input is not a valid number.

    Russian MIS data mixes ``+7 916…``, ``8916…`` and bare ten-digit ``916…``; phonenumbers parses the
    first two with the RU region, and a bare national number is retried with a trunk ``8``.
    """
    if not raw or not raw.strip():
        return None
    text = raw.strip()
    candidates = [text]
    digits = "".join(ch for ch in text if ch.isdigit())
    if default_region == "RU" and len(digits) == 10 and not text.startswith("+"):
        candidates.append("8" + digits)
    for candidate in candidates:
        try:
            parsed = phonenumbers.parse(candidate, default_region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return None
