"""Key formats that more than one module needs: built and parsed only here.

Consent subjects name the person the ledger answers for: ``pat:<MIS id>`` for a known patient,
``email:<HMAC>`` for an address we cannot tie to one. Create intents name a CRM record about to be
created, or a deal about to be written under a visit it is not ours for yet (a re-booking's continuation):
``P#<patient id>`` for a contact, ``A#<appointment id>`` for a deal.
"""

from __future__ import annotations

import hashlib

_PATIENT = "pat:"
_EMAIL = "email:"
# What a consent job may name: a MIS id as the MIS spells it, or the hasher's 40 hex digits.
SUBJECT_PATTERN = rf"^({_PATIENT}[A-Za-z0-9_.:-]{{1,64}}|{_EMAIL}[0-9a-f]{{40}})$"

_CONTACT_INTENT = "P#"
_DEAL_INTENT = "A#"


def patient_subject(patient_id: str) -> str:
    return f"{_PATIENT}{patient_id}"


def email_subject(email_key: str) -> str:
    return f"{_EMAIL}{email_key}"


def subject_patient(subject: str) -> str | None:
    """The MIS id a subject names, or None for an address-only subject."""
    return subject.removeprefix(_PATIENT) if subject.startswith(_PATIENT) else None


def contact_intent(patient_id: str) -> str:
    return f"{_CONTACT_INTENT}{patient_id}"


def deal_intent(appointment_id: str) -> str:
    return f"{_DEAL_INTENT}{appointment_id}"


def poll_lease_name(source: str) -> str:
    """The lease of a MIS feed's poll (one poll of the feed at a time), in every store."""
    return f"poll:{source}"


def shard_of(patient_id: str, shards: int) -> int:
    """A patient's shard (its sync queue's FIFO group): stable across processes and deploys (Python's
    hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:4], "big") % shards
