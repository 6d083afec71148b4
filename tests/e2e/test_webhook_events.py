"""One event list per CRM: the receiver queues exactly the events that discovery registers.

Bitrix24 fires ONCRM<ENTITY><ADD|UPDATE|DELETE>; the stack binds some of them (``clinicsync check``) and
the receiver must queue exactly those: an event it queues but never registers is dead code on a real
portal, one it registers but ignores costs a call per change for nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import urlencode

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.adapters.amocrm import webhook as amocrm_webhook
from clinicsync_cli.discovery import AMOCRM_EVENTS, BITRIX24_EVENTS
from sandbox.emulators.bitrix24 import EVENT_NAMES
from sandbox.local import LocalClinic


def _post_bitrix24(clinic: LocalClinic, event: str) -> dict[str, str]:
    assert clinic.bitrix is not None
    auth = {"auth[application_token]": clinic.bitrix.application_token, "auth[member_id]": clinic.bitrix.member_id}
    body = urlencode({"event": event, "data[FIELDS][ID]": "1", **auth})
    route = "/webhooks/bitrix24"
    reply = clinic.stack.invoke(
        "CrmWebhookFunction",
        {
            "version": "2.0",
            "routeKey": f"POST {route}",
            "rawPath": route,
            "headers": {"content-type": "application/x-www-form-urlencoded"},
            "requestContext": {"http": {"method": "POST", "path": route, "sourceIp": "127.0.0.1"}, "stage": "$default"},
            "body": body,
            "isBase64Encoded": False,
        },
    )
    assert reply["statusCode"] == 200, reply
    return dict(json.loads(reply["body"]))


def test_the_bitrix24_receiver_queues_exactly_the_events_discovery_binds(
    make_clinic: Callable[..., LocalClinic],
) -> None:
    clinic = make_clinic(patients=1, appointments=1, rate_limit=False)
    queued = {event for event in EVENT_NAMES if _post_bitrix24(clinic, event)["status"] == "queued"}
    assert queued == set(BITRIX24_EVENTS)
    assert clinic.stack.queue_depth("CrmEventQueue") == len(BITRIX24_EVENTS)


def test_a_contact_a_manager_adds_is_not_an_event_we_bind_on_either_crm() -> None:
    """Only a contact we created and mapped speaks for a patient; ours come back as echoes."""
    assert "ONCRMCONTACTADD" not in BITRIX24_EVENTS
    assert "ONCRMCONTACTUPDATE" in BITRIX24_EVENTS
    assert "add_contact" not in AMOCRM_EVENTS
    assert "update_contact" in AMOCRM_EVENTS


ENTITY_GROUPS = ("leads", "contacts", "companies", "customers", "tasks")
ACTIONS = ("add", "update", "delete", "status", "restore", "note", "responsible")


@given(group=st.sampled_from(ENTITY_GROUPS), action=st.sampled_from(ACTIONS), ids=st.integers(1, 3))
def test_the_amocrm_receiver_reads_exactly_the_events_discovery_registers(group: str, action: str, ids: int) -> None:
    form = {group: {action: {str(i): {"id": str(100 + i)} for i in range(ids)}}}
    events = amocrm_webhook.crm_events(form, received_at=0)
    name = f"{action}_{group.rstrip('s')}"
    assert [e.event for e in events] == ([name] * ids if name in AMOCRM_EVENTS else [])
