"""What a batch of consent jobs did, target by target: counts and reasons, never a name or an address."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConsentReport:
    jobs: int = 0
    crm_written: int = 0
    mis_written: int = 0
    mailchimp_unsubscribed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # subject -> reason (no PII)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1
