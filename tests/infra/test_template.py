"""Static checks on template.yaml (no AWS, no SAM CLI needed for the fast part).

Every check is a plain function over the parsed template. ``test_template_passes`` runs each on the real
template; ``test_check_catches_regression`` runs each against a deliberately broken copy (``MUTATIONS``) and
expects it to fail, so no check can silently pass on anything.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.cfn_yaml import (
    IntrinsicError,
    evaluate_conditions,
    function_properties,
    load_template,
    loads,
    resolve,
    resources_of_type,
)
from sandbox.runtime import LocalAws

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = ROOT / "template.yaml"

Template = dict[str, Any]

# logical id -> (CodeUri, Timeout)
FUNCTIONS: dict[str, tuple[str, int]] = {
    "MisPollerFunction": ("functions/mis_poller/", 300),
    "StageSyncerFunction": ("functions/stage_syncer/", 300),
    "CrmWebhookFunction": ("functions/crm_webhook/", 75),
    "UnsubscribeFunction": ("functions/unsubscribe/", 10),
}

REQUIRED_RESOURCES = {
    "SharedLayer": "AWS::Serverless::LayerVersion",
    "MisPollerFunction": "AWS::Serverless::Function",
    "StageSyncerFunction": "AWS::Serverless::Function",
    "CrmWebhookFunction": "AWS::Serverless::Function",
    "UnsubscribeFunction": "AWS::Serverless::Function",
    "HttpApi": "AWS::Serverless::HttpApi",
    "SyncQueue": "AWS::SQS::Queue",
    "SyncDLQ": "AWS::SQS::Queue",
    "SchedulerDLQ": "AWS::SQS::Queue",
    "Table": "AWS::DynamoDB::Table",
    "FunctionsCommonPolicy": "AWS::IAM::ManagedPolicy",
    "MisPollerRole": "AWS::IAM::Role",
    "StageSyncerRole": "AWS::IAM::Role",
    "CrmWebhookRole": "AWS::IAM::Role",
    "UnsubscribeRole": "AWS::IAM::Role",
}

REQUIRED_ENV = {
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "POWERTOOLS_LOG_LEVEL",
    "CLINIC_ID",
    "MIS_KIND",
    "CRM_KIND",
    "TABLE_NAME",
    "SYNC_QUEUE_URL",
    "CONFIG_PARAMETER_NAME",
    "MIS_SECRET_ARN",
    "CRM_SECRET_ARN",
    "CLINIC_SECRET_ARN",
}

REQUIRED_ROUTES = {
    ("POST", "/webhooks/bitrix24"): "CrmWebhookFunction",
    ("POST", "/webhooks/amocrm/{secret}"): "CrmWebhookFunction",
    # IDENT calls us (tickets, timetable); its connector pushes signed change batches.
    ("GET", "/ident/GetTickets"): "CrmWebhookFunction",
    ("POST", "/ident/PostTimeTable"): "CrmWebhookFunction",
    ("GET", "/ident/connector/settings"): "CrmWebhookFunction",
    ("POST", "/ident/connector/batches"): "CrmWebhookFunction",
    ("GET", "/webhooks/mailchimp/{secret}"): "UnsubscribeFunction",
    ("POST", "/webhooks/mailchimp/{secret}"): "UnsubscribeFunction",
    ("GET", "/unsubscribe/{token}"): "UnsubscribeFunction",
    ("POST", "/unsubscribe/{token}"): "UnsubscribeFunction",
}

# CloudWatch Logs accepts only these retention values.
CLOUDWATCH_RETENTION_DAYS = {
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
}  # fmt: skip

# The exact grants each function's role must have: (action, target) where target is the logical id / parameter.
_TABLE = {
    (f"dynamodb:{action}", "Table")
    for action in (
        "GetItem",
        "BatchGetItem",
        "Query",
        "PutItem",
        "UpdateItem",
        "DeleteItem",
        "BatchWriteItem",
        "ConditionCheckItem",
    )
}
_COMMON = (
    _TABLE
    | {("ssm:GetParameter", "ConfigParameterName"), ("ssm:GetParameters", "ConfigParameterName")}
    | {("xray:PutTraceSegments", "*"), ("xray:PutTelemetryRecords", "*")}
)


def _logs(group: str) -> set[tuple[str, str]]:
    return {("logs:CreateLogStream", group), ("logs:PutLogEvents", group)}


def _read(*secrets: str) -> set[tuple[str, str]]:
    return {("secretsmanager:GetSecretValue", secret) for secret in secrets}


# The one writer path of the OAuth pair (refresh under the lease, persist before use) runs wherever the CRM
# gateway runs: its PutSecretValue goes with every function that reads the CRM.
_ROTATE_CRM = {("secretsmanager:PutSecretValue", "CrmSecretArn")}

EXPECTED_GRANTS: dict[str, set[tuple[str, str]]] = {
    # The poller also runs the CRM catch-up job, which reads the CRM and may refresh its OAuth pair.
    "MisPollerFunction": _COMMON
    | _logs("MisPollerLogGroup")
    | _read("MisSecretArn", "CrmSecretArn", "ClinicSecretArn")
    | _ROTATE_CRM
    | {("sqs:SendMessage", "SyncQueue"), ("sqs:SendMessage", "ConsentQueue")}  # LIS opt-out flags
    | {(f"sqs:{a}", "IdentInboxQueue") for a in ("ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility")},
    # Consent outputs write the MIS's "do not send" flags; MIS flags and CRM fields become consent jobs.
    "StageSyncerFunction": _COMMON
    | _logs("StageSyncerLogGroup")
    | _read("CrmSecretArn", "ClinicSecretArn", "MisSecretArn")
    | _ROTATE_CRM
    | {("sqs:SendMessage", "SyncQueue"), ("sqs:SendMessage", "ConsentQueue")}
    | {
        (f"sqs:{a}", q)
        for a in ("ReceiveMessage", "DeleteMessage", "GetQueueAttributes")
        for q in ("SyncQueue", "CrmEventQueue", "ConsentQueue")
    },
    # The receiver only queues CRM events and IDENT batches; it never touches the per-patient sync queue
    # and never reads the clinic secret. GetTickets reads leads from the CRM, so it may rotate the pair.
    "CrmWebhookFunction": _COMMON
    | _logs("CrmWebhookLogGroup")
    | _read("CrmSecretArn", "MisSecretArn")
    | _ROTATE_CRM
    | {("sqs:SendMessage", "CrmEventQueue"), ("sqs:SendMessage", "IdentInboxQueue")},
    # Links and Mailchimp events only record the opt-out and queue a consent job.
    "UnsubscribeFunction": _COMMON
    | _logs("UnsubscribeLogGroup")
    | _read("ClinicSecretArn")
    | {("sqs:SendMessage", "ConsentQueue")},
}

# The only actions allowed on "*", each because the service has no resource-level permission for it.
WILDCARD_RESOURCE_ALLOWED = {
    "xray:PutTraceSegments": "X-Ray has no resource-level permissions; the functions send their traces",
    "xray:PutTelemetryRecords": "X-Ray has no resource-level permissions; the Lambda X-Ray daemon reports",
}


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template(TEMPLATE_PATH)


# ----------------------------------------------------------------------------- helpers


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _functions(t: Template) -> dict[str, dict[str, Any]]:
    return {name: function_properties(t, name) for name in resources_of_type(t, "AWS::Serverless::Function")}


def _events(t: Template, event_type: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for fn_name, props in _functions(t).items():
        for event_name, event in (props.get("Events") or {}).items():
            if event.get("Type") == event_type:
                yield fn_name, event_name, event.get("Properties", {})


def _target(value: Any) -> str:
    """Normalise a policy resource / argument to the logical id or parameter it points at."""
    if isinstance(value, dict) and len(value) == 1:
        (fn, arg), *_ = value.items()
        if fn == "Ref":
            return str(arg)
        if fn == "Fn::GetAtt":
            return str(_as_list(arg)[0]).split(".")[0]
        if fn == "Fn::Sub":
            text = arg[0] if isinstance(arg, list) else arg
            names = [n for n in re.findall(r"\$\{([^}]+)\}", text) if not n.startswith("AWS::")]
            if len(names) == 1 and "*" not in text:
                return str(names[0]).split(".")[0]
    return f"<unscoped:{json.dumps(value)}>"


def _statements(node: Any) -> Iterator[dict[str, Any]]:
    """Every permission statement anywhere in the template (roles, managed policies, queue policies ...);
    trust policies (who may assume a role) grant nothing and are skipped."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "AssumeRolePolicyDocument":
                continue
            if key == "Statement":
                yield from (s for s in _as_list(value) if isinstance(s, dict))
            else:
                yield from _statements(value)
    elif isinstance(node, list):
        for item in node:
            yield from _statements(item)


def _alarm_actions_are_conditional(props: dict[str, Any]) -> bool:
    actions = props.get("AlarmActions")
    return actions == {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}


def _find_alarm(t: Template, namespace: str, metric: str, dimension_value: Any) -> dict[str, Any] | None:
    for alarm in resources_of_type(t, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        if (
            props.get("Namespace") == namespace
            and props.get("MetricName") == metric
            and any(d.get("Value") == dimension_value for d in props.get("Dimensions", []))
        ):
            return dict(props)
    return None


# ----------------------------------------------------------------------------- checks


def check_required_resources(t: Template) -> None:
    resources = t["Resources"]
    for logical_id, resource_type in REQUIRED_RESOURCES.items():
        assert logical_id in resources, f"missing resource {logical_id}"
        assert resources[logical_id]["Type"] == resource_type, logical_id
    assert t["Transform"] == "AWS::Serverless-2016-10-31"
    assert t["AWSTemplateFormatVersion"] == "2010-09-09"


def check_parameters(t: Template) -> None:
    params = t["Parameters"]
    for name in (
        "ClinicId",
        "MisKind",
        "CrmKind",
        "PollSchedule",
        "PollTimezone",
        "ConfigParameterName",
        "MisSecretArn",
        "CrmSecretArn",
        "ClinicSecretArn",
        "LogRetentionDays",
        "AlarmTopicArn",
        "SyncerMaxConcurrency",
    ):
        assert name in params, f"missing parameter {name}"
    assert set(params["MisKind"]["AllowedValues"]) == {"medods", "infoclinica", "renovatio", "ident", "lis"}
    assert set(params["CrmKind"]["AllowedValues"]) == {"bitrix24", "amocrm", "vtiger"}
    assert params["PollSchedule"]["Default"] == "rate(1 minute)"
    assert params["PollTimezone"]["Default"] == "Europe/Moscow"
    assert params["AlarmTopicArn"]["Default"] == ""
    assert int(params["SyncerMaxConcurrency"]["Default"]) == 2
    retention = params["LogRetentionDays"]
    assert int(retention["Default"]) == 30
    assert {int(v) for v in retention["AllowedValues"]} <= CLOUDWATCH_RETENTION_DAYS
    slug = re.compile(params["ClinicId"]["AllowedPattern"])
    assert slug.fullmatch("smile-dental") and slug.fullmatch("c1")
    assert not slug.fullmatch("Smile_Dental") and not slug.fullmatch("-x") and not slug.fullmatch("")
    config = re.compile(params["ConfigParameterName"]["AllowedPattern"])
    assert config.fullmatch("/clinicsync/smile-dental/config") and not config.fullmatch("clinicsync/x")
    arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:clinicsync/x/crm-AbC123"
    for name in ("MisSecretArn", "CrmSecretArn", "ClinicSecretArn"):
        pattern = re.compile(params[name]["AllowedPattern"])
        assert pattern.fullmatch(arn), name
        assert not pattern.fullmatch("my-plaintext-password"), name
    assert t["Conditions"]["HasAlarmTopic"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmTopicArn"}, ""]}]}


def check_functions_runtime(t: Template) -> None:
    functions = _functions(t)
    assert set(functions) == set(FUNCTIONS)
    for name, props in functions.items():
        code_uri, timeout = FUNCTIONS[name]
        assert props.get("Runtime") == "python3.13", name
        assert props.get("Architectures") == ["arm64"], name
        assert props.get("Tracing") == "Active", name
        assert isinstance(props.get("MemorySize"), int), name
        assert props.get("LoggingConfig", {}).get("LogFormat") == "JSON", name
        assert {"Ref": "SharedLayer"} in props.get("Layers", []), name
        assert props.get("CodeUri") == code_uri, name
        assert props.get("Handler") == "app.lambda_handler", name
        # each function sets its own timeout (not inherited from Globals / the 3 s default)
        assert t["Resources"][name]["Properties"].get("Timeout") == timeout, name


def check_environment(t: Template) -> None:
    expected_refs = {
        "CLINIC_ID": {"Ref": "ClinicId"},
        "MIS_KIND": {"Ref": "MisKind"},
        "CRM_KIND": {"Ref": "CrmKind"},
        "TABLE_NAME": {"Ref": "Table"},
        "SYNC_QUEUE_URL": {"Ref": "SyncQueue"},
        "CONFIG_PARAMETER_NAME": {"Ref": "ConfigParameterName"},
        "MIS_SECRET_ARN": {"Ref": "MisSecretArn"},
        "CRM_SECRET_ARN": {"Ref": "CrmSecretArn"},
        "CLINIC_SECRET_ARN": {"Ref": "ClinicSecretArn"},
        # the stage syncer routes a batch by its source's ARN
        "SYNC_QUEUE_ARN": {"Fn::GetAtt": ["SyncQueue", "Arn"]},
        "CRM_EVENT_QUEUE_ARN": {"Fn::GetAtt": ["CrmEventQueue", "Arn"]},
        "CONSENT_QUEUE_ARN": {"Fn::GetAtt": ["ConsentQueue", "Arn"]},
    }
    for name, props in _functions(t).items():
        env = props.get("Environment", {}).get("Variables", {})
        assert set(env) >= REQUIRED_ENV, f"{name} lacks {REQUIRED_ENV - set(env)}"
        assert env["POWERTOOLS_SERVICE_NAME"] == "clinicsync"
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == "clinicsync"
        assert env["POWERTOOLS_LOG_LEVEL"] == "INFO"
        for key, value in expected_refs.items():
            assert env[key] == value, f"{name}: {key}={env[key]!r}"


_SECRETISH_NAME = re.compile(r"SECRET|TOKEN|PASSW|API_?KEY|PRIVATE|CREDENTIAL|HMAC", re.IGNORECASE)
_SAFE_LITERAL = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,23}")


def _check_env_value(t: Template, fn: str, key: str, value: Any) -> None:
    params = t.get("Parameters", {})
    where = f"{fn}.{key}"
    if isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        assert "{{resolve:" not in value, f"{where}: dynamic reference puts a secret into the config"
        assert _SAFE_LITERAL.fullmatch(value), f"{where}: literal {value!r} looks like a secret value"
        assert not _SECRETISH_NAME.search(key), f"{where}: secret-ish variable holds a literal"
        return
    assert isinstance(value, dict) and len(value) == 1, f"{where}: unexpected value {value!r}"
    (intrinsic, arg), *_ = value.items()
    if intrinsic == "Ref":
        assert arg in params or arg in t["Resources"] or arg.startswith("AWS::"), f"{where}: Ref {arg}"
        if arg in params:
            assert not params[arg].get("NoEcho"), f"{where}: NoEcho parameter {arg} exposed in env"
            if _SECRETISH_NAME.search(key):
                assert key.endswith(("_ARN", "_NAME")), f"{where}: secret-ish env must carry an ARN/name"
                assert "secretsmanager" in params[arg].get("AllowedPattern", ""), f"{where}: not an ARN"
        return
    if intrinsic == "Fn::GetAtt":
        return
    assert "{{resolve:" not in json.dumps(value), f"{where}: dynamic reference in env"
    assert not _SECRETISH_NAME.search(key), f"{where}: secret-ish variable built from {intrinsic}"


def check_no_secret_values_in_env(t: Template) -> None:
    text = json.dumps(t)
    for marker in ("{{resolve:secretsmanager", "{{resolve:ssm-secure"):
        assert marker not in text, f"dynamic secret reference {marker} in the template"
    for name, props in _functions(t).items():
        for key, value in props.get("Environment", {}).get("Variables", {}).items():
            _check_env_value(t, name, key, value)


def check_layer(t: Template) -> None:
    layer = t["Resources"]["SharedLayer"]
    assert layer["Metadata"]["BuildMethod"] == "makefile"  # layers/shared/Makefile: python3.13 wheels + bytecode
    assert layer["Metadata"]["BuildArchitecture"] == "arm64"
    props = layer["Properties"]
    assert props["LayerName"] == {"Fn::Sub": "${AWS::StackName}-shared"}  # SAM's default is the logical id
    assert props["ContentUri"] == "layers/shared/"
    assert props["CompatibleRuntimes"] == ["python3.13"]
    assert props["CompatibleArchitectures"] == ["arm64"]


def check_sqs_events(t: Template) -> None:
    events = list(_events(t, "SQS"))
    assert events, "no SQS event source"
    for fn, event_name, props in events:
        where = f"{fn}.{event_name}"
        assert "ReportBatchItemFailures" in props.get("FunctionResponseTypes", []), where
        assert props.get("ScalingConfig", {}).get("MaximumConcurrency") is not None, where
        queue = _target(props["Queue"])
        assert queue in t["Resources"], where
        if t["Resources"][queue]["Properties"].get("FifoQueue"):
            assert int(props.get("BatchSize", 10)) <= 10, f"{where}: FIFO batch size > 10"
            assert "MaximumBatchingWindowInSeconds" not in props, f"{where}: no batching window on FIFO"
    syncer = {_target(p["Queue"]): p for fn, _, p in events if fn == "StageSyncerFunction"}
    assert set(syncer) == {"SyncQueue", "CrmEventQueue", "ConsentQueue"}
    # Consent jobs: a standard queue with a DLQ, a short batching window (the one-minute target).
    consent = t["Resources"]["ConsentQueue"]["Properties"]
    assert consent.get("FifoQueue") is not True and consent["RedrivePolicy"]["maxReceiveCount"] >= 10
    assert 0 < syncer["ConsentQueue"]["MaximumBatchingWindowInSeconds"] <= 5
    assert "ConsentDLQDepthAlarm" in t["Resources"]
    assert syncer["SyncQueue"]["BatchSize"] == 10
    # CRM events are re-fetched in batches: a standard queue with a batching window feeds up to 100.
    assert t["Resources"]["CrmEventQueue"]["Properties"].get("FifoQueue") is not True
    assert syncer["CrmEventQueue"]["BatchSize"] == 100
    assert syncer["CrmEventQueue"]["MaximumBatchingWindowInSeconds"] > 0
    for props in syncer.values():
        assert props["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "SyncerMaxConcurrency"}


def check_sync_queue(t: Template) -> None:
    queue = t["Resources"]["SyncQueue"]["Properties"]
    assert queue["FifoQueue"] is True
    assert queue["ContentBasedDeduplication"] is False
    assert queue["DeduplicationScope"] == "messageGroup"
    assert queue["FifoThroughputLimit"] == "perMessageGroupId"
    assert queue["SqsManagedSseEnabled"] is True
    name = queue.get("QueueName")
    if isinstance(name, dict):  # !Sub "${AWS::StackName}-sync.fifo"
        name = _as_list(name.get("Fn::Sub"))[0]
    assert name is None or str(name).endswith(".fifo"), f"FIFO queue name {name!r} must end in .fifo"
    redrive = queue["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["SyncDLQ", "Arn"]}
    assert int(redrive["maxReceiveCount"]) == 5
    # every queue feeding a Lambda has a DLQ, and its visibility timeout covers 6 x the consumer timeout
    for fn, event_name, props in _events(t, "SQS"):
        source = t["Resources"][_target(props["Queue"])]["Properties"]
        assert "RedrivePolicy" in source, f"{fn}.{event_name}: source queue without DLQ"
        timeout = int(function_properties(t, fn).get("Timeout", 3))
        assert int(source.get("VisibilityTimeout", 30)) >= 6 * timeout, f"{fn}: visibility < 6x timeout"
    # a patient's claim outlives a live invocation and expires before a killed one's retry
    from clinicsync.application.sync import CLAIM_SECONDS

    syncer_timeout = int(function_properties(t, "StageSyncerFunction")["Timeout"])
    assert syncer_timeout < CLAIM_SECONDS < int(queue["VisibilityTimeout"]), (syncer_timeout, CLAIM_SECONDS)


def check_dlqs(t: Template) -> None:
    dlq = t["Resources"]["SyncDLQ"]["Properties"]
    assert dlq["FifoQueue"] is True, "the DLQ of a FIFO queue must be FIFO"
    assert int(dlq["MessageRetentionPeriod"]) == 1209600
    assert dlq["SqsManagedSseEnabled"] is True
    scheduler_dlq = t["Resources"]["SchedulerDLQ"]["Properties"]
    assert not scheduler_dlq.get("FifoQueue"), "EventBridge Scheduler DLQs must be standard queues"
    assert scheduler_dlq["SqsManagedSseEnabled"] is True
    assert int(scheduler_dlq["MessageRetentionPeriod"]) == 1209600


def check_table(t: Template) -> None:
    table = t["Resources"]["Table"]
    # Kept on stack deletion, but not after a failed first create: no orphan table blocks the retry.
    assert table["DeletionPolicy"] == "RetainExceptOnCreate"
    assert table["UpdateReplacePolicy"] == "Retain"
    props = table["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert props["SSESpecification"]["SSEEnabled"] is True
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert props["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert {(a["AttributeName"], a["AttributeType"]) for a in props["AttributeDefinitions"]} == {
        ("pk", "S"),
        ("sk", "S"),
    }
    assert "GlobalSecondaryIndexes" not in props


def check_schedules(t: Template) -> None:
    schedules = {(fn, name): props for fn, name, props in _events(t, "ScheduleV2")}
    assert set(schedules) == {
        ("MisPollerFunction", "Poll"),
        ("MisPollerFunction", "DeepResync"),
        ("MisPollerFunction", "CrmCatchUp"),
    }
    names = set()
    for (_, name), props in schedules.items():
        # Schedules sit in the account's shared default group: a per-stack name, or clinic 2 cannot deploy.
        schedule_name = props.get("Name")
        assert isinstance(schedule_name, dict) and "${AWS::StackName}" in schedule_name.get("Fn::Sub", ""), name
        names.add(schedule_name["Fn::Sub"])
        longest = schedule_name["Fn::Sub"].replace("${AWS::StackName}", "clinicsync-" + "x" * 40)  # the CLI's stack
        assert len(longest) <= 64, f"{name}: schedule names are at most 64 characters"
        assert props.get("ScheduleExpressionTimezone") == {"Ref": "PollTimezone"}, name
        assert props.get("RetryPolicy"), name
        assert props.get("DeadLetterConfig") == {"Arn": {"Fn::GetAtt": ["SchedulerDLQ", "Arn"]}}, name
        payload = json.loads(props["Input"])
        assert payload["scheduled_time"] == "<aws.scheduler.scheduled-time>", name
        assert payload["execution_id"] == "<aws.scheduler.execution-id>", name
    poll = schedules[("MisPollerFunction", "Poll")]
    assert poll["ScheduleExpression"] == {"Ref": "PollSchedule"}
    assert json.loads(poll["Input"])["job"] == "poll"
    resync = schedules[("MisPollerFunction", "DeepResync")]
    assert resync["ScheduleExpression"] == "cron(0 3,15 * * ? *)"
    assert json.loads(resync["Input"])["job"] == "resync"
    catchup = schedules[("MisPollerFunction", "CrmCatchUp")]
    assert json.loads(catchup["Input"])["job"] == "catchup"
    assert len(names) == len(schedules), "two schedules share a name"


def check_routes(t: Template) -> None:
    routes: dict[tuple[str, str], str] = {}
    for fn, event_name, props in _events(t, "HttpApi"):
        assert props.get("ApiId") == {"Ref": "HttpApi"}, f"{fn}.{event_name} is not on the HttpApi"
        key = (str(props.get("Method", "")).upper(), str(props.get("Path")))
        assert key not in routes, f"duplicate route {key}"
        routes[key] = fn
    assert routes == REQUIRED_ROUTES
    for fn, name, _ in _events(t, "Api"):
        pytest.fail(f"{fn}.{name}: REST Api events are not used, route through HttpApi")
    api = t["Resources"]["HttpApi"]["Properties"]
    throttling = api.get("DefaultRouteSettings", {})
    assert int(throttling.get("ThrottlingBurstLimit", 0)) > 0
    assert float(throttling.get("ThrottlingRateLimit", 0)) > 0
    access_log = api.get("AccessLogSettings")
    if access_log:  # secrets/tokens live in paths: never log the raw path
        assert "$context.path" not in access_log["Format"]


def check_log_groups(t: Template) -> None:
    log_groups = resources_of_type(t, "AWS::Logs::LogGroup")
    assert log_groups
    for name, group in log_groups.items():
        assert group["Properties"].get("RetentionInDays") == {"Ref": "LogRetentionDays"}, name
        assert "${AWS::StackName}" in group["Properties"]["LogGroupName"]["Fn::Sub"], f"{name}: not per stack"
    # API Gateway delivers access logs as vended logs: under this prefix the account's log resource policy
    # holds one wildcard entry for every clinic instead of one per group (a 5,120-character policy).
    access_log = t["Resources"]["HttpApi"]["Properties"]["AccessLogSettings"]["DestinationArn"]
    assert log_groups[_target(access_log)]["Properties"]["LogGroupName"]["Fn::Sub"].startswith("/aws/vendedlogs/")
    wired: set[str] = set()
    for name, props in _functions(t).items():
        target = props.get("LoggingConfig", {}).get("LogGroup")
        assert isinstance(target, dict) and "Ref" in target, f"{name}: no dedicated log group"
        assert target["Ref"] in log_groups, f"{name}: LogGroup {target['Ref']} is not a LogGroup resource"
        assert target["Ref"] not in wired, f"{name}: log group shared with another function"
        wired.add(target["Ref"])


def _role_of(t: Template, function: str) -> dict[str, Any]:
    role = t["Resources"][function]["Properties"].get("Role")
    assert isinstance(role, dict) and "Fn::GetAtt" in role, f"{function}: no explicit role of this stack"
    logical_id = _target(role)
    assert t["Resources"][logical_id]["Type"] == "AWS::IAM::Role", f"{function}: {logical_id} is not a role"
    props: dict[str, Any] = t["Resources"][logical_id]["Properties"]
    return props


def _role_statements(t: Template, role: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for policy in role.get("Policies", []):
        yield from _statements(policy["PolicyDocument"])
    for arn in role.get("ManagedPolicyArns", []):
        yield from _statements(t["Resources"][_target(arn)]["Properties"]["PolicyDocument"])


def check_iam_no_wildcards(t: Template) -> None:
    """No wildcard action, no resource pattern; "*" only for the allow-listed actions. Functions take an
    explicit role (SAM's generated one would carry AWS-managed policies that grant "*"), whose managed
    policies are this stack's own."""
    statements = list(_statements(t))
    assert statements
    for statement in statements:
        assert statement.get("Effect") == "Allow", statement
        assert "NotAction" not in statement and "NotResource" not in statement, statement
        actions = _as_list(statement.get("Action"))
        for action in actions:
            assert isinstance(action, str) and "*" not in action, f"wildcard action {action!r}"
        for resource in _as_list(statement.get("Resource")):
            if resource == "*":
                assert set(actions) <= set(WILDCARD_RESOURCE_ALLOWED), f"resource '*' in {statement}"
                continue
            if isinstance(resource, str):
                assert "*" not in resource, f"wildcard resource {resource!r}"
            assert not _target(resource).startswith("<unscoped"), f"resource not scoped: {resource!r}"
    for name, props in _functions(t).items():
        assert "Policies" not in props, f"{name}: SAM Policies next to an explicit role"
        for arn in _role_of(t, name).get("ManagedPolicyArns", []):
            assert isinstance(arn, dict) and "Ref" in arn, f"{name}: managed policy {arn!r} (not least privilege)"
            assert t["Resources"][arn["Ref"]]["Type"] == "AWS::IAM::ManagedPolicy", name


# Parameters that name the stack's own external resources: its secrets and its config parameter.
STACK_OWN_PARAMETERS = {"MisSecretArn", "CrmSecretArn", "ClinicSecretArn", "ConfigParameterName"}


def check_policy_resources_are_the_stacks_own(t: Template) -> None:
    """Tenant isolation by IAM: every statement names a resource this stack creates, or one of its own
    secrets / its config parameter. Nothing addresses another clinic's table, queue, secret or log group."""
    for statement in _statements(t):
        for resource in _as_list(statement.get("Resource")):
            if resource == "*" and set(_as_list(statement["Action"])) <= set(WILDCARD_RESOURCE_ALLOWED):
                continue
            target = _target(resource)
            owned = target in t["Resources"] or target in STACK_OWN_PARAMETERS
            assert owned, f"resource outside the stack: {resource!r} in {statement}"


def _grants(t: Template, function: str) -> set[tuple[str, str]]:
    grants: set[tuple[str, str]] = set()
    for statement in _role_statements(t, _role_of(t, function)):
        for action in _as_list(statement.get("Action")):
            for resource in _as_list(statement.get("Resource")):
                grants.add((action, "*" if resource == "*" else _target(resource)))
    return grants


def check_least_privilege_per_function(t: Template) -> None:
    for name in _functions(t):
        grants = _grants(t, name)
        assert grants == EXPECTED_GRANTS[name], f"{name}: {grants ^ EXPECTED_GRANTS[name]}"
    roles = [_target(t["Resources"][name]["Properties"]["Role"]) for name in _functions(t)]
    assert len(set(roles)) == len(roles), "functions share a role"


def check_token_writers_outlive_a_refresh(t: Template) -> None:
    """A function that may refresh the CRM's OAuth pair must not be killed between the vendor's rotation and
    the secret write: its timeout covers the lease wait, one refresh call and the write."""
    from clinicsync.adapters.http import oauth
    from clinicsync.runtime import wiring

    lease_wait = float(inspect.signature(oauth.lease_lock).parameters["timeout"].default)
    refresh_call = float(wiring.Container(wiring.Settings.model_construct()).http_client().timeout.read or 0)
    write_margin = 10.0
    writers = [name for name in _functions(t) if ("secretsmanager:PutSecretValue", "CrmSecretArn") in _grants(t, name)]
    assert writers
    for name in writers:
        timeout = int(t["Resources"][name]["Properties"]["Timeout"])
        assert timeout >= lease_wait + refresh_call + write_margin, f"{name}: {timeout} s"


def check_alarms(t: Template) -> None:
    dlq = _find_alarm(t, "AWS/SQS", "ApproximateNumberOfMessagesVisible", {"Fn::GetAtt": ["SyncDLQ", "QueueName"]})
    assert dlq is not None, "no SyncDLQ depth alarm"
    assert dlq["Statistic"] == "Maximum"
    assert int(dlq["Period"]) == 60
    assert int(dlq["Threshold"]) == 0
    assert dlq["ComparisonOperator"] == "GreaterThanThreshold"
    assert dlq["TreatMissingData"] == "notBreaching"
    assert _alarm_actions_are_conditional(dlq)
    scheduler = _find_alarm(
        t, "AWS/SQS", "ApproximateNumberOfMessagesVisible", {"Fn::GetAtt": ["SchedulerDLQ", "QueueName"]}
    )
    assert scheduler is not None, "no SchedulerDLQ depth alarm"
    assert _alarm_actions_are_conditional(scheduler)
    errors = _find_alarm(t, "AWS/Lambda", "Errors", {"Ref": "StageSyncerFunction"})
    assert errors is not None, "no StageSyncer Errors alarm"
    assert _alarm_actions_are_conditional(errors)
    for name, alarm in resources_of_type(t, "AWS::CloudWatch::Alarm").items():
        actions = alarm["Properties"].get("AlarmActions")
        assert actions is None or _alarm_actions_are_conditional(alarm["Properties"]), name


def check_outputs(t: Template) -> None:
    outputs = t["Outputs"]
    for name in (
        "ApiUrl",
        "SyncQueueUrl",
        "TableName",
        "MisPollerFunctionName",
        "StageSyncerFunctionName",
        "CrmWebhookFunctionName",
        "UnsubscribeFunctionName",
    ):
        assert name in outputs, f"missing output {name}"
    assert "${HttpApi}" in outputs["ApiUrl"]["Value"]["Fn::Sub"]
    assert outputs["SyncQueueUrl"]["Value"] == {"Ref": "SyncQueue"}
    assert outputs["TableName"]["Value"] == {"Ref": "Table"}
    for fn in FUNCTIONS:
        assert outputs[f"{fn}Name"]["Value"] == {"Ref": fn}


CHECKS: list[Callable[[Template], None]] = [
    check_required_resources,
    check_parameters,
    check_functions_runtime,
    check_environment,
    check_no_secret_values_in_env,
    check_layer,
    check_sqs_events,
    check_sync_queue,
    check_dlqs,
    check_table,
    check_schedules,
    check_routes,
    check_log_groups,
    check_iam_no_wildcards,
    check_policy_resources_are_the_stacks_own,
    check_least_privilege_per_function,
    check_token_writers_outlive_a_refresh,
    check_alarms,
    check_outputs,
]


# ----------------------------------------------------------------------------- mutations


def _props(t: Template, name: str) -> dict[str, Any]:
    props: dict[str, Any] = t["Resources"][name]["Properties"]
    return props


def _set(path: str, value: Any) -> Callable[[Template], None]:
    """Mutation that sets a nested key ("Resources.Table.Properties.BillingMode")."""

    def mutate(t: Template) -> None:
        *parents, leaf = path.split(".")
        node: Any = t
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value

    return mutate


_DELETE = object()
_SYNCER_EVENT = "Resources.StageSyncerFunction.Properties.Events.SyncQueueEvent.Properties"
_POLLER = "Resources.MisPollerFunction.Properties"
_UNSUB = "Resources.UnsubscribeFunction.Properties"


def _add_statement(role: str, statement: dict[str, Any]) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        _props(t, role)["Policies"][0]["PolicyDocument"]["Statement"].append({"Effect": "Allow", **statement})

    return mutate


def _add_env(key: str, value: Any) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        t["Globals"]["Function"]["Environment"]["Variables"][key] = value

    return mutate


def _override(function: str, key: str, value: Any) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        _props(t, function)[key] = value

    return mutate


def _drop_alarm(dimension: Any) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        for name, alarm in list(resources_of_type(t, "AWS::CloudWatch::Alarm").items()):
            if any(d.get("Value") == dimension for d in alarm["Properties"].get("Dimensions", [])):
                del t["Resources"][name]

    return mutate


MUTATIONS: list[tuple[Callable[[Template], None], str, Callable[[Template], None]]] = [
    (check_required_resources, "no SchedulerDLQ", _set("Resources.SchedulerDLQ", _DELETE)),
    (check_required_resources, "table renamed", lambda t: t["Resources"].update(State=t["Resources"].pop("Table"))),
    (check_required_resources, "wrong type", _set("Resources.HttpApi.Type", "AWS::Serverless::Api")),
    (check_parameters, "no PollTimezone", _set("Parameters.PollTimezone", _DELETE)),
    (check_parameters, "MisKind extra", _set("Parameters.MisKind.AllowedValues", ["medods", "x"])),
    (check_parameters, "bad retention", _set("Parameters.LogRetentionDays.AllowedValues", [30, 31])),
    (check_parameters, "loose slug", _set("Parameters.ClinicId.AllowedPattern", ".*")),
    (check_parameters, "loose secret arn", _set("Parameters.CrmSecretArn.AllowedPattern", ".+")),
    (check_functions_runtime, "python3.12 global", _set("Globals.Function.Runtime", "python3.12")),
    (check_functions_runtime, "x86 override", _override("StageSyncerFunction", "Architectures", ["x86_64"])),
    (check_functions_runtime, "no tracing", _set("Globals.Function.Tracing", "PassThrough")),
    (check_functions_runtime, "no layer", _set("Globals.Function.Layers", [])),
    (check_functions_runtime, "text logs", _set("Globals.Function.LoggingConfig.LogFormat", "Text")),
    (check_functions_runtime, "default timeout", _set("Resources.CrmWebhookFunction.Properties.Timeout", _DELETE)),
    (check_functions_runtime, "wrong codeuri", _override("UnsubscribeFunction", "CodeUri", "functions/x/")),
    (check_environment, "no TABLE_NAME", _set("Globals.Function.Environment.Variables.TABLE_NAME", _DELETE)),
    (check_environment, "wrong queue ref", _add_env("SYNC_QUEUE_URL", {"Ref": "SyncDLQ"})),
    (check_no_secret_values_in_env, "resolve ref", _add_env("CRM_TOKEN", "{{resolve:secretsmanager:x}}")),
    (check_no_secret_values_in_env, "literal key", _add_env("HMAC_KEY", "s3cr3t")),
    (check_no_secret_values_in_env, "long literal", _add_env("FOO", "9f8e7d6c5b4a39281706f5e4d3c2b1a0")),
    (check_no_secret_values_in_env, "secret param", _add_env("CRM_PASSWORD", {"Ref": "ClinicId"})),
    (check_layer, "x86 layer", _set("Resources.SharedLayer.Metadata.BuildArchitecture", "x86_64")),
    (check_layer, "logical-id name", _set("Resources.SharedLayer.Properties.LayerName", _DELETE)),
    (check_layer, "no build method", _set("Resources.SharedLayer.Metadata.BuildMethod", _DELETE)),
    (check_sqs_events, "no partial batch", _set(f"{_SYNCER_EVENT}.FunctionResponseTypes", [])),
    (check_sqs_events, "no max concurrency", _set(f"{_SYNCER_EVENT}.ScalingConfig", _DELETE)),
    (check_sqs_events, "fifo batch 100", _set(f"{_SYNCER_EVENT}.BatchSize", 100)),
    (check_sync_queue, "not fifo", _set("Resources.SyncQueue.Properties.FifoQueue", False)),
    (
        check_sync_queue,
        "bad name",
        _set("Resources.SyncQueue.Properties.QueueName", {"Fn::Sub": "${AWS::StackName}-q"}),
    ),
    (check_sync_queue, "maxReceive 3", _set("Resources.SyncQueue.Properties.RedrivePolicy.maxReceiveCount", 3)),
    (check_sync_queue, "no redrive", _set("Resources.SyncQueue.Properties.RedrivePolicy", _DELETE)),
    (check_sync_queue, "visibility 700", _set("Resources.SyncQueue.Properties.VisibilityTimeout", 700)),
    (check_sync_queue, "syncer 400 s", _set("Resources.StageSyncerFunction.Properties.Timeout", 400)),
    (check_sync_queue, "no SSE", _set("Resources.SyncQueue.Properties.SqsManagedSseEnabled", False)),
    (check_dlqs, "standard DLQ", _set("Resources.SyncDLQ.Properties.FifoQueue", _DELETE)),
    (check_dlqs, "short retention", _set("Resources.SyncDLQ.Properties.MessageRetentionPeriod", 345600)),
    (check_table, "no PITR", _set("Resources.Table.Properties.PointInTimeRecoverySpecification", _DELETE)),
    (check_table, "no SSE", _set("Resources.Table.Properties.SSESpecification.SSEEnabled", False)),
    (check_table, "no TTL", _set("Resources.Table.Properties.TimeToLiveSpecification", _DELETE)),
    (check_table, "provisioned", _set("Resources.Table.Properties.BillingMode", "PROVISIONED")),
    (check_table, "delete policy", _set("Resources.Table.DeletionPolicy", "Delete")),
    (check_table, "orphan on failed create", _set("Resources.Table.DeletionPolicy", "Retain")),
    (check_table, "no replace policy", _set("Resources.Table.UpdateReplacePolicy", _DELETE)),
    (check_schedules, "logical-id name", _set(f"{_POLLER}.Events.CrmCatchUp.Properties.Name", _DELETE)),
    (
        check_schedules,
        "fixed name",
        _set(f"{_POLLER}.Events.Poll.Properties.Name", {"Fn::Sub": "clinicsync-poll"}),
    ),
    (
        check_schedules,
        "same name twice",
        _set(f"{_POLLER}.Events.Poll.Properties.Name", {"Fn::Sub": "${AWS::StackName}-resync"}),
    ),
    (check_schedules, "no timezone", _set(f"{_POLLER}.Events.Poll.Properties.ScheduleExpressionTimezone", _DELETE)),
    (check_schedules, "no DLQ", _set(f"{_POLLER}.Events.DeepResync.Properties.DeadLetterConfig", _DELETE)),
    (check_schedules, "wrong job", _set(f"{_POLLER}.Events.DeepResync.Properties.Input", '{"job":"poll"}')),
    (check_schedules, "classic schedule", _set(f"{_POLLER}.Events.Poll.Type", "Schedule")),
    (
        check_routes,
        "GET amocrm",
        _set("Resources.CrmWebhookFunction.Properties.Events.AmoCrmWebhook.Properties.Method", "GET"),
    ),
    (check_routes, "no one-click", _set(f"{_UNSUB}.Events.UnsubscribeOneClick", _DELETE)),
    (check_routes, "implicit api", _set(f"{_UNSUB}.Events.UnsubscribePage.Properties.ApiId", _DELETE)),
    (check_routes, "no throttling", _set("Resources.HttpApi.Properties.DefaultRouteSettings", _DELETE)),
    (check_routes, "logs raw path", _set("Resources.HttpApi.Properties.AccessLogSettings.Format", "$context.path")),
    (check_log_groups, "no retention", _set("Resources.MisPollerLogGroup.Properties.RetentionInDays", _DELETE)),
    (
        check_log_groups,
        "access log outside vendedlogs",
        _set("Resources.HttpApiAccessLogGroup.Properties.LogGroupName", {"Fn::Sub": "/clinicsync/${AWS::StackName}/a"}),
    ),
    (
        check_log_groups,
        "group named per clinic only",
        _set("Resources.MisPollerLogGroup.Properties.LogGroupName", {"Fn::Sub": "/clinicsync/${ClinicId}/mis-poller"}),
    ),
    (check_log_groups, "default group", _set(f"{_POLLER}.LoggingConfig", _DELETE)),
    (
        check_log_groups,
        "shared group",
        _override("UnsubscribeFunction", "LoggingConfig", {"LogGroup": {"Ref": "MisPollerLogGroup"}}),
    ),
    (
        check_iam_no_wildcards,
        "sqs:*",
        _add_statement("StageSyncerRole", {"Action": "sqs:*", "Resource": {"Fn::GetAtt": ["SyncQueue", "Arn"]}}),
    ),
    (
        check_iam_no_wildcards,
        "resource *",
        _add_statement("MisPollerRole", {"Action": "ssm:DescribeParameters", "Resource": "*"}),
    ),
    (
        check_iam_no_wildcards,
        "x-ray next to a resource *",
        _add_statement("MisPollerRole", {"Action": ["xray:PutTraceSegments", "sqs:SendMessage"], "Resource": "*"}),
    ),
    (
        check_iam_no_wildcards,
        "action *",
        _add_statement("MisPollerRole", {"Action": ["*"], "Resource": {"Ref": "MisSecretArn"}}),
    ),
    (
        check_iam_no_wildcards,
        "SAM policy template",
        _override(
            "CrmWebhookFunction",
            "Policies",
            [{"SQSSendMessagePolicy": {"QueueName": {"Fn::GetAtt": ["SyncQueue", "QueueName"]}}}],
        ),
    ),
    (check_iam_no_wildcards, "generated role", _set(f"{_UNSUB}.Role", _DELETE)),
    (
        check_iam_no_wildcards,
        "AWS-managed policy",
        _set(
            "Resources.StageSyncerRole.Properties.ManagedPolicyArns",
            ["arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole"],
        ),
    ),
    (
        check_iam_no_wildcards,
        "any secret",
        _add_statement(
            "UnsubscribeRole", {"Action": "secretsmanager:GetSecretValue", "Resource": "arn:aws:secretsmanager:*"}
        ),
    ),
    (
        check_policy_resources_are_the_stacks_own,
        "alarm topic",
        _add_statement("StageSyncerRole", {"Action": "sns:Publish", "Resource": {"Ref": "AlarmTopicArn"}}),
    ),
    (
        check_policy_resources_are_the_stacks_own,
        "another clinic's table",
        _add_statement(
            "MisPollerRole",
            {
                "Action": "dynamodb:GetItem",
                "Resource": {"Fn::Sub": "arn:aws:dynamodb:${AWS::Region}:${AWS::AccountId}:table/${ClinicId}"},
            },
        ),
    ),
    (
        check_policy_resources_are_the_stacks_own,
        "every log group",
        _add_statement(
            "CrmWebhookRole",
            {
                "Action": "logs:PutLogEvents",
                "Resource": {"Fn::Sub": "arn:aws:logs:${AWS::Region}:${AWS::AccountId}:log-group"},
            },
        ),
    ),
    (
        check_least_privilege_per_function,
        "crm secret to unsubscribe",
        _add_statement(
            "UnsubscribeRole", {"Action": "secretsmanager:GetSecretValue", "Resource": {"Ref": "CrmSecretArn"}}
        ),
    ),
    (
        check_least_privilege_per_function,
        "clinic secret to the webhook",
        _add_statement(
            "CrmWebhookRole", {"Action": "secretsmanager:GetSecretValue", "Resource": {"Ref": "ClinicSecretArn"}}
        ),
    ),
    (
        check_least_privilege_per_function,
        "poller cannot save a refreshed token",
        lambda t: _props(t, "MisPollerRole")["Policies"][0]["PolicyDocument"]["Statement"].pop(2),
    ),
    (
        check_least_privilege_per_function,
        "syncer lost its queue",
        lambda t: _props(t, "StageSyncerRole")["Policies"][0]["PolicyDocument"]["Statement"].pop(3),
    ),
    (
        check_least_privilege_per_function,
        "webhook writes the MIS secret",
        _add_statement(
            "CrmWebhookRole", {"Action": "secretsmanager:PutSecretValue", "Resource": {"Ref": "MisSecretArn"}}
        ),
    ),
    (
        check_least_privilege_per_function,
        "shared role",
        _set("Resources.UnsubscribeFunction.Properties.Role", {"Fn::GetAtt": ["CrmWebhookRole", "Arn"]}),
    ),
    (
        check_token_writers_outlive_a_refresh,
        "webhook 10 s",
        _set("Resources.CrmWebhookFunction.Properties.Timeout", 10),
    ),
    (check_alarms, "no DLQ alarm", _drop_alarm({"Fn::GetAtt": ["SyncDLQ", "QueueName"]})),
    (check_alarms, "no scheduler alarm", _drop_alarm({"Fn::GetAtt": ["SchedulerDLQ", "QueueName"]})),
    (check_alarms, "no errors alarm", _drop_alarm({"Ref": "StageSyncerFunction"})),
    (
        check_alarms,
        "unconditional topic",
        _set("Resources.SyncDLQDepthAlarm.Properties.AlarmActions", [{"Ref": "AlarmTopicArn"}]),
    ),
    (
        check_alarms,
        "missing data breaches",
        _set("Resources.SyncDLQDepthAlarm.Properties.TreatMissingData", "breaching"),
    ),
    (check_outputs, "no ApiUrl", _set("Outputs.ApiUrl", _DELETE)),
    (check_outputs, "no fn name", _set("Outputs.StageSyncerFunctionName", _DELETE)),
]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_template_passes(check: Callable[[Template], None], template: Template) -> None:
    check(copy.deepcopy(template))


@pytest.mark.parametrize(
    ("check", "mutate"),
    [(c, m) for c, _, m in MUTATIONS],
    ids=[f"{c.__name__}-{label}" for c, label, _ in MUTATIONS],
)
def test_check_catches_regression(
    check: Callable[[Template], None], mutate: Callable[[Template], None], template: Template
) -> None:
    broken = copy.deepcopy(template)
    mutate(broken)
    assert broken != template, "mutation changed nothing"
    with pytest.raises((AssertionError, KeyError, pytest.fail.Exception)):
        check(broken)


def test_every_check_has_a_mutation() -> None:
    covered = {c for c, _, _ in MUTATIONS}
    assert [c.__name__ for c in CHECKS if c not in covered] == []


# ----------------------------------------------------------------------------- loader


def test_loader_expands_short_tags() -> None:
    text = """
AWSTemplateFormatVersion: 2010-09-09
Conditions:
  C: !Not [!Equals [!Ref P, ""]]
Resources:
  R:
    Type: X
    Properties:
      A: !GetAtt Q.Arn
      B: !Sub "${AWS::StackName}-x"
      C: !If [C, !Join ["-", [a, !Select [0, !Split [",", "b,c"]]]], !Ref AWS::NoValue]
      D: !GetAtt [Q, QueueName]
      E: !Base64 abc
      F: !Condition C
"""
    t = loads(text)
    assert t["AWSTemplateFormatVersion"] == "2010-09-09"
    props = t["Resources"]["R"]["Properties"]
    assert props["A"] == {"Fn::GetAtt": ["Q", "Arn"]}
    assert props["B"] == {"Fn::Sub": "${AWS::StackName}-x"}
    assert props["C"]["Fn::If"][0] == "C"
    assert props["D"] == {"Fn::GetAtt": ["Q", "QueueName"]}
    assert props["E"] == {"Fn::Base64": "abc"}
    assert props["F"] == {"Condition": "C"}
    assert t["Conditions"]["C"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "P"}, ""]}]}

    def get_att(logical_id: str, attribute: str) -> str:
        return f"{logical_id}/{attribute}"

    refs = {"P": "v", "AWS::StackName": "stack"}
    conditions = evaluate_conditions(t, refs)
    assert conditions == {"C": True}
    supported = {k: v for k, v in props.items() if k != "E"}
    resolved = resolve(supported, refs=refs, get_att=get_att, conditions=conditions)
    assert resolved == {"A": "Q/Arn", "B": "stack-x", "C": "a-b", "D": "Q/QueueName", "F": True}
    assert "C" not in resolve(supported, refs=refs, get_att=get_att, conditions={"C": False})
    assert evaluate_conditions(t, {"P": ""}) == {"C": False}
    with pytest.raises(IntrinsicError):
        resolve({"Ref": "Missing"}, refs=refs)
    with pytest.raises(IntrinsicError):
        resolve(props["E"])


def test_resolve_sub_forms() -> None:
    refs = {"AWS::Region": "eu-central-1", "Name": "n"}
    assert resolve({"Fn::Sub": "${AWS::Region}/${Name}/${!Literal}"}, refs=refs) == "eu-central-1/n/${Literal}"
    assert resolve({"Fn::Sub": ["${a}-${Name}", {"a": {"Ref": "Name"}}]}, refs=refs) == "n-n"
    assert resolve({"Fn::Sub": "${Q.Arn}"}, refs=refs, get_att=lambda r, a: f"{r}:{a}") == "Q:Arn"


def test_function_properties_merges_globals(template: Template) -> None:
    props = function_properties(template, "StageSyncerFunction")
    assert props["LoggingConfig"] == {"LogFormat": "JSON", "LogGroup": {"Ref": "StageSyncerLogGroup"}}
    assert props["Runtime"] == "python3.13"
    with pytest.raises(ValueError, match="not AWS::Serverless::Function"):
        function_properties(template, "Table")


# ----------------------------------------------------------------------------- runtime compatibility


def test_state_resources_create_in_moto(template: Template, local_aws: LocalAws) -> None:
    """The local runtime creates SyncQueue, SyncDLQ and Table in moto straight from these Properties. On the
    session's moto server: an in-process mock_aws would reset the backends that server shares."""
    subset = {"Resources": {k: template["Resources"][k] for k in ("SyncQueue", "SyncDLQ", "Table")}}
    stack = f"clinicsync-state-{uuid.uuid4().hex[:8]}"
    cloudformation = local_aws.client("cloudformation")
    cloudformation.create_stack(StackName=stack, TemplateBody=json.dumps(subset))
    physical = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cloudformation.describe_stack_resources(StackName=stack)["StackResources"]
    }
    sqs = local_aws.client("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=physical["SyncQueue"], AttributeNames=["All"])["Attributes"]
    assert attrs["FifoQueue"] == "true"
    assert physical["SyncQueue"].endswith(".fifo")
    assert int(attrs["VisibilityTimeout"]) == 1800
    redrive = json.loads(attrs["RedrivePolicy"])
    assert int(redrive["maxReceiveCount"]) == 5
    assert redrive["deadLetterTargetArn"].endswith(physical["SyncDLQ"].rsplit("/", 1)[-1])
    table = local_aws.client("dynamodb").describe_table(TableName=physical["Table"])["Table"]
    assert [k["AttributeName"] for k in table["KeySchema"]] == ["pk", "sk"]


_TRANSLATE_AND_LINT = r"""
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse
from cfnlint.api import ManualArgs, lint

class NoManagedPolicies:
    def load(self):
        return {}

template = yaml_parse(open(sys.argv[1]).read())
for resource in template["Resources"].values():
    props = resource.get("Properties", {})
    for key in ("CodeUri", "ContentUri"):
        if key in props:
            props[key] = "s3://bucket/key"
arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:x-AbCdEf"
params = {"ClinicId": "demo", "MisKind": "medods", "CrmKind": "bitrix24",
          "ConfigParameterName": "/clinicsync/demo/config",
          "MisSecretArn": arn, "CrmSecretArn": arn, "ClinicSecretArn": arn}
out = transform(template, params, NoManagedPolicies())
for match in lint(json.dumps(out), config=ManualArgs(regions=["eu-central-1"])):
    print(match)
"""


@pytest.mark.slow
def test_transformed_template_lints_clean() -> None:
    """cfn-lint >= 1.4x lints SAM templates WITHOUT running the SAM transform, so rules on the generated
    resources (E3505 visibility vs timeout, runtime enums, ESM rules ...) never fire in `sam validate --lint`.
    Translate with the SAM translator from .venv-sam and lint the CloudFormation output as well."""
    sam_python = ROOT / ".venv-sam" / "bin" / "python"
    if not sam_python.exists():
        pytest.skip(".venv-sam not installed (make sam-venv)")
    result = subprocess.run(
        [str(sam_python), "-c", _TRANSLATE_AND_LINT, str(TEMPLATE_PATH)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"AWS_DEFAULT_REGION": "eu-central-1", "PATH": "/usr/bin:/bin", "SAM_CLI_TELEMETRY": "0"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout


@pytest.mark.slow
def test_transformed_template_grants_nothing_on_star_outside_the_allow_list() -> None:
    """What CloudFormation really creates: SAM adds roles and policies of its own (for schedules, event
    sources, tracing) that the static checks above never see. No AWS-managed policy (they grant "*"), and
    "*" only for the allow-listed actions."""
    from sandbox import sam_transform

    if not sam_transform.available():
        pytest.skip(".venv-sam not installed (make sam-venv)")
    arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:clinicsync/demo/{}-AbC123"
    params = {
        **{"ClinicId": "demo", "MisKind": "medods", "CrmKind": "amocrm"},
        **{"ConfigParameterName": "/clinicsync/demo/config", "MisSecretArn": arn.format("mis")},
        **{"CrmSecretArn": arn.format("crm"), "ClinicSecretArn": arn.format("clinic")},
    }
    t = sam_transform.transform(TEMPLATE_PATH, params)
    roles = resources_of_type(t, "AWS::IAM::Role")
    assert len(roles) >= 4 + 3  # the four functions' and the three schedules' roles
    for name, role in roles.items():
        for policy_arn in role["Properties"].get("ManagedPolicyArns", []):
            assert isinstance(policy_arn, dict) and "Ref" in policy_arn, f"{name}: managed policy {policy_arn}"
            assert t["Resources"][policy_arn["Ref"]]["Type"] == "AWS::IAM::ManagedPolicy", name
    statements = list(_statements(t["Resources"]))
    assert len(statements) >= 20
    for statement in statements:
        actions = set(_as_list(statement.get("Action")))
        for resource in _as_list(statement.get("Resource")):
            if "*" in json.dumps(resource):
                assert actions <= set(WILDCARD_RESOURCE_ALLOWED), f"{sorted(actions)} on {resource!r}"
    for function in resources_of_type(t, "AWS::Lambda::Function").values():
        role = _target(function["Properties"]["Role"])
        assert role in roles and not role.endswith("FunctionRole"), f"SAM-generated role {role}"


def test_every_iam_statement_is_explained_in_the_deploy_guide(template: Template) -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split("## IAM, per statement", 1)
    assert len(guide) == 2, "docs/deploy.md has no 'IAM, per statement' section"
    sids = {statement.get("Sid") for statement in _statements(template)}
    assert None not in sids, "a statement without a Sid"
    assert [sid for sid in sorted(sids) if f"`{sid}`" not in guide[1]] == []
