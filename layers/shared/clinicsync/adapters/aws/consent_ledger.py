"""The consent ledger on the table (``ConsentRecords``, ``ConsentOutputMarks``), with the e-mail index
(``EmailIndex``) and the Mailchimp members a subject has had (``MemberStore``). Subjects are
``domain.keys`` subjects (a MIS id or an e-mail HMAC); nothing here holds an address."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys as tk
from clinicsync.adapters.aws.table import (
    TRANSACT_LIMIT,
    TableRepository,
    batch_writer,
    cancelled,
    failed_condition,
    set_attributes,
)
from clinicsync.domain.audience import MemberBook, is_subscriber_hash
from clinicsync.domain.store_ports import ConsentSource, OptInsSeen

AUDIT_TTL_SECONDS = 400 * 24 * 3600  # keep the opt-out audit trail for 400 days


def _audit_item(subject: str, channel: str, event: str, source: str, at: int, detail: str) -> dict[str, Any]:
    return {
        **tk.consent_audit(subject, at, channel, event),
        "event": event,
        "channel": channel,
        "source": source,
        "detail": detail,
        "at": at,
        "expires_at": at + AUDIT_TTL_SECONDS,
    }


def _opt_out_put(subject: str, channel: str, source: ConsentSource, at: int) -> dict[str, Any]:
    return {
        "Item": {**tk.consent_channel(subject, channel), "opted_out": True, "source": source, "at": at},
        # New, or an earlier opt-in that this later opt-out overrides.
        "ConditionExpression": "attribute_not_exists(pk) OR (opted_out = :no AND #at <= :at)",
        "ExpressionAttributeNames": {"#at": "at"},
        "ExpressionAttributeValues": {":no": False, ":at": at},
    }


def _already_out(chunk: Mapping[str, Sequence[Any]], exc: ClientError) -> list[str]:
    """The subjects of a cancelled transaction (their items in order) whose condition failed."""
    reasons = exc.response.get("CancellationReasons", [])
    if len(reasons) != sum(map(len, chunk.values())):
        return []
    failed, start = [], 0
    for subject, items in chunk.items():
        if any(r.get("Code") == "ConditionalCheckFailed" for r in reasons[start : start + len(items)]):
            failed.append(subject)
        start += len(items)
    return failed


def channel_keys(subjects: Sequence[str], channels: Sequence[str]) -> list[dict[str, str]]:
    """The keys ``opted_out_many`` reads: each subject's channel items."""
    return [tk.consent_channel(s, c) for s in dict.fromkeys(subjects) for c in channels]


def opted_out_from(subjects: Sequence[str], items: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Each subject's opted-out channels from the items read at ``channel_keys``."""
    found: dict[str, set[str]] = {s: set() for s in subjects}
    for item in items:
        if item.get("opted_out"):
            found[tk.subject_of(str(item["pk"]))].add(tk.channel_of(str(item["sk"])))
    return found


def on_record_from(subjects: Sequence[str], items: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Each subject's channels with any record (an opt-out, lifted or not) from the same items."""
    found: dict[str, set[str]] = {s: set() for s in subjects}
    for item in items:
        found[tk.subject_of(str(item["pk"]))].add(tk.channel_of(str(item["sk"])))
    return found


class DynamoConsentRecords(TableRepository):
    def record_opt_outs(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        """Opt-outs are sticky: recording one again is a no-op, and only a newer explicit opt-in (see
        ``record_opt_ins``) ever lifts one. Returns the channels that changed (they need outputs).

        Every channel and its audit entry go in one transaction (one request, not two per channel);
        if a channel is already out, the transaction is cancelled and the channels go one by one."""
        wanted = list(dict.fromkeys(channels))
        if not wanted:
            return []
        try:
            self._transact(self._opt_out_items(subject, wanted, source, at, detail))
            return wanted
        except ClientError as exc:
            if not cancelled(exc):
                raise
        return self._record_one_by_one(subject, wanted, source, at, detail)

    def record_opt_outs_many(
        self, opt_outs: Mapping[str, Sequence[str]], source: ConsentSource, at: int, detail: str = ""
    ) -> dict[str, list[str]]:
        """Many subjects' opt-outs in one transaction (up to 100 items: a channel and its audit entry are
        two), not one per subject. A chunk cancelled because a channel is already out goes subject by subject."""
        wanted = {s: list(dict.fromkeys(c)) for s, c in opt_outs.items()}
        changed: dict[str, list[str]] = {s: [] for s in wanted}
        chunks: list[dict[str, list[dict[str, Any]]]] = [{}]
        for subject, channels in wanted.items():
            items = self._opt_out_items(subject, channels, source, at, detail)
            if items and sum(map(len, chunks[-1].values())) + len(items) > TRANSACT_LIMIT:
                chunks.append({})
            if items:
                chunks[-1][subject] = items
        for chunk in filter(None, chunks):
            while chunk:
                try:
                    self._transact([item for items in chunk.values() for item in items])
                    changed.update({s: wanted[s] for s in chunk})
                    break
                except ClientError as exc:
                    if not cancelled(exc):
                        raise
                    out = _already_out(chunk, exc)
                # Subjects with a channel already out go one by one; the rest are sent again together.
                for subject in out or list(chunk):
                    changed[subject] = self._record_one_by_one(subject, wanted[subject], source, at, detail)
                    del chunk[subject]
        return changed

    def _opt_out_items(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for channel in channels:
            items.append({"Put": {"TableName": self._table.name, **_opt_out_put(subject, channel, source, at)}})
            audit = _audit_item(subject, channel, "opt_out", source, at, detail)
            items.append({"Put": {"TableName": self._table.name, "Item": audit}})
        return items

    def _record_one_by_one(
        self, subject: str, wanted: Sequence[str], source: ConsentSource, at: int, detail: str
    ) -> list[str]:
        audit = functools.partial(_audit_item, subject, event="opt_out", source=source, at=at, detail=detail)
        return [c for c in wanted if self._put_audited(_opt_out_put(subject, c, source, at), audit(channel=c))]

    def record_opt_ins(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        """An explicit opt-in from the MIS or the CRM lifts an opt-out only if it is newer than it."""
        if source not in ("mis", "crm"):
            raise ValueError("only the MIS or the CRM can record an opt-in")
        audit = functools.partial(_audit_item, subject, event="opt_in", source=source, at=at, detail=detail)
        return [
            channel
            for channel in channels
            if self._put_audited(
                {
                    "Item": {**tk.consent_channel(subject, channel), "opted_out": False, "source": source, "at": at},
                    "ConditionExpression": "opted_out = :yes AND #at < :at",
                    "ExpressionAttributeNames": {"#at": "at"},
                    "ExpressionAttributeValues": {":yes": True, ":at": at},
                },
                audit(channel=channel),
            )
        ]

    def _put_audited(self, conditional_put: dict[str, Any], audit: dict[str, Any]) -> bool:
        """One channel's change, then its audit entry; False when the condition says nothing changed."""
        try:
            self._table.put_item(**conditional_put)
        except ClientError as exc:
            if not failed_condition(exc):
                raise
            return False
        self._table.put_item(Item=audit)
        return True

    def observe_crm_opt_ins(
        self, subject: str, contact_id: str, opt_ins: Sequence[str], at: int, held: Sequence[str] = ()
    ) -> OptInsSeen:
        """Note the mapped CRM contact's opt-in field as seen at ``at`` (its modification time) and return
        the channels it gained since the last observation. Nothing is gained on the first observation of
        a contact, nor from a snapshot older than the last one: an unchanged field is never an opt-in,
        however recently the record was touched. A gained channel in ``held`` (the opt-out field still
        lists it) is not noted as seen, so it counts once that field is cleared."""
        key = tk.crm_opt_ins_seen(subject)
        old = self._table.get_item(Key=key, ConsistentRead=True).get("Item")
        same = old is not None and old.get("contact_id") == contact_id
        if old is not None and same and int(str(old["at"])) > at:
            return OptInsSeen([])  # older than what we already saw
        before = set(str(old["channels"]).split(",")) if old is not None and same else set(opt_ins)
        gained = set(opt_ins) - before
        waiting = gained & set(held)
        seen = ",".join(sorted(set(opt_ins) - waiting)) or "-"
        item: dict[str, Any] = {**key, "contact_id": contact_id, "channels": seen, "at": at}
        try:
            if old is None:
                self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
            else:  # unchanged since our read, or a concurrent observation decides
                self._table.put_item(
                    Item=item,
                    ConditionExpression="channels = :c AND contact_id = :k AND #at = :at",
                    ExpressionAttributeNames={"#at": "at"},
                    ExpressionAttributeValues={":c": old["channels"], ":k": old["contact_id"], ":at": old["at"]},
                )
        except ClientError as exc:
            if not failed_condition(exc):
                raise
            return OptInsSeen([])
        return OptInsSeen(sorted(gained - waiting), int(str(old["at"])) if old is not None and same else None)

    def opted_out_many(self, subjects: Sequence[str], channels: Sequence[str]) -> dict[str, set[str]]:
        return opted_out_from(subjects, self._batch_get(channel_keys(subjects, channels)))

    def channels_on_record(self, subject: str, channels: Sequence[str]) -> set[str]:
        return {tk.channel_of(str(item["sk"])) for item in self._batch_get(channel_keys([subject], channels))}

    def channels_on_record_many(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
        keys = [tk.consent_channel(s, c) for s, channels in wanted.items() for c in channels]
        return on_record_from(list(wanted), self._batch_get(keys))

    def consent_items(self, subject: str) -> list[dict[str, Any]]:
        """Everything the ledger holds for one subject: channels, audit trail, identity, outputs (for
        inspection: no use case reads the table's items)."""
        return list(self._query(tk.consent_pk(subject)))

    def note_identity(self, subject: str, keys: Mapping[str, str | None]) -> None:
        """Which keyed hashes and system ids a subject is known by (never the values themselves)."""
        self.note_identities({subject: keys})

    def note_identities(self, identities: Mapping[str, Mapping[str, str | None]]) -> None:
        """One update per subject, up to 100 per transaction."""
        updates = {
            s: set_attributes(tk.consent_identity(s), values)
            for s, keys in identities.items()
            if (values := {k: v for k, v in keys.items() if v})
        }
        self._update_items(updates)


class DynamoConsentOutputMarks(TableRepository):
    def output_done(self, subject: str) -> dict[str, str]:
        """Per output target, the ledger digest it last reached (a retried job skips finished targets)."""
        return self.outputs_done_many([subject])[subject]

    def outputs_done_many(self, subjects: Sequence[str]) -> dict[str, dict[str, str]]:
        done: dict[str, dict[str, str]] = {s: {} for s in subjects}
        for item in self._batch_get([tk.consent_outputs(s) for s in dict.fromkeys(subjects)]):
            subject = tk.subject_of(str(item["pk"]))
            done[subject] = {str(k): str(v) for k, v in item.items() if k not in ("pk", "sk")}
        return done

    def mark_output(self, subject: str, target: str, digest: str) -> None:
        self.mark_outputs_many({subject: {target: digest}})

    def mark_outputs(self, target: str, digests: Mapping[str, str]) -> None:
        """``mark_output`` for many subjects (subject -> digest)."""
        self.mark_outputs_many({subject: {target: digest} for subject, digest in digests.items()})

    def mark_outputs_many(self, marks: Mapping[str, Mapping[str, str]]) -> None:
        """Every target of a subject in one update, up to 100 subjects per transaction."""
        self._update_items({s: set_attributes(tk.consent_outputs(s), done) for s, done in marks.items() if done})


class DynamoEmailIndex(TableRepository):
    def index_emails(self, entries: Sequence[tuple[str, str]]) -> None:
        """(e-mail key, subject) pairs: a Mailchimp event names an e-mail, the ledger needs the person."""
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for email_key, subject in dict.fromkeys(entries):
                batch.put_item(Item=tk.email(email_key, subject))

    def subjects_by_email(self, email_key: str) -> list[str]:
        return [tk.email_subject_of(str(item["sk"])) for item in self._query(tk.email_pk(email_key))]


class DynamoMemberStore(TableRepository):
    def mailchimp_members_many(self, subjects: Sequence[str]) -> dict[str, MemberBook]:
        books = {s: MemberBook() for s in subjects}
        for item in self._batch_get([tk.members(s) for s in dict.fromkeys(subjects)]):
            book = books[tk.members_subject_of(str(item["pk"]))]
            book.current = str(item["current"]) if item.get("current") else None
            for name, value in item.items():
                if name.startswith(tk.MEMBER_PREFIX):
                    member = name.removeprefix(tk.MEMBER_PREFIX)
                    book.known.add(member)
                    if value != "-":
                        book.moved[member] = str(value)
        return books

    def note_mailchimp_address(self, subject: str, member: str) -> None:
        if not is_subscriber_hash(member):
            raise ValueError("not a subscriber hash")
        self._table.update_item(
            Key=tk.members(subject),
            UpdateExpression="SET #m = if_not_exists(#m, :dash)",  # a member moved on keeps where it went
            ExpressionAttributeNames={"#m": tk.MEMBER_PREFIX + member},
            ExpressionAttributeValues={":dash": "-"},
        )

    def note_mailchimp_member(self, subject: str, member: str, moved_from: str | None = None) -> None:
        """``member`` is now the subject's member; ``moved_from``, if given, was moved to it (upemail, or
        our address change). Old members stay listed: an opt-out still reaches them."""
        hashes = [h for h in (member, moved_from) if h]
        if not all(is_subscriber_hash(h) for h in hashes):
            raise ValueError("not a subscriber hash")
        names = {"#m": tk.MEMBER_PREFIX + member, "#cur": "current"}
        values = {":m": member, ":dash": "-"}
        sets = ["#cur = :m", "#m = :dash"]
        if moved_from and moved_from != member:
            names["#o"] = tk.MEMBER_PREFIX + moved_from
            sets.append("#o = :m")
        self._table.update_item(
            Key=tk.members(subject),
            UpdateExpression="SET " + ", ".join(sets),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )
