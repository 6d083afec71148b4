"""Traces hold no secret: a Lambda's tracer (X-Ray, recorded in memory) around a Bitrix24 incoming-webhook
call, a Mailchimp member call and an AWS call; the recorded subsegments carry neither the webhook secret nor
the e-mail's MD5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from clinicsync.domain.audience import subscriber_hash
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from sandbox.emulators.mailchimp import MailchimpEmulator

ROOT = Path(__file__).resolve().parents[2]

# Runs in its own interpreter: the tracer patches libraries process-wide, as it does in a Lambda container.
TRACED = textwrap.dedent(
    """
    import json, os, sys
    from aws_xray_sdk.core import xray_recorder
    from aws_xray_sdk.core.context import Context

    import clinicsync.observability  # the Lambda's tracer: patches what it patches, as at a cold start
    import boto3, httpx
    from clinicsync.adapters.bitrix24.client import Bitrix24Client
    from clinicsync.adapters.http.pacing import Pacer
    from clinicsync.adapters.mailchimp.client import MailchimpAudience, MailchimpClient

    class Recorded:
        def __init__(self):
            self.entities = []
        def send_entity(self, entity):
            self.entities.append(entity.serialize())
        def set_daemon_address(self, address):
            pass

    recorded = Recorded()
    xray_recorder.configure(emitter=recorded, context=Context(), sampling=False, streaming_threshold=10**6)
    xray_recorder.begin_segment("syncer")
    bitrix = Bitrix24Client(os.environ["WEBHOOK_URL"], http=httpx.Client(), pacer=Pacer(100.0, 100))
    bitrix.call("crm.deal.list", {"select": ["ID"]})
    chimp = MailchimpClient(os.environ["MAILCHIMP_KEY"], httpx.Client(), base_url=os.environ["MAILCHIMP_URL"])
    MailchimpAudience(chimp, os.environ["MAILCHIMP_LIST"]).unsubscribe(os.environ["EMAIL"])
    boto3.client("sqs").list_queues()
    xray_recorder.end_segment()
    print(json.dumps(recorded.entities))
    """
)


def test_recorded_subsegments_hold_no_webhook_secret_and_no_email_hash(local_aws: object) -> None:
    secret = os.urandom(8).hex()
    bitrix = Bitrix24Emulator(webhook_secret=secret, application_token="t" * 32, member_id="m" * 32)
    chimp = MailchimpEmulator(api_key=f"{os.urandom(16).hex()}-us21", batch_seconds=0.0)
    email = "patient.trace@example.org"
    with ServedApp(bitrix) as bitrix_server, ServedApp(chimp) as chimp_server:
        chimp.base_url = chimp_server.base_url
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("layers/shared", "cli", ".")),
            "LAMBDA_TASK_ROOT": str(ROOT),  # Powertools traces only inside Lambda
            "POWERTOOLS_TRACE_DISABLED": "false",
            "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
            "WEBHOOK_URL": bitrix.webhook_url(bitrix_server.base_url),
            "MAILCHIMP_KEY": chimp.api_key,
            "MAILCHIMP_URL": f"{chimp_server.base_url}/3.0",
            "MAILCHIMP_LIST": chimp.list_id,
            "EMAIL": email,
        }
        done = subprocess.run(
            [sys.executable, "-c", TRACED], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stderr
    entities = json.loads(done.stdout.strip().splitlines()[-1])
    trace = "\n".join(entities)
    assert '"namespace": "aws"' in trace.replace('":"', '": "')  # the recorder did record (the SQS call)
    assert secret not in trace
    assert subscriber_hash(email) not in trace
