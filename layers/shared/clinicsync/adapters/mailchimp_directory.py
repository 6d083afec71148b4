"""The lab's two Mailchimp audiences (doctors, funds/clinics) behind one sink for the directory sync and
one ``MailchimpMembers`` for the consent outputs (an unsubscribe reaches whichever audience holds the
address). Everything Mailchimp-specific is in ``clinicsync.adapters.mailchimp``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from clinicsync.adapters.mailchimp import AudienceMember, MailchimpAudience
from clinicsync.directory import Kind


class DirectoryAudiences:
    def __init__(self, doctors: MailchimpAudience, organisations: MailchimpAudience) -> None:
        self._audiences: dict[Kind, MailchimpAudience] = {"doctor": doctors, "organisation": organisations}

    def upsert(self, kind: Kind, members: Sequence[tuple[str, str, Mapping[str, str]]]) -> set[str]:
        return self._audiences[kind].upsert([AudienceMember(i, e, m) for i, e, m in members])

    def unsubscribe(self, email: str) -> bool:
        found = [audience.unsubscribe(email) for audience in self._audiences.values()]
        return any(found)
