"""A clinic's stack as the CLI sees it: its resources by logical id, from CloudFormation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

from clinicsync.adapters.aws.failures import FailureLog

QUEUES = {
    "sync": ("SyncQueue", "SyncDLQ"),
    "crm-events": ("CrmEventQueue", "CrmEventDLQ"),
    "consent": ("ConsentQueue", "ConsentDLQ"),
    "ident-inbox": ("IdentInboxQueue", "IdentInboxDLQ"),
}


class StackNotFound(Exception):
    pass


def stack_name(clinic_id: str) -> str:
    return f"clinicsync-{clinic_id}"


@dataclass
class StackHandle:
    name: str
    resources: dict[str, str]  # logical id -> physical id (queue URL, table name, ...)
    outputs: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    region: str | None = None  # None: boto3's default

    @classmethod
    def find(cls, name: str, region: str | None = None) -> StackHandle:
        cfn = boto3.client("cloudformation", region_name=region)
        try:
            listed = cfn.describe_stack_resources(StackName=name)["StackResources"]
            described = cfn.describe_stacks(StackName=name)["Stacks"][0]
        except cfn.exceptions.ClientError as exc:
            raise StackNotFound(f"stack {name!r} not found ({exc.response['Error']['Code']})") from None
        outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
        params = {p["ParameterKey"]: p.get("ParameterValue", "") for p in described.get("Parameters", [])}
        resources = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed}
        return cls(name, resources, outputs, params, region)

    def queue_urls(self, queue: str) -> tuple[str, str]:
        source, dlq = QUEUES[queue]
        return self.resources[source], self.resources[dlq]

    def table(self) -> Any:
        return boto3.resource("dynamodb", region_name=self.region).Table(self.resources["Table"])

    def failure_log(self) -> FailureLog:
        return FailureLog(self.table())

    def sqs(self) -> Any:
        return boto3.client("sqs", region_name=self.region)

    def function_name(self, logical_id: str) -> str:
        # The local runtime serves the template's functions under <stack>-<logical id>.
        return self.resources.get(logical_id) or f"{self.name}-{logical_id}"

    def invoke(self, logical_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A synchronous invocation (the poller may run for its whole 300 s timeout)."""
        client = boto3.client(
            "lambda", region_name=self.region, config=Config(read_timeout=330, retries={"max_attempts": 0})
        )
        response = client.invoke(FunctionName=self.function_name(logical_id), Payload=json.dumps(payload).encode())
        body = json.loads(response["Payload"].read() or b"null")
        if response.get("FunctionError"):
            message = body.get("errorMessage") if isinstance(body, dict) else str(body)
            raise RuntimeError(f"{logical_id} failed: {message}")
        return body if isinstance(body, dict) else {}

    def depth(self, logical_id: str) -> int:
        attrs = self.sqs().get_queue_attributes(
            QueueUrl=self.resources[logical_id],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs.get("ApproximateNumberOfMessages", 0)) + int(
            attrs.get("ApproximateNumberOfMessagesNotVisible", 0)
        )
