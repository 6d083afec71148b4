"""A stage change whose outcome was unknown, overtaken by a newer event of the same visit before any retry
stored it: the real syncer on moto and the Bitrix24 emulator (its guard in the write's batch, its
last-modifier field). Found by `make chaos` (seed 2026, Bitrix24): a deal left at "no-show" for a visit the
MIS had moved to a new time, because the newer event was planned from the state before the lost write."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway
from clinicsync.application.sync import Syncer, SyncIncomplete
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import AppointmentStatus, PatientChanges
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from sandbox.local import setup_demo_portal
from tests.adapters.test_bitrix24_gateway import _client
from tests.helpers import T0, appointment, days, demo_config, patient

CONFIG = demo_config()
PRIMARY = CONFIG.pipeline(repeat=False)


@pytest.fixture
def portal() -> Iterator[tuple[Bitrix24Emulator, str]]:
    emulator = Bitrix24Emulator()
    setup_demo_portal(emulator)
    server = ServedApp(emulator).start()
    yield emulator, server.base_url
    server.stop()


def _visit(status: AppointmentStatus, version: int, moved: int = 0) -> list[PatientChanges]:
    return [
        PatientChanges(
            patient=patient(), appointments=(appointment(status=status, version=version, start=T0 + days(moved)),)
        )
    ]


def test_a_stage_change_whose_response_was_lost_and_whose_message_was_overtaken_is_set_right_by_the_next_event(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """The no-show's write lands but its response is lost (the patient's state is not stored); its message
    is then overtaken (dead-lettered, replayed later as stale) by the front desk moving the visit to a new
    time. The move's stage ("booked") is the one our state remembers, yet the deal is at "no-show": the
    move sends its stage, and the guard's read finds the deal last modified by us, so that stage is our
    own lost write, not a manager's move to respect. The deal ends where the MIS says."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = Syncer(
        CONFIG, store, Bitrix24Gateway(_client(emulator, base), CONFIG), KeyedHasher(b"k" * 32), claim_wait=0
    )
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [deal_id] = emulator.deals
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.BOOKED]

    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.NO_SHOW]  # landed, unknown to us

    syncer.sync(_visit(AppointmentStatus.BOOKED, 3, moved=5))  # MEDODS: a moved no-show is "approved" again
    syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))  # the dead letter replayed: older, changes nothing
    assert [d["ORIGIN_ID"] for d in emulator.deals.values()] == ["a1"]
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.RESCHEDULED]
    state = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"]
    assert (state.version, state.stage, state.manual_stage) == (3, PRIMARY.stages[AppointmentStatus.RESCHEDULED], None)
