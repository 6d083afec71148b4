"""The lab directory's records, rule and ports (case A): LIS register entries, vTiger records, what the
sync writes, how a field value is normalised, and the field-by-field merge of a two-way record. Plain
data: the LIS and vTiger adapters and the directory sync (``directory``) all speak these types."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from clinicsync.domain.audience import AudienceMember
from clinicsync.domain.emails import normalise_email
from clinicsync.domain.keys import patient_subject
from clinicsync.domain.models import MisId
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.ports import Cursor

Kind = Literal["doctor", "organisation"]


KINDS: tuple[Kind, ...] = ("organisation", "doctor")  # organisations first: doctors link to their Account


TWO_WAY: dict[Kind, tuple[str, ...]] = {
    "doctor": ("first_name", "last_name", "specialty", "region", "city", "phone", "email"),
    "organisation": ("name", "org_type", "region", "city", "phone", "email"),
}


OPT_OUT_KEY = "do_not_mail"  # its base hash sits with the fields' (vTiger emailoptout <-> LIS flag)
ACCOUNT_KEY = "account"  # a doctor's Contact: the hash of the Account id we linked it to


class DirectoryRecord(BaseModel):
    """One LIS register entry, normalised (E.164 phone, lower-case e-mail, blanks as None)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    kind: Kind
    lis_id: MisId
    fields: dict[str, str | None]
    organisation_id: MisId | None = None  # a doctor's fund/clinic (its LIS id)
    do_not_mail: bool = False
    version: int = Field(ge=0)


@dataclass(frozen=True)
class CrmRecord:
    """One vTiger Contact/Account in canonical fields. ``invalid`` names fields the CRM holds a value
    for that we cannot accept (a phone that is not a number): they are never taken from the CRM."""

    kind: Kind
    crm_id: str
    lis_id: str | None
    fields: Mapping[str, str | None]
    do_not_mail: bool = False
    account_id: str | None = None
    modified: str = ""
    invalid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DirectoryPage:
    records: Sequence[DirectoryRecord]
    cursor: Cursor
    more: bool = False
    rejected: int = 0


@dataclass(frozen=True)
class CrmWriteSpec:
    kind: Kind
    lis_id: str
    crm_id: str | None  # None: create
    fields: Mapping[str, str | None]
    do_not_mail: bool
    account_id: str | None = None


class DirectorySource(Protocol):
    """The LIS's registers: an updated-since feed, reads by id and writes of single fields."""

    def changed(self, kind: Kind, cursor: Cursor | None) -> DirectoryPage: ...

    def get(self, kind: Kind, lis_ids: Sequence[str]) -> dict[str, DirectoryRecord]: ...

    def update(self, kind: Kind, lis_id: str, fields: Mapping[str, str | None]) -> None: ...


class DirectoryCrm(Protocol):
    """vTiger's Contacts and Accounts, as the directory sync needs them."""

    def changed_since(self, kind: Kind, since: str | None) -> tuple[list[CrmRecord], str | None]:
        """Records modified at or after ``since`` by anyone but our integration user, and the new cursor."""
        ...

    def find(self, kind: Kind, lis_ids: Sequence[str]) -> dict[str, CrmRecord]: ...

    def write(self, spec: CrmWriteSpec) -> str:
        """Create or update (the full record: vTiger's update replaces it); returns the CRM id."""
        ...


class AudienceSink(Protocol):
    def upsert(self, kind: Kind, members: Sequence[AudienceMember]) -> set[str]:
        """Members (``patient_id`` holds the LIS id) into the kind's audience; returns the accepted ids."""
        ...


def normalise(field_name: str, value: Any, region: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if field_name == "phone":
        return normalise_phone(text, region)
    if field_name == "email":
        return normalise_email(text) if "@" in text else None
    return text


def directory_subject(kind: Kind, lis_id: str) -> str:
    """The consent ledger's subject for a LIS record (the LIS is this clinic's MIS)."""
    return patient_subject(f"{kind}:{lis_id}")


def parse_directory_key(key: str) -> tuple[Kind, str] | None:
    kind, _, lis_id = key.partition(":")
    if kind in ("doctor", "organisation") and lis_id:
        return kind, lis_id  # type: ignore[return-value]
    return None


Owner = Literal["lis", "crm"]


@dataclass(frozen=True)
class Conflict:
    field: str
    winner: Owner


@dataclass(frozen=True)
class Merge:
    values: dict[str, str | None]  # what both sides hold after this sync
    to_lis: dict[str, str | None]  # CRM edits that flow back
    conflicts: tuple[Conflict, ...]


def merge_fields(
    kind: Kind,
    lis: DirectoryRecord,
    crm: CrmRecord | None,
    base: Mapping[str, str],
    digest: Callable[[str | None], str],
    owner: Callable[[str], Owner],
    unsure: Mapping[str, Sequence[str]] | None = None,
) -> Merge:
    """Field by field: equal values stay; one side changed since the base: that side wins; both changed:
    the configured owner wins. Without a base (never synced) the LIS, the register, wins. ``unsure``: per field,
    the hashes vTiger may hold of ours after a write of unknown outcome; a CRM value among them is no edit."""
    values: dict[str, str | None] = {}
    to_lis: dict[str, str | None] = {}
    conflicts: list[Conflict] = []
    for name in TWO_WAY[kind]:
        ours = lis.fields.get(name)
        if crm is None or name in crm.invalid:
            values[name] = ours
            continue
        theirs = crm.fields.get(name)
        if ours == theirs:
            values[name] = ours
            continue
        known = base.get(name)
        lis_changed = known is None or digest(ours) != known
        crm_changed = (
            known is not None and digest(theirs) != known and digest(theirs) not in (unsure or {}).get(name, ())
        )
        if lis_changed and crm_changed:
            winner = owner(name)
            conflicts.append(Conflict(name, winner))
        else:
            winner = "crm" if crm_changed else "lis"
        values[name] = theirs if winner == "crm" else ours
        if winner == "crm":
            to_lis[name] = theirs
    return Merge(values, to_lis, tuple(conflicts))


@dataclass
class DirectoryState:
    kind: Kind
    lis_id: str
    crm_id: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    audience: str | None = None  # hash of what the Mailchimp member was last sent
    # After a vTiger write of unknown outcome (see ``unsure_hashes``): per key of ``hashes``, what vTiger may
    # hold of ours besides it. Set on the write's failure path only; a completed sync clears it.
    unsure: dict[str, list[str]] = field(default_factory=dict)


def synced_hashes(
    kind: Kind,
    values: Mapping[str, str | None],
    do_not_mail: bool,
    account: str | None,
    digest: Callable[[str | None], str],
) -> dict[str, str]:
    """What a sync leaves in ``DirectoryState.hashes``: each two-way field, the opt-out, a doctor's Account."""
    hashes = {name: digest(value) for name, value in values.items()}
    hashes[OPT_OUT_KEY] = opt_out_hash(do_not_mail, digest)
    if kind == "doctor":
        hashes[ACCOUNT_KEY] = digest(account)
    return hashes


def opt_out_hash(do_not_mail: bool, digest: Callable[[str | None], str]) -> str:
    """How the opt-out's state is hashed in ``DirectoryState.hashes[OPT_OUT_KEY]``: one encoding for the
    sync that stores it and the checks that compare with it."""
    return digest("1" if do_not_mail else "0")


def row_hashes(crm: CrmRecord, digest: Callable[[str | None], str]) -> dict[str, str]:
    """A vTiger row hashed the way ``synced_hashes`` hashes what a sync leaves."""
    values = {name: crm.fields.get(name) for name in TWO_WAY[crm.kind]}
    return synced_hashes(crm.kind, values, crm.do_not_mail, crm.account_id or None, digest)


def unsure_hashes(
    sent: Mapping[str, str], read: CrmRecord | None, digest: Callable[[str | None], str]
) -> dict[str, list[str]]:
    """A vTiger write failed after it may have run (a timeout, a reset, a 5xx): the row now holds, per key,
    either what we sent (``sent``: its ``synced_hashes``) or what it held when this run read it (``read``:
    already judged by this run's merge). Either value seen later is ours, not a manager's edit; without this
    the sent values, differing from the stored hashes, were copied back into the LIS."""
    held = row_hashes(read, digest) if read is not None else {}
    return {key: sorted({value, held.get(key, value)}) for key, value in sent.items()}


def is_echo(crm: CrmRecord, state: DirectoryState | None, digest: Callable[[str | None], str]) -> bool:
    """The vTiger row holds exactly what the last sync left in both systems: our own write coming back, or
    a save that changed nothing. Judged by content, never by who saved it last, so a manager who works in
    vTiger under the integration's user is still heard. A hash the state lacks means "changed". A row that
    holds a write of unknown outcome (``DirectoryState.unsure``) is synced again: the merge knows it is ours."""
    if state is None or state.crm_id != crm.crm_id or crm.invalid:
        return False
    return state.hashes == row_hashes(crm, digest)


class DirectoryStateStore(Protocol):
    """Where the directory sync keeps each record's CRM id and last synced hashes."""

    def load(self, kind: Kind, lis_ids: Sequence[str]) -> dict[str, DirectoryState]: ...

    def save(self, states: Sequence[DirectoryState], now: int) -> None: ...
