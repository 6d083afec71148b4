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
from typing import Any

import pytest

from sandbox import moto_cfn, sam_transform
from sandbox.cfn_yaml import resolve
from sandbox.runtime import ACCOUNT, REGION, TEMPLATE, LocalAws

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
def account(local_aws: LocalAws) -> LocalAws:
    """The session's moto server is the account (an in-process mock_aws would reset the backends it shares).
    Stack, secret and bucket names here are used by no other test."""
    moto_cfn.register()
    return local_aws


def _deploy(aws: LocalAws, clinic: str, template: dict[str, Any]) -> dict[str, Any]:
    """What `sam deploy` does for one clinic: upload the code, create the stack with its parameters."""
    s3 = aws.client("s3")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("app.py", "def lambda_handler(event, context):\n    return event\n")
    for resource in template["Resources"].values():
        code = resource["Properties"].get("Code") or resource["Properties"].get("Content")
        if isinstance(code, dict) and "S3Key" in code:
            s3.put_object(Bucket=code["S3Bucket"], Key=code["S3Key"], Body=archive.getvalue())
    arns = {}
    for key in ("mis", "crm", "clinic"):
        arns[key] = aws.client("secretsmanager").create_secret(Name=f"clinicsync/{clinic}/{key}", SecretString="{}")[
            "ARN"
        ]
    stack = f"clinicsync-{clinic}"
    aws.client("cloudformation").create_stack(
        StackName=stack,
        TemplateBody=json.dumps(template),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in _parameters(clinic, arns).items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    description: dict[str, Any] = aws.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
    return description


def _physical_ids(aws: LocalAws, stack: str) -> dict[str, str]:
    listed = aws.client("cloudformation").describe_stack_resources(StackName=stack)["StackResources"]
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed if r.get("PhysicalResourceId")}


@pytest.mark.slow
def test_two_clinics_deploy_into_one_account(account: LocalAws, transformed: dict[str, dict[str, Any]]) -> None:
    account.client("s3").create_bucket(Bucket="artifacts", CreateBucketConfiguration={"LocationConstraint": REGION})
    for clinic in CLINICS:
        assert _deploy(account, clinic, transformed[clinic])["StackStatus"] == "CREATE_COMPLETE", clinic

    first, second = (_physical_ids(account, f"clinicsync-{clinic}") for clinic in CLINICS)
    assert len(first) == len(second) >= 40
    assert set(first.values()).isdisjoint(second.values())

    # Each stack's three schedules, all in the account's default group, none shared.
    schedules = account.client("scheduler").list_schedules()["Schedules"]
    names = sorted(s["Name"] for s in schedules if s["Name"].startswith(tuple(f"clinicsync-{c}-" for c in CLINICS)))
    assert len(names) == 2 * 3 and len(set(names)) == len(names)
    for clinic in CLINICS:
        assert sum(name.startswith(f"clinicsync-{clinic}-") for name in names) == 3, names

    # Each clinic's alarms on clinicsync metrics watch its own ClinicId only.
    alarms = account.client("cloudwatch").describe_alarms(AlarmNamePrefix="clinicsync-")["MetricAlarms"]
    assert sum(alarm["Namespace"] == "clinicsync" for alarm in alarms) >= 2 * 4
    for alarm in alarms:
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
