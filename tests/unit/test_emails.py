"""E-mail identity (clinicsync.domain.emails): one canonical form, and a look-alike is never the real address.

The model here is independent of the product's code: a look-alike is built by swapping one ASCII
character of a real address for a non-ASCII character whose NFKC + case fold is that ASCII character.
"""

from __future__ import annotations

import hashlib
import string
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.emails import normalise_email

# Every BMP character that NFKC + case folding turns into a single ASCII letter or digit: the Kelvin
# sign, full-width forms, mathematical letters, ... (found by scanning, not listed by hand).
LOOK_ALIKES: dict[str, list[str]] = {}
for _code in range(0x80, 0x10000):
    _char = chr(_code)
    if unicodedata.category(_char) == "Cs":
        continue
    _folded = unicodedata.normalize("NFKC", _char).casefold()
    if len(_folded) == 1 and _folded in string.ascii_lowercase + string.digits:
        LOOK_ALIKES.setdefault(_folded, []).append(_char)

_LOCAL = st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=20)
_LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
ascii_addresses = st.builds(lambda local, host, tld: f"{local}@{host}.{tld}", _LOCAL, _LABEL, _LABEL)


def test_the_kelvin_sign_is_not_the_letter_k() -> None:
    """Regression: both were keyed as "kelvin@example.org", so an unsubscribe for the look-alike
    opted the real patient out."""
    hasher = KeyedHasher(b"h" * 32)
    assert hasher.email_key("\u212aelvin@example.org") != hasher.email_key("kelvin@example.org")
    assert hasher.email_key("Kelvin@Example.ORG ") == hasher.email_key("kelvin@example.org")


@given(real=ascii_addresses, data=st.data())
def test_an_address_that_matches_only_after_lossy_folding_is_another_person(real: str, data: st.DataObject) -> None:
    positions = [i for i, c in enumerate(real) if c.lower() in LOOK_ALIKES]  # the domain always has some
    index = data.draw(st.sampled_from(positions))
    look_alike = real[:index] + data.draw(st.sampled_from(LOOK_ALIKES[real[index].lower()])) + real[index + 1 :]
    hasher = KeyedHasher(b"h" * 32)
    assert normalise_email(look_alike) != normalise_email(real)
    assert hasher.email_key(look_alike) != hasher.email_key(real)
    # ... and a repeat of the same look-alike is still the same (other) person.
    assert hasher.email_key(look_alike) == hasher.email_key(f" {look_alike} ")


@given(real=ascii_addresses)
def test_ascii_addresses_compare_without_case_and_surrounding_space(real: str) -> None:
    assert normalise_email(f"  {real.upper()}\t") == normalise_email(real) == real.lower()


@given(
    local=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12),
    domain=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12),
)
def test_the_canonical_form_is_stable(local: str, domain: str) -> None:
    """Adapters store the canonical form and keys are taken from it again: it must be a fixed point."""
    once = normalise_email(f"{local}@{domain}")
    assert once is None or normalise_email(once) == once


def test_lossless_equivalents_are_one_address() -> None:
    same = [
        ("J\u00d6RG@b\u00fccher.de", "j\u00f6rg@xn--bcher-kva.de"),  # non-ASCII case, IDN vs its A-label
        ("jo\u0308rg@example.org", "j\u00f6rg@example.org"),  # decomposed vs precomposed umlaut
        (
            "\u041f\u0451\u0442\u0440@\u043f\u043e\u0447\u0442\u0430.\u0440\u0444",
            "\u043f\u0451\u0442\u0440@xn--80a1acny.xn--p1ai",
        ),
    ]
    for left, right in same:
        assert normalise_email(left) == normalise_email(right), (left, right)
    assert normalise_email("stra\u00dfe@example.org") != normalise_email("strasse@example.org")  # ß -> ss is lossy
    assert normalise_email("   ") is None and normalise_email(None) is None


def test_a_look_alikes_mailchimp_member_is_never_the_real_persons() -> None:
    from clinicsync.domain.audience import subscriber_hash

    real, look_alike = "nikolay@clinic.ru", "ni\u212aolay@clinic.ru"
    assert subscriber_hash(look_alike) != subscriber_hash(real)
    # Plain and non-ASCII addresses keep Mailchimp's own rule: MD5 of the lower-cased address.
    assert subscriber_hash(" Nikolay@Clinic.RU ") == hashlib.md5(real.encode()).hexdigest()
    assert subscriber_hash("ЮЛИЯ@почта.рф") == hashlib.md5("юлия@почта.рф".encode()).hexdigest()
