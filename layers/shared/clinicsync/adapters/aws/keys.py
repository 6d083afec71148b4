"""The store's table keys: every ``pk``/``sk`` format of the repositories in this package, spelt once.

    pk                      sk                    what
    PAT#<patient id>        STATE                 contact id, version, content hash, phone HMAC, first visit
    PAT#<patient id>        APPT#<appt id>        deal id, version, content hash, status, stage, closed, manual move
    CRM#contact#<id>        MAP                   reverse map for webhooks: patient id
    CRM#deal#<id>           MAP                   reverse map: patient id, appointment id
    CURSOR                  <source>              the poller's opaque cursor for a MIS feed
    LEASE                   <name>                single-runner lease (overlapping scheduled polls: poll:<source>)
    CLAIM#<patient id>      C                     the syncer invocation writing this patient right now
    ADOPT#<L|D><crm id>     A                     the appointment adopting a CRM lead or deal
    INTENT#<P|A>#<id>       I                     a create or a continuation about to be sent (lost responses)
    PHONE#<hmac>            PAT#<patient id>      phone index (keyed HMAC, never the number)
    CRMPHONES               E#<contact>#<hmac>    the CRM account's contacts by phone key (amoCRM look-up)
    CRMPHONES               CURSOR                how far that index has read the CRM (``updated_at``)
    CONSENT#<subject>       CH#<channel>          current state per channel: opted_out, source, at (sticky)
    CONSENT#<subject>       AUDIT#<ts>#<ch>#<ev>  audit trail (event, source, detail), expires via TTL
    CONSENT#<subject>       ID                    keyed hashes and system ids the subject is known by
    CONSENT#<subject>       OUT                   per output (crm, mis, mailchimp): the ledger digest it reached
    CONSENT#<subject>       SEEN#crm_opt_ins      the CRM opt-in field as last seen or written: contact id, channels, at
    EMAIL#<hmac>            SUBJ#<subject>        e-mail index: a Mailchimp event's address -> the subject
    BACKFILL                <MIS kind>            the first import's checkpoint: cursor, counts, done
    CURSOR|BACKFILL         <sk>#PART#<gen>#<n>   a cursor too large for its item, compressed, in parts (spill.py)
    IDENT#DIRECTORY         DOCTOR#<id>|BRANCH#<id>|TIMETABLE   IDENT's staff and branch names, interval counts
    DIR#<kind>#<lis id>     STATE                 the lab directory's CRM id and last synced hashes
    MEMBERS#<subject>       M                     Mailchimp members the person has had: m_<subscriber hash> = "-"
                                                  or the hash it moved to (upemail); current = their member now

One query on ``PAT#<id>`` returns everything about a patient. Nothing here holds a name, a phone
or an e-mail: subjects and phone keys are HMACs under the clinic's key.
"""

from __future__ import annotations

from clinicsync.domain.keys import poll_lease_name

Key = dict[str, str]

_PATIENT = "PAT#"
_APPOINTMENT = "APPT#"
STATE = "STATE"
CURSOR = "CURSOR"
LEASE = "LEASE"
CRM_PHONES = "CRMPHONES"
CRM_PHONES_CURSOR = CURSOR
_CONSENT = "CONSENT#"
_CHANNEL = "CH#"
_MEMBERS = "MEMBERS#"
MEMBER_PREFIX = "m_"  # a Mailchimp member's attribute name on the MEMBERS item


def patient_pk(patient_id: str) -> str:
    return f"{_PATIENT}{patient_id}"


def patient_of(pk_or_sk: str) -> str:
    return pk_or_sk.removeprefix(_PATIENT)


def appointment_sk(appointment_id: str) -> str:
    return f"{_APPOINTMENT}{appointment_id}"


def appointment_of(sk: str) -> str | None:
    """The appointment id an item's sort key names, or None for another item."""
    return sk.removeprefix(_APPOINTMENT) if sk.startswith(_APPOINTMENT) else None


def crm_map(entity: str, crm_id: str) -> Key:
    return {"pk": f"CRM#{entity}#{crm_id}", "sk": "MAP"}


IDENT_DIRECTORY = "IDENT#DIRECTORY"


def backfill(source: str) -> Key:
    return {"pk": "BACKFILL", "sk": source}


def directory_state(kind: str, lis_id: str) -> Key:
    return {"pk": f"DIR#{kind}#{lis_id}", "sk": STATE}


def cursor(source: str) -> Key:
    return {"pk": CURSOR, "sk": source}


def spilled_prefix(head: Key, generation: int) -> str:
    return f"{head['sk']}#PART#{generation}#"


def spilled_part(head: Key, generation: int, index: int) -> Key:
    """Part ``index`` of the value the item ``head`` spilled in ``generation`` (same partition)."""
    return {"pk": head["pk"], "sk": f"{spilled_prefix(head, generation)}{index}"}


def lease(name: str) -> Key:
    return {"pk": LEASE, "sk": name}


def poll_lease(source: str) -> Key:
    return lease(poll_lease_name(source))


def claim(patient_id: str) -> Key:
    return {"pk": f"CLAIM#{patient_id}", "sk": "C"}


def adoption(key: str) -> Key:
    return {"pk": f"ADOPT#{key}", "sk": "A"}


_INTENT = "INTENT#"


def intent(key: str) -> Key:
    return {"pk": f"{_INTENT}{key}", "sk": "I"}


def intent_of(pk: str) -> str:
    return pk.removeprefix(_INTENT)


def phone(phone_key: str, patient_id: str) -> Key:
    return {"pk": phone_pk(phone_key), "sk": patient_pk(patient_id)}


def phone_pk(phone_key: str) -> str:
    return f"PHONE#{phone_key}"


def crm_phone(contact_id: str, phone_key: str) -> Key:
    """An entry of the CRM phone index (read back by ``crm_phone_entry``)."""
    return {"pk": CRM_PHONES, "sk": f"E#{contact_id}#{phone_key}"}


def crm_phone_entry(sk: str) -> tuple[str, str] | None:
    kind, _, rest = sk.partition("#")
    contact_id, _, phone_key = rest.partition("#")
    return (contact_id, phone_key) if kind == "E" and contact_id and phone_key else None


def consent_pk(subject: str) -> str:
    return f"{_CONSENT}{subject}"


def subject_of(pk: str) -> str:
    return pk.removeprefix(_CONSENT)


def consent_channel(subject: str, channel: str) -> Key:
    return {"pk": consent_pk(subject), "sk": f"{_CHANNEL}{channel}"}


def channel_of(sk: str) -> str:
    return sk.removeprefix(_CHANNEL)


def consent_audit(subject: str, at: int, channel: str, event: str) -> Key:
    return {"pk": consent_pk(subject), "sk": f"AUDIT#{at:012d}#{channel}#{event}"}


def consent_identity(subject: str) -> Key:
    return {"pk": consent_pk(subject), "sk": "ID"}


def consent_outputs(subject: str) -> Key:
    return {"pk": consent_pk(subject), "sk": "OUT"}


def crm_opt_ins_seen(subject: str) -> Key:
    return {"pk": consent_pk(subject), "sk": "SEEN#crm_opt_ins"}


_SUBJECT = "SUBJ#"


def email_pk(email_key: str) -> str:
    return f"EMAIL#{email_key}"


def email(email_key: str, subject: str) -> Key:
    return {"pk": email_pk(email_key), "sk": f"{_SUBJECT}{subject}"}


def email_subject_of(sk: str) -> str:
    return sk.removeprefix(_SUBJECT)


def members(subject: str) -> Key:
    return {"pk": f"{_MEMBERS}{subject}", "sk": "M"}


def members_subject_of(pk: str) -> str:
    return pk.removeprefix(_MEMBERS)
