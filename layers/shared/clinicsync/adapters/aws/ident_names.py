"""IDENT's directory in the table, ``IDENT#DIRECTORY`` / ``DOCTOR#<id>``, ``BRANCH#<id>`` and ``TIMETABLE``
(see ``keys.py``): names only, and the timetable's interval counts (nothing books slots)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import batch_writer

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

_DOCTOR = "DOCTOR#"
_BRANCH = "BRANCH#"


class DynamoIdentNames:
    def __init__(self, table: Table) -> None:
        self._table = table

    def save(
        self, doctors: Mapping[str, str], branches: Mapping[str, str], intervals: int, busy: int, now: int
    ) -> None:
        names = {**{_DOCTOR + k: v for k, v in doctors.items()}, **{_BRANCH + k: v for k, v in branches.items()}}
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for sk, name in names.items():
                batch.put_item(Item={"pk": keys.IDENT_DIRECTORY, "sk": sk, "name": name, "updated_at": now})
            batch.put_item(
                Item={
                    "pk": keys.IDENT_DIRECTORY,
                    "sk": "TIMETABLE",
                    "intervals": intervals,
                    "busy": busy,
                    "updated_at": now,
                }
            )

    def load(self) -> tuple[dict[str, str], dict[str, str]]:
        doctors: dict[str, str] = {}
        branches: dict[str, str] = {}
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(keys.IDENT_DIRECTORY)}
        while True:
            page = self._table.query(**kwargs)
            for item in page.get("Items", []):
                sk = str(item["sk"])
                if sk.startswith(_DOCTOR):
                    doctors[sk.removeprefix(_DOCTOR)] = str(item["name"])
                elif sk.startswith(_BRANCH):
                    branches[sk.removeprefix(_BRANCH)] = str(item["name"])
            if "LastEvaluatedKey" not in page:
                return doctors, branches
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
