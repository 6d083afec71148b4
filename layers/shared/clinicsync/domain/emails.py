"""E-mail identity: the one rule for when two addresses belong to the same person.

Every address we index, hash or compare goes through ``normalise_email`` first (MIS adapters, the
connector, the keyed hash, the lab directory).

- ASCII letters are lower-cased: providers treat the local part case-insensitively in practice, and
  this keeps the keys of plain ASCII addresses what they always were.
- Other characters get NFKC and a case fold (``Jörg`` and ``JÖRG`` are one address), and the domain is
  IDNA-encoded (``bücher.de`` and ``xn--bcher-kva.de`` are one domain).
- Lossy folding makes a different person. When a non-ASCII character would fold into ASCII (the Kelvin
  sign into ``k``, full-width ``ａ`` into ``a``, ``ß`` into ``ss``), the address is a look-alike of an ASCII
  one. Its identity is then the address as sent, with only its ASCII letters lower-cased. It never
  equals the real address, so an unsubscribe for a look-alike cannot opt the real patient out.
"""

from __future__ import annotations

# unicodedata and idna are imported where a non-ASCII address needs them: plain ASCII ones (nearly all)
# never do, so a cold start does not load the Unicode database and IDNA's tables for them.


def _fold(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", unicodedata.normalize("NFKC", text).casefold())


def _folds_into_ascii(char: str) -> bool:
    return not char.isascii() and any(c.isascii() for c in _fold(char))


def _ascii_lower(text: str) -> str:
    # str.lower() is not safe here: "\u212a".lower() == "k".
    return "".join(c.lower() if c.isascii() else c for c in text)


def lower_keeping_look_alikes(text: str) -> str:
    """``str.lower()``, except that a non-ASCII character whose lower case is ASCII keeps its case."""
    return "".join(c if not c.isascii() and c.lower().isascii() else c.lower() for c in text)


def _domain(text: str) -> str:
    import idna  # IDNA 2008 (an httpx dependency); the stdlib codec is IDNA 2003, which folds U+212A to "k"

    labels = []
    for label in _fold(text).split("."):
        try:
            labels.append(idna.encode(label).decode("ascii") if label and not label.isascii() else label)
        except idna.IDNAError:
            labels.append(label)  # not a valid IDN: still a distinct, stable identity
    return ".".join(labels)


def normalise_email(raw: str | None) -> str | None:
    """The canonical form of an address (None when blank). Idempotent: the canonical form of a
    canonical form is itself, so a stored address and a freshly sent one compare equal."""
    text = (raw or "").strip()
    if not text:
        return None
    if text.isascii():
        return text.lower()
    if any(_folds_into_ascii(c) for c in text):
        return _ascii_lower(text)
    local, at, domain = text.rpartition("@")
    if not at:
        return _fold(text)
    return f"{_fold(local)}@{_domain(domain)}"
