"""Fixtures shared by the adapter tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import boto3
import pytest
from moto import mock_aws
from mypy_boto3_dynamodb.service_resource import Table

from tests.helpers import template_table_spec


@pytest.fixture(scope="module")
def template_tables() -> Iterator[Callable[[], Table]]:
    """Makes a fresh table as template.yaml defines the stack's, on one moto per module."""
    names = itertools.count()
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        patch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        dynamodb = boto3.resource("dynamodb", region_name="eu-central-1")
        yield lambda: dynamodb.create_table(**template_table_spec(f"table-{next(names)}"))
