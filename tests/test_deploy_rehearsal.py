"""Deploy rehearsal: two clinics' stacks in one AWS account and region, as a SaaS host runs them.

``template.yaml`` goes through the SAM transform (samtranslator, as ``sam deploy`` and CloudFormation run
it), then both stacks are created by moto's CloudFormation, with schedules and alarms created through
moto's own Scheduler and CloudWatch (``sandbox.moto_cfn``). Everything is judged through the AWS APIs;
what moto does not create at all (the HTTP API) is judged from the transformed template.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from sandbox import moto_cfn, sam_transform
from sandbox.cfn_yaml import resolve
from sandbox.runtime import ACCOUNT, REGION, TEMPLATE

CLINICS = ("smile-dental", "north-clinic")

# The property that names a resource of each type in the account. A type missing from both maps fails the
# audit below, so every new resource type gets a decision.
NAME_PROPERTY = {
    "AWS::DynamoDB::Table": "TableName",
    "AWS::SQS::Queue": "QueueName",
    "AWS::Logs::LogGroup": "LogGroupName",
    "AWS::Lambda::Function": "FunctionName",
    "AWS::Lambda::LayerVersion": "LayerName",
    "AWS::IAM::Role": "RoleName",
    "AWS::IAM::ManagedPolicy": "ManagedPolicyName",
    "AWS::Scheduler::Schedule": "Name",
    "AWS::CloudWatch::Alarm": "AlarmName",
    "AWS::CloudWatch::Dashboard": "DashboardName",
}
# Types whose identity AWS assigns (ids, or names scoped under a resource of the stack).
UNNAMED_TYPES = {
    "AWS::Lambda::EventSourceMapping",
    "AWS::Lambda::Permission",
    "AWS::ApiGatewayV2::Api",  # its name is a label, not unique; the id is generated
    "AWS::ApiGatewayV2::Stage",  # scoped to the API
}


def _parameters(clinic: str, arns: dict[str, str]) -> dict[str, str]:
    return {
        "ClinicId": clinic,
        "MisKind": "medods",
        "CrmKind": "amocrm",
        "ConfigParameterName": f"/clinicsync/{clinic}/config",
        "MisSecretArn": arns["mis"],
        "CrmSecretArn": arns["crm"],
        "ClinicSecretArn": arns["clinic"],
    }


def _secret_arns(clinic: str) -> dict[str, str]:
    return {
        k: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:clinicsync/{clinic}/{k}-AbC123"
        for k in ("mis", "crm", "clinic")
    }


@pytest.fixture(scope="module")
def transformed() -> dict[str, dict[str, Any]]:
    if not sam_transform.available():
        pytest.skip(".venv-sam not installed (make sam-venv)")
    return {clinic: sam_transform.transform(TEMPLATE, _parameters(clinic, _secret_arns(clinic))) for clinic in CLINICS}


@pytest.fixture
def account(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    moto_cfn.register()
    with mock_aws():
        yield


def _deploy(clinic: str, template: dict[str, Any]) -> dict[str, Any]:
    """What `sam deploy` does for one clinic: upload the code, create the stack with its parameters."""
    s3 = boto3.client("s3")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("app.py", "def lambda_handler(event, context):\n    return event\n")
    for resource in template["Resources"].values():
        code = resource["Properties"].get("Code") or resource["Properties"].get("Content")
        if isinstance(code, dict) and "S3Key" in code:
            s3.put_object(Bucket=code["S3Bucket"], Key=code["S3Key"], Body=archive.getvalue())
    arns = {}
    for key in ("mis", "crm", "clinic"):
        arns[key] = boto3.client("secretsmanager").create_secret(Name=f"clinicsync/{clinic}/{key}", SecretString="{}")[
            "ARN"
        ]
    stack = f"clinicsync-{clinic}"
    boto3.client("cloudformation").create_stack(
        StackName=stack,
        TemplateBody=json.dumps(template),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in _parameters(clinic, arns).items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    description: dict[str, Any] = boto3.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
    return description


def _physical_ids(stack: str) -> dict[str, str]:
    listed = boto3.client("cloudformation").describe_stack_resources(StackName=stack)["StackResources"]
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed if r.get("PhysicalResourceId")}


@pytest.mark.slow
@pytest.mark.usefixtures("account")
def test_two_clinics_deploy_into_one_account(transformed: dict[str, dict[str, Any]]) -> None:
    boto3.client("s3").create_bucket(Bucket="artifacts", CreateBucketConfiguration={"LocationConstraint": REGION})
    for clinic in CLINICS:
        assert _deploy(clinic, transformed[clinic])["StackStatus"] == "CREATE_COMPLETE", clinic

    first, second = (_physical_ids(f"clinicsync-{clinic}") for clinic in CLINICS)
    assert len(first) == len(second) >= 40
    assert set(first.values()).isdisjoint(second.values())

    # Each stack's three schedules, all in the account's default group, none shared.
    schedules = boto3.client("scheduler").list_schedules()["Schedules"]
    names = sorted(s["Name"] for s in schedules)
    assert len(names) == 2 * 3 and len(set(names)) == len(names)
    for clinic in CLINICS:
        assert sum(name.startswith(f"clinicsync-{clinic}-") for name in names) == 3, names

    # Each clinic's alarms on clinicsync metrics watch its own ClinicId only.
    for alarm in boto3.client("cloudwatch").describe_alarms()["MetricAlarms"]:
        if alarm["Namespace"] == "clinicsync":
            clinic = next(c for c in CLINICS if alarm["AlarmName"].startswith(f"clinicsync-{c}-"))
            assert {"Name": "ClinicId", "Value": clinic} in alarm["Dimensions"], alarm["AlarmName"]


def _names(template: dict[str, Any], clinic: str) -> dict[str, Any]:
    """Every resource's account-level name as CloudFormation would resolve it; None where it generates one."""
    refs = {
        **_parameters(clinic, _secret_arns(clinic)),
        "AWS::StackName": f"clinicsync-{clinic}",
        "AWS::Region": REGION,
    }
    names: dict[str, Any] = {}
    for logical_id, resource in template["Resources"].items():
        kind = resource["Type"]
        assert kind in NAME_PROPERTY or kind in UNNAMED_TYPES, f"{logical_id}: {kind} has no naming decision"
        if kind in NAME_PROPERTY:
            value = resource["Properties"].get(NAME_PROPERTY[kind])
            names[logical_id] = None if value is None else resolve(value, refs=refs)
    return names


@pytest.mark.slow
def test_every_named_resource_is_unique_per_stack(transformed: dict[str, dict[str, Any]]) -> None:
    """Also covers what moto does not create: a fixed name (SAM names schedules and layers after their
    logical ids) collides with the same resource of the next clinic's stack."""
    first, second = (_names(transformed[clinic], clinic) for clinic in CLINICS)
    assert set(first) == set(second)
    for logical_id, name in first.items():
        if name is not None:  # None: CloudFormation generates "<stack>-<logical id>-<random>"
            assert name != second[logical_id], f"{logical_id} is named {name!r} in both stacks"
            assert "clinicsync-smile-dental" in str(name), f"{logical_id}: {name!r} does not carry the stack name"
