"""The write side of a sync beyond one ``apply``: patients held for a look-up that rides in the first
write request (``LookupInWrites``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from clinicsync.domain.crm_ports import CrmMatches, CrmWrite, LookupInWrites, WriteOutcome
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.rules import PatientPlan


def apply_with_held(
    gateway: LookupInWrites,
    writes: list[CrmWrite],
    intents: list[str],
    plans: list[PatientPlan],
    matches: CrmMatches,
    held: list[PatientChanges],
    record_intents: Callable[[Sequence[CrmWrite]], list[str]],
    plan: Callable[[list[PatientChanges], CrmMatches], list[PatientPlan]],
) -> tuple[WriteOutcome, CrmMatches | None]:
    """``writes``, with the look-up of the held patients' phones riding in their first request; the held
    patients are then planned, their creates noted as intents, and their writes (added to ``plans``,
    ``writes`` and ``intents``) join the same batches. If their look-up failed, the outcome fails them
    (nothing of theirs was written) and no matches come back."""
    looked_up: list[CrmMatches] = []

    def plan_held(completed: CrmMatches | None) -> list[CrmWrite]:
        if completed is None:
            return []
        looked_up.append(completed)
        later = plan(held, completed)
        plans.extend(later)
        more = [w for p in later for w in p.writes]
        intents.extend(record_intents(more))  # before any of their creates is sent
        writes.extend(more)
        return more

    outcome = gateway.apply_then(list(writes), matches, plan_held)
    if not looked_up:
        outcome.failed.update({item.patient.mis_id: "lookup_failed" for item in held})
    return outcome, looked_up[0] if looked_up else None
