"""Discovery and webhook registration without a stack: a Bitrix24 OAuth app lists and binds its event
handlers (an incoming webhook cannot), and the stage proposal reads stage names and semantics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from clinicsync.domain.models import AppointmentStatus as S
from clinicsync_cli.connect import Credentials, bitrix24_client
from clinicsync_cli.discovery import (
    BITRIX24_EVENTS,
    CrmPipeline,
    Stage,
    check_webhooks,
    discover_crm,
    propose_stages,
    register_webhooks,
)
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from tests.helpers import demo_config


@pytest.fixture
def oauth_portal() -> Iterator[tuple[Bitrix24Emulator, dict[str, object]]]:
    emu = Bitrix24Emulator(rate_limit=False)
    served = ServedApp(emu).start()
    emu.base_url = served.base_url
    emu.server_endpoint = served.base_url + "/rest/"
    values = {
        **emu.issue_tokens(),
        "client_id": emu.client_id,
        "client_secret": emu.client_secret,
        "application_token": emu.application_token,
    }
    yield emu, values
    served.stop()


def test_an_oauth_app_binds_the_stacks_events_once_and_check_finds_them(
    oauth_portal: tuple[Bitrix24Emulator, dict[str, object]],
) -> None:
    _, values = oauth_portal
    client = bitrix24_client(Credentials(dict(values)), httpx.Client(timeout=10.0))
    config = demo_config()
    api = "https://abc123.execute-api.eu-central-1.amazonaws.com"
    before = discover_crm(client)
    assert before.webhooks == {}  # an app can list its handlers
    problems = check_webhooks(config, before, api, values)
    assert len(problems) == 1 and problems[0].severity == "error" and "/webhooks/bitrix24" in problems[0].message

    register_webhooks(client, "bitrix24", api, values)
    register_webhooks(client, "bitrix24", api, values)  # a second deploy binds nothing twice
    after = discover_crm(client)
    assert after.webhooks == {f"{api}/webhooks/bitrix24": set(BITRIX24_EVENTS)}
    assert check_webhooks(config, after, api, values) == []
    assert before.pipelines and {s.id for s in before.pipelines[0].stages} >= {"NEW", "WON", "LOSE"}


def test_stages_are_proposed_from_their_names_and_semantics() -> None:
    pipeline = CrmPipeline(
        "7",
        "Clinic",
        [
            Stage("10", "New request", 10, "open"),
            Stage("20", "Appointment booked", 20, "open"),
            Stage("30", "Confirmed by phone", 30, "open"),
            Stage("40", "Patient arrived", 40, "open"),
            Stage("50", "Visit completed", 50, "open"),
            Stage("60", "Paid", 60, "won"),
            Stage("70", "Lost", 70, "lost"),
        ],
    )
    stages, guessed = propose_stages(pipeline)
    assert stages == {
        S.BOOKED: "20",
        S.RESCHEDULED: "20",
        S.CONFIRMED: "30",
        S.ARRIVED: "40",
        S.COMPLETED: "50",
        S.NO_SHOW: "10",  # an open stage before booked: the admin calls back
        S.CANCELLED: "70",
    }
    assert any("no_show" in g for g in guessed) and any("cancelled" in g for g in guessed)
