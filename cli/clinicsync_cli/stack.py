"""A clinic's stack as the CLI sees it: its resources by logical id, from CloudFormation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3

from clinicsync.failures import FailureLog

QUEUES = {
    "sync": ("SyncQueue", "SyncDLQ"),
    "crm-events": ("CrmEventQueue", "CrmEventDLQ"),
    "consent": ("ConsentQueue", "ConsentDLQ"),
    "ident-inbox": ("IdentInboxQueue", "IdentInboxDLQ"),
}


class StackNotFound(Exception):
    pass


@dataclass
class StackHandle:
    name: str
    resources: dict[str, str]  # logical id -> physical id (queue URL, table name, ...)

    @classmethod
    def find(cls, name: str) -> StackHandle:
        cfn = boto3.client("cloudformation")
        try:
            listed = cfn.describe_stack_resources(StackName=name)["StackResources"]
        except cfn.exceptions.ClientError as exc:
            raise StackNotFound(f"stack {name!r} not found ({exc.response['Error']['Code']})") from None
        return cls(name, {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed})

    def queue_urls(self, queue: str) -> tuple[str, str]:
        source, dlq = QUEUES[queue]
        return self.resources[source], self.resources[dlq]

    def failure_log(self) -> FailureLog:
        return FailureLog(boto3.resource("dynamodb").Table(self.resources["Table"]))

    def sqs(self) -> Any:
        return boto3.client("sqs")
