"""The lab's two Mailchimp audiences (doctors, funds/clinics) behind one sink for the directory sync and
one ``MailchimpMembers`` for the consent outputs (an unsubscribe reaches whichever audience holds the
address). Everything Mailchimp-specific is in ``clinicsync.adapters.mailchimp.client``."""

from __future__ import annotations

from collections.abc import Sequence

from clinicsync.adapters.mailchimp.client import MailchimpAudience
from clinicsync.domain.audience import AudienceMember
from clinicsync.domain.directory_records import Kind


class DirectoryAudiences:
    def __init__(self, doctors: MailchimpAudience, organisations: MailchimpAudience) -> None:
        self._audiences: dict[Kind, MailchimpAudience] = {"doctor": doctors, "organisation": organisations}

    def upsert(self, kind: Kind, members: Sequence[AudienceMember]) -> set[str]:
        return self._audiences[kind].upsert(members)

    def unsubscribe_member(self, member: str) -> bool:
        found = [audience.unsubscribe_member(member) for audience in self._audiences.values()]
        return any(found)
