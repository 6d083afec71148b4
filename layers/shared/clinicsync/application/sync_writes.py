"""The write side of a sync beyond one ``apply``: patients held for a look-up that rides in the first
write request (``LookupInWrites``)."""

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
