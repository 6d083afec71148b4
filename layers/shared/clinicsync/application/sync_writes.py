"""The write side of a sync beyond one ``apply``: its working set (``SyncWork``), and the patients held for a
look-up that rides in the first write request (``LookupInWrites``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from clinicsync.domain.crm_ports import CrmMatches, CrmWrite, LookupInWrites, WriteOutcome
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.rules import PatientPlan


@dataclass
class HeldPlans:
    """What the held patients add to a sync once their look-up answers: the matches completed, their plans
    (in the held patients' order), their writes and the create intents noted for them. Filled as the
    writes run, so a sync that fails after the held writes were sent still knows they may have landed."""

    matches: CrmMatches | None = None  # None: the look-up failed (or never answered)
    plans: list[PatientPlan] = field(default_factory=list)
    writes: list[CrmWrite] = field(default_factory=list)
    intents: list[str] = field(default_factory=list)


@dataclass
class SyncWork:
    """A sync's working set from its look-up to its last write: the patients planned (``live``) and those
    held for their phones' look-up (``held``), the matches, the plans (in ``live``'s order), the new leads'
    links, the writes (the plans' and the links') and the create intents noted for them. ``added`` is the
    held patients' share, filled while the writes run (``apply_with_held``), joined when their look-up
    answered (``join_held``)."""

    live: list[PatientChanges]
    held: list[PatientChanges]
    matches: CrmMatches
    plans: list[PatientPlan] = field(default_factory=list)
    links: list[CrmWrite] = field(default_factory=list)
    writes: list[CrmWrite] = field(default_factory=list)
    intents: list[str] = field(default_factory=list)
    added: HeldPlans = field(default_factory=HeldPlans)

    def join_held(self) -> None:
        """The held patients join the sync if their look-up answered (if not, the outcome failed them)."""
        if self.added.matches is not None:
            self.matches = self.added.matches
            self.live = self.live + self.held
            self.plans = self.plans + self.added.plans
            self.writes = self.writes + self.added.writes
            self.intents = self.intents + self.added.intents

    def maybe_sent(self) -> list[str]:
        """The patients a write may have been sent for: the held patients' too, joined yet or not (a sync
        that stops after their writes went out must still doubt their digests)."""
        return sorted({w.patient_id for w in [*self.writes, *self.added.writes]})


def apply_with_held(
    gateway: LookupInWrites,
    writes: Sequence[CrmWrite],
    matches: CrmMatches,
    held: Sequence[PatientChanges],
    record_intents: Callable[[Sequence[CrmWrite]], list[str]],
    plan: Callable[[list[PatientChanges], CrmMatches], list[PatientPlan]],
    added: HeldPlans,
) -> WriteOutcome:
    """``writes``, with the look-up of the held patients' phones riding in their first request; the held
    patients are then planned, their creates noted as intents, and their writes join the same batches:
    all of that goes in ``added``, never in the caller's lists. If their look-up failed, the outcome
    fails them (nothing of theirs was written) and ``added`` stays empty."""

    def plan_held(completed: CrmMatches | None) -> list[CrmWrite]:
        if completed is None:
            return []
        later = plan(list(held), completed)
        more = [w for p in later for w in p.writes]
        added.matches, added.plans = completed, later
        added.intents = record_intents(more)  # before any of their creates is sent
        added.writes = more
        return more

    outcome = gateway.apply_then(list(writes), matches, plan_held)
    if added.matches is None:
        outcome.failed.update({item.patient.mis_id: "lookup_failed" for item in held})
    return outcome
