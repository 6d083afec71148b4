"""The first import's packing, counted on the Bitrix24 emulator at the simulated limits: a guard for the
backfill's request figure (`make bench`'s 142 at 5k), which no timed test may hold. Counts only, so it does
not depend on the machine; `run_point` pins the wall clock, so the seeded clinic is the same on any day, but
the checks are rules (full batches, one create each, few look-ups), not that clinic's figures."""

from __future__ import annotations

import math

import pytest

from sandbox.bench.scale import run_point

BATCH = 50  # Bitrix24 commands per `batch`
LOOK_UP_SHARE = 0.05  # look-ups and read-backs against creates: 50 of 1,382 (3.6 %) on 2026-12-07

pytestmark = pytest.mark.usefixtures("bench_environment_restored")


def test_a_first_import_of_one_invocation_sends_full_batches_and_creates_each_record_once() -> None:
    """1,000 appointments: ~450 patients, one syncer invocation's worth of bulk messages. Every batch but the
    last is full (145 → 142 at 5k came from part-filled batches), each contact and deal is created once, and
    the look-ups (by MIS id, `findbycomm`, their read-backs, the funnels' check) stay a small share."""
    point = run_point("bitrix24", 1000)
    figure, commands = point["figure"], point["crm_batch_commands"]
    total = sum(commands.values())
    creates = commands["crm.contact.add"] + commands["crm.deal.add"]

    assert figure["refused_503_429"] == 0
    assert commands["crm.deal.add"] == figure["appointments"]  # every eligible visit once (checked in the CRM too)
    assert commands["crm.contact.add"] == point["contacts_in_crm"]
    assert figure["crm_requests"] == math.ceil(total / BATCH), (figure["crm_requests"], commands)
    assert total - creates <= LOOK_UP_SHARE * creates, commands
