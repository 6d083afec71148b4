"""The poller's scheduled jobs (EventBridge Scheduler): which use case a job runs, for which clinic.

- ``poll``: the MIS feed since the cursor; ``resync``: re-read a window and repair drift;
- ``catchup``: what changed in the CRM since the last run (its webhooks are never retried);
- ``backfill``: the operator's first import (``clinicsync backfill``), checkpointed and resumable.

The lab (LIS <-> vTiger) runs its directory sync for every job instead.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import tenacity  # noqa: F401 - every poll's MIS requests retry through it (clinicsync.retrying loads it on use)
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync.adapters.aws import health, store  # noqa: F401 - built by every poll, see below
from clinicsync.application import poll  # noqa: F401
from clinicsync.domain import config, crypto  # noqa: F401
from clinicsync.domain.models import SYNC_MESSAGE_MODELS, build_now
from clinicsync.runtime import deadline, wiring
from clinicsync.runtime.observe import Backfill, CatchUp, Directory, Failed, Poll, observe

# The container builds its parts on first use. What every poll (each minute) builds, the config, the poller
# and its table, is imported above with the handler (Lambda's init), not on the first job's clock; the
# catch-up's CRM side, the clinic's MIS adapter and the lab's directory load where they are built.
build_now(*SYNC_MESSAGE_MODELS)  # every poll writes its changes as sync messages; the catch-up's CRM events on use

Job = Literal["poll", "resync", "catchup", "backfill"]


def run(
    job: Job, context: LambdaContext, window_days: int = 3, restart: bool = False, max_pages: int = 1000
) -> dict[str, Any]:
    token = deadline.start(context.get_remaining_time_in_millis())  # the catch-up's CRM pacing stops in time
    try:
        return _run(job, context, window_days, restart, max_pages)
    except Exception:
        observe(Failed())  # a MIS outage shows in `clinicsync status` (errors in the last hour)
        raise
    finally:
        deadline.end(token)


def _run(job: Job, context: LambdaContext, window_days: int, restart: bool, max_pages: int) -> dict[str, Any]:
    if wiring.container().clinic_config().directory is not None:
        return _directory(job, context)
    if job == "catchup":
        caught = wiring.container().crm_catch_up().run()
        observe(CatchUp(caught))
        return {
            "events": caught.events,
            "manual_moves": caught.manual_moves,
            "echoes": caught.echoes,
            "paused": caught.paused,
        }
    poller = wiring.container().poller()
    remaining = context.get_remaining_time_in_millis
    if job == "backfill":
        state = poller.backfill(remaining, wiring.container().backfill_checkpoint(), window_days, restart, max_pages)
        observe(Backfill(state))
        return state.as_dict()
    window = window_days * 86400
    report = (
        poller.resync(remaining, window) if job == "resync" else poller.poll(remaining, owner=context.aws_request_id)
    )
    observe(Poll(report))
    return asdict(report)


def _directory(job: Job, context: LambdaContext) -> dict[str, Any]:
    """vTiger has no webhooks, so ``poll`` and ``catchup`` are the same poll of both sides (``modifiedtime``
    in vTiger, ``updated_since`` in the LIS); ``resync`` reads both registers in full (unchanged records
    cost no write)."""
    lease = context.get_remaining_time_in_millis() // 1000 + 1  # held at most until this invocation ends
    directory = wiring.container().directory_sync()
    report = directory.run(full=job == "resync", owner=context.aws_request_id, lease_seconds=lease)
    observe(Directory(report))
    return asdict(report)
