"""A container's first sync checks the config's stages against the CRM (``Syncer(verify=...)``): the CRM's
won and lost stages count as closed from then on. The check's reads ride in the sync's look-up, but a
message's observations are applied before that look-up, so they must already see the checked config."""

from __future__ import annotations

from typing import Any

from clinicsync.application.sync import Syncer
from clinicsync.domain.crm_ports import DealWrite
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import AppointmentStatus, CrmObservation, PatientChanges
from clinicsync_cli.memory_store import MemoryStore
from tests.helpers import InstantCrm, appointment, demo_config, patient

CONFIG = demo_config()
HASHER = KeyedHasher(b"k" * 32)
WON_IN_CRM = "C0:WON_BY_MANAGER"  # a won stage of the CRM's that the config does not list as closed


def _visit(status: AppointmentStatus, version: int) -> list[PatientChanges]:
    return [PatientChanges(patient=patient("p1"), appointments=(appointment("a1", "p1", status, version=version),))]


def test_a_containers_first_sync_applies_its_messages_observations_with_the_crms_closed_stages() -> None:
    """A manager moved our deal to a won stage of the CRM's own (the webhook's snapshot not flagged closed):
    the first sync of a new container, whose config is checked on its first use, records the deal closed,
    and the visit's next change never moves it out of that stage."""
    assert WON_IN_CRM not in CONFIG.pipeline(repeat=False).closed_stages
    store, crm = MemoryStore(), InstantCrm(lookups_need_intents=False)
    Syncer(CONFIG, store, crm, HASHER).sync(_visit(AppointmentStatus.BOOKED, 1))
    deal_id = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"].deal_id
    assert deal_id is not None
    checked: list[str] = []

    def verify() -> Any:
        checked.append("stages")
        return CONFIG.with_crm_closed_stages(frozenset({WON_IN_CRM}))

    new_container = Syncer(CONFIG, store, crm, HASHER, verify=verify)
    moved = CrmObservation(kind="deal_stage", patient_id="p1", appointment_id="a1", crm_id=deal_id, stage=WON_IN_CRM)
    new_container.sync([], [moved])
    assert checked == ["stages"]
    assert store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"].closed
    crm.writes.clear()
    new_container.sync(_visit(AppointmentStatus.ARRIVED, 2))
    assert not [w for w in crm.writes if isinstance(w, DealWrite) and w.deal_id == deal_id]
