"""One writer per patient: a sync's claims on its patients, and the doubt a write of unknown outcome casts
on their stored digests (``PatientState.write_epoch``, docs/storage.md "Writes of unknown outcome")."""

from __future__ import annotations

from collections.abc import Callable

from clinicsync.domain.store_ports import Claimed, ClaimRelease, SyncStore
from clinicsync.retrying import exponential, poll


def claim_patients(
    store: SyncStore,
    patient_ids: list[str],
    owner: str,
    claim_seconds: int,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    wait_seconds: float,
) -> Claimed:
    """Claim ``patient_ids`` for ``owner``, waiting up to ``wait_seconds`` for those another sync holds;
    what is still held then is left out (deferred). Claims left behind by a dead attempt are taken over
    and reported in ``Claimed.taken_over``."""
    claimed = Claimed()

    def claim_pending() -> Claimed:
        pending = [pid for pid in patient_ids if pid not in claimed]
        if pending:
            try:
                got = store.claim_patients(pending, owner, int(clock()), claim_seconds)
                claimed.update(got)
                claimed.taken_over |= got.taken_over
            except Exception:
                if claimed:  # ours from an earlier round: they must not stay held for claim_seconds
                    store.release_claims(sorted(claimed))
                raise
        return claimed

    return poll(
        claim_pending,
        until=lambda held: len(held) == len(patient_ids),
        wait=exponential(0.1, cap=1.0),
        sleep=sleep,
        stop=lambda waited: waited >= wait_seconds,
    )


def mark_unsure(store: SyncStore, patient_ids: list[str], release: ClaimRelease) -> None:
    """Doubt the patients' stored digests (``PatientState.write_epoch``). If that cannot be stored, their
    claims stay behind, so the next attempt takes them over and doubts them then."""
    try:
        store.mark_unsure(patient_ids)
    except Exception:
        release.patients = [pid for pid in release.patients if pid not in set(patient_ids)]
        raise
