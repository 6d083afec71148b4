"""What a consent output's mark says (``ConsentOutputMarks``): per target, the ledger digest it was brought
to, or a mark that no digest equals, so the target is due again."""

from __future__ import annotations

from collections.abc import Sequence

from clinicsync.domain.models import Channel

MEMBER_MOVED = "member-moved"  # an output mark no ledger digest equals: the target is due again
OUTCOME_UNKNOWN = "outcome-unknown"  # as well, for a target whose write failed (it may have landed)


def ledger_digest(opted_out: Sequence[str]) -> str:
    return ",".join(sorted(set(opted_out))) or "-"


def digest_channels(mark: str | None) -> set[str]:
    """The opted-out channels a mark says the target was brought to (none for the other marks)."""
    return set((mark or "").split(",")) & {c.value for c in Channel}
