"""No test's outcome may depend on the wall clock, the time zone or the day (issue 15, defect 6).

The sample clinic is built relative to today, so which patients have open bookings moves with the
calendar. These tests travel the clock themselves (time-machine) to days that once broke the suite.
"""

from __future__ import annotations

import itertools
import os
import ssl
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clinicsync.domain.models import AppointmentStatus
from sandbox.local import start_local_clinic
from sandbox.runtime import LocalAws
from sandbox.seed import CLINIC_TZ
from sandbox.tls import loopback_pki
from tests.helpers import ROOT

# 23:30 MSK on 31 January 2027: the 12-patient sample's only open booking belongs to a patient who
# refused e-mail and SMS, so a CRM opt-out there changed nothing (test_e2e_bitrix24's opt-out test).
REFUSING_DAY = datetime(2027, 1, 31, 23, 30, tzinfo=CLINIC_TZ)
_ids = itertools.count(1)  # hypothesis replays an example: each run gets its own stack


@settings(max_examples=4)
@example(day=REFUSING_DAY, size=12)
@given(
    day=st.datetimes(datetime(2026, 1, 1), datetime(2028, 12, 31)).map(lambda d: d.replace(tzinfo=CLINIC_TZ)),
    size=st.sampled_from([10, 12, 20]),
)
def test_open_booking_is_a_patient_without_refusals_or_family_whatever_the_day(
    local_aws: LocalAws, day: datetime, size: int
) -> None:
    with time_machine.travel(day, tick=True):
        clinic = start_local_clinic(aws=local_aws, clinic_id=f"clock-{next(_ids)}", patients=size, appointments=size)
        try:
            clinic.sync()
            clinic.deliver_webhooks()  # the first sync's echoes
            visit = clinic.open_booking()
            assert clinic.crm.pending_events() == 0  # the test's next CRM event is its own
            deal = clinic.crm.deals()[str(visit)]
            assert (
                deal["stage"] == clinic.config.pipeline(repeat=deal["category"] != "0").stages[AppointmentStatus.BOOKED]
            )
            client = next(int(v["client_id"]) for v in clinic.mis.visits() if v["id"] == str(visit))
            patient = next((p for p in clinic.sample.patients if p.id == client), None)
            if patient is not None:  # else a new card booked for the test: no flags, no family
                assert not (patient.deny_email or patient.deny_sms_dispatches or patient.deny_calls)
                assert not (patient.deny_whatsapp or patient.deny_sms_notifications or patient.deny_data_processing)
                assert patient.family_id is None and not patient.archived
        finally:
            clinic.close()


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """A full mutual-TLS handshake in memory: OpenSSL checks both chains against the real clock."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer_in in (("client", tls_client, c_out, s_in), ("server", tls_server, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("shift_days", [-400, -1, 0, 1, 400])
def test_throwaway_certificates_are_valid_for_the_real_and_the_travelled_clock(shift_days: int) -> None:
    # Minted at a travelled time, checked by OpenSSL at the real one.
    with time_machine.travel(datetime.now(CLINIC_TZ) + timedelta(days=shift_days, hours=5), tick=True):
        pki = loopback_pki()
    _handshake(pki.server_context(), pki.client_context())


def test_pinned_time_moves_every_xdist_worker_and_ticks(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import time
            from datetime import UTC, datetime, timedelta

            import pytest

            @pytest.mark.parametrize("n", range(4))
            def test_clock(n):
                pinned = datetime(2027, 1, 31, 20, 55, tzinfo=UTC)
                first = datetime.now(UTC)
                assert pinned <= first < pinned + timedelta(minutes=5)
                time.sleep(0.01)
                assert datetime.now(UTC) > first  # the clock ticks on
                assert abs(time.time() - first.timestamp()) < 60
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLINICSYNC_PINNED_TIME": "2027-01-31T23:55+03:00"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "tests.plugins.pinned_clock", str(probe)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout


def test_a_pinned_time_without_a_zone_is_refused(tmp_path: Path) -> None:
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLINICSYNC_PINNED_TIME": "2027-01-31T23:55"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "tests.plugins.pinned_clock", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0 and "needs a UTC offset" in run.stdout + run.stderr
