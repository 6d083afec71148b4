"""The local runtime: stands in for Lambda, SQS event source mappings, EventBridge Scheduler and the
HTTP API, so the real handlers run on this machine against moto and the vendor emulators.

- AWS is moto in server mode. A clinic's queue and table are created by moto's CloudFormation from
  ``template.yaml``'s own resource definitions (one source of truth, no second list here).
- Handler environments are resolved from the template's ``Globals.Function.Environment`` too.
- Events are real-shaped: the Scheduler ``Input``, SQS batches (with ``batchItemFailures`` honoured
  like the event source mapping does), and HTTP API v2 requests from a loopback HTTP server.

It drives the handlers; it never re-implements what they do.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.util
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl

import boto3
from moto.server import ThreadedMotoServer
from werkzeug.wrappers import Request, Response

from clinicsync.domain.config import stored_config
from sandbox.cfn_yaml import evaluate_conditions, function_properties, load_template, resolve, resources_of_type
from sandbox.emulators.base import ServedApp

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
REGION = "eu-central-1"
ACCOUNT = "123456789012"
LOCAL_RESOURCES = (
    "Table",
    "SyncQueue",
    "SyncDLQ",
    "CrmEventQueue",
    "CrmEventDLQ",
    "ConsentQueue",
    "ConsentDLQ",
    "IdentInboxQueue",
    "IdentInboxDLQ",
)
_env_lock = threading.RLock()

if str(ROOT / "layers" / "shared") not in sys.path:
    sys.path.insert(0, str(ROOT / "layers" / "shared"))


class InvocationCrash(BaseException):
    """The function's process died mid-invocation (chaos runs raise it from inside a handler). A
    BaseException, so no ``except Exception`` in the handler or in Powertools can swallow it."""


@functools.cache
def tune_moto() -> None:
    """Make moto affordable for clinic-sized tables, once per process (the local runtime, chaos, bench).

    - moto keeps every model object it ever built in a class-level list (for its dashboard, which we
      never use), and ``copy.deepcopy`` builds objects through that path too. Each DynamoDB transaction
      deep-copies the table as its rollback copy, so every claim (``CLAIM#`` transaction) leaked a full
      table: the full chaos run grew past 23 GB and was killed. Nothing is tracked here.
    - moto backs up the *whole table* before *each item* of a TransactWriteItems (a deepcopy per item),
      and restores the backup if the transaction is cancelled. Here the table is not copied at all:
      each write of a transaction first notes the one item it replaces (a copy of it, or its absence),
      and a cancelled transaction puts those items back, newest first; the state after a rollback is
      the same as before, at the cost of the items written instead of the whole table (which made a
      50k-appointment clinic's claims quadratic). The journal is per thread: the server handles
      requests on several threads.
    - moto answers a Query on the table's own key by sorting *every* item of the table and keeping
      those of the partition. Here such a query sorts the partition alone: the same items in the same
      order, without the table-sized sort per query."""
    import copy as real_copy

    import moto.dynamodb.models as models
    from moto.core import common_models
    from moto.core.model_instances import reset_model_data
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    def untracked_new(cls: type, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    common_models.BaseModel.__new__ = untracked_new  # type: ignore[assignment,method-assign]
    reset_model_data()

    real_transact = models.DynamoDBBackend.transact_write_items
    local = threading.local()

    def slot(table: Any, attrs: dict[str, Any]) -> tuple[Any, Any]:
        hash_value = DynamoType(attrs[table.hash_key_attr])
        range_value = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
        return hash_value, range_value

    def journaled(name: str, attrs_of: Callable[[tuple[Any, ...]], dict[str, Any]]) -> None:
        real = getattr(models.DynamoDBBackend, name)

        def write(backend: Any, table_name: str, *args: Any, **kwargs: Any) -> Any:
            journal: list[tuple[Any, Any, Any, Any]] | None = getattr(local, "journal", None)
            if journal is not None and table_name in backend.tables:
                table = backend.tables[table_name]
                try:
                    hash_value, range_value = slot(table, attrs_of(args))
                except (KeyError, TypeError):
                    pass  # no key: the write itself fails before it changes anything
                else:
                    held = table.get_item(hash_value, range_value)
                    journal.append((table, hash_value, range_value, real_copy.deepcopy(held)))
            return real(backend, table_name, *args, **kwargs)

        setattr(models.DynamoDBBackend, name, write)

    journaled("put_item", lambda args: args[0])
    journaled("delete_item", lambda args: args[0])
    journaled("update_item", lambda args: args[0])

    def undo(journal: list[tuple[Any, Any, Any, Any]]) -> None:
        for table, hash_value, range_value, held in reversed(journal):
            if held is None:
                table.delete_item(hash_value, range_value)
            elif range_value is not None:
                table.items[hash_value][range_value] = held
            else:
                table.items[hash_value] = held

    class NoTableCopy:
        @staticmethod
        def deepcopy(obj: Any, memo_arg: Any = None) -> Any:
            # transact_write_items "restores" this on a cancel: the table itself, which undo() has repaired.
            return obj if isinstance(obj, Table) else real_copy.deepcopy(obj, memo_arg)

    def transact(backend: Any, transact_items: Any) -> None:
        local.journal = []
        try:
            real_transact(backend, transact_items)
        except BaseException:
            undo(local.journal)  # whatever escapes has been rolled back by moto (see its code): ours too
            raise
        finally:
            local.journal = None

    models.copy = NoTableCopy  # type: ignore[assignment]

    real_query, real_all_items = Table.query, Table.all_items

    def query(table: Any, hash_key: Any, *args: Any, **kwargs: Any) -> Any:
        index_name = args[6] if len(args) > 6 else kwargs.get("index_name")
        local.partition = hash_key if index_name is None else None
        try:
            return real_query(table, hash_key, *args, **kwargs)
        finally:
            local.partition = None

    def all_items(table: Any) -> Any:
        key = getattr(local, "partition", None)
        if key is None:
            return real_all_items(table)
        local.partition = None  # the query's own call only
        if table.range_key_attr:
            items = list(table.items[key].values()) if key in table.items else []
        else:
            items = [table.items[key]] if key in table.items else []
        return sorted(items, key=lambda x: (x.hash_key, x.range_key) if x.range_key else x.hash_key)

    Table.query = query  # type: ignore[method-assign]
    Table.all_items = all_items  # type: ignore[method-assign]
    models.DynamoDBBackend.transact_write_items = transact  # type: ignore[method-assign]
    _serialise_cloudformation()


def _serialise_cloudformation() -> None:
    """moto's CloudFormation backend keeps its stacks, change sets and exports in plain dicts that a
    change set's ``apply`` walks while it builds resources, and the server answers on several threads: a
    fleet wave deploying four clinics at once once got a 500 on ``ExecuteChangeSet``. Here its calls run
    one at a time (one lock for the process), as a service keeps its own bookkeeping atomic."""
    from moto.cloudformation.models import CloudFormationBackend

    lock = threading.RLock()
    for name in (
        "create_stack",
        "update_stack",
        "delete_stack",
        "create_change_set",
        "execute_change_set",
        "delete_change_set",
        "describe_change_set",
        "describe_stacks",
        "list_stacks",
        "list_exports",
    ):
        real = getattr(CloudFormationBackend, name)

        def serialised(*args: Any, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            with lock:
                return _real(*args, **kwargs)

        setattr(CloudFormationBackend, name, serialised)


class LocalAws:
    """moto in server mode on loopback; boto3 anywhere in this process talks to it via AWS_ENDPOINT_URL."""

    def __init__(self) -> None:
        tune_moto()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> LocalAws:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.export_env()
        return self

    def export_env(self) -> None:
        """boto3 anywhere in this process (handlers, CLI, tests) talks to this moto from now on."""
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION,
                "POWERTOOLS_TRACE_DISABLED": "1",
                "POWERTOOLS_METRICS_NAMESPACE": "clinicsync",
            }
        )

    def stop(self) -> None:
        self._server.stop()

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION)


@dataclass
class FakeContext:
    """The parts of LambdaContext that Powertools and our handlers read."""

    function_name: str
    timeout_s: int
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{self.function_name}"

    @property
    def function_version(self) -> str:
        return "$LATEST"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return "local"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # API Gateway template, e.g. /webhooks/amocrm/{secret}
    function: str

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if method != self.method:
            return None
        want, got = self.path.strip("/").split("/"), path.strip("/").split("/")
        if len(want) != len(got):
            return None
        params: dict[str, str] = {}
        for w, g in zip(want, got, strict=True):
            if w.startswith("{") and w.endswith("}"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


class ClinicStack:
    """One clinic's stack in the local runtime: the template's table and queues, its secrets and config."""

    def __init__(
        self,
        aws: LocalAws,
        clinic_id: str,
        config_yaml: str,
        secrets: Mapping[str, Mapping[str, Any]],
        mis_kind: str = "medods",
        crm_kind: str = "bitrix24",
    ) -> None:
        self.aws = aws
        self.clinic_id = clinic_id
        self.stack_name = f"clinicsync-{clinic_id}"
        self.template = load_template(TEMPLATE)
        self._modules: dict[str, ModuleType] = {}
        ssm, sm = aws.client("ssm"), aws.client("secretsmanager")
        config_name = f"/clinicsync/{clinic_id}/config"
        # Stored as `clinicsync deploy` stores it (JSON), so the functions read it as deployed.
        ssm.put_parameter(Name=config_name, Value=stored_config(config_yaml), Type="String", Overwrite=True)
        arns = {}
        for key in ("mis", "crm", "clinic"):
            name = f"clinicsync/{clinic_id}/{key}"
            arns[key] = sm.create_secret(Name=name, SecretString=json.dumps(dict(secrets[key])))["ARN"]
        self.parameters = {
            "ClinicId": clinic_id,
            "MisKind": mis_kind,
            "CrmKind": crm_kind,
            "ConfigParameterName": config_name,
            "MisSecretArn": arns["mis"],
            "CrmSecretArn": arns["crm"],
            "ClinicSecretArn": arns["clinic"],
        }
        self.redeliver: Callable[[], bool] | None = None  # chaos: skip a delete after success
        self.physical = self._create_resources()
        self.queue_url = self.physical["SyncQueue"]
        self.dlq_url = self.physical["SyncDLQ"]
        self.table_name = self.physical["Table"]
        self.env = self._function_env()

    # --- resources from the template ---------------------------------------------------------------

    def _create_resources(self) -> dict[str, str]:
        resources = {name: self.template["Resources"][name] for name in LOCAL_RESOURCES}
        params = self.template.get("Parameters", {})
        body = {
            "AWSTemplateFormatVersion": "2010-09-09",
            "Parameters": params,
            "Resources": resources,
        }
        values = [{"ParameterKey": k, "ParameterValue": str(v)} for k, v in self.parameters.items() if k in params]
        cfn = self.aws.client("cloudformation")
        cfn.create_stack(StackName=self.stack_name, TemplateBody=json.dumps(body), Parameters=values)
        listed = cfn.describe_stack_resources(StackName=self.stack_name)["StackResources"]
        return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed}

    def _refs(self) -> dict[str, Any]:
        defaults = {k: v.get("Default") for k, v in self.template.get("Parameters", {}).items()}
        return {
            **defaults,
            **self.parameters,
            **self.physical,
            "AWS::StackName": self.stack_name,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": "aws",
        }

    def _get_att(self, logical_id: str, attribute: str) -> str:
        """The attributes the functions' env vars use: a queue's ARN."""
        if attribute != "Arn" or logical_id not in self.physical:
            raise KeyError(f"{logical_id}.{attribute} is not modelled locally")
        attrs = self.aws.client("sqs").get_queue_attributes(
            QueueUrl=self.physical[logical_id], AttributeNames=["QueueArn"]
        )["Attributes"]
        return str(attrs["QueueArn"])

    def _function_env(self) -> dict[str, str]:
        refs = self._refs()
        variables = self.template["Globals"]["Function"]["Environment"]["Variables"]
        conditions = evaluate_conditions(self.template, refs)
        resolved = resolve(variables, refs=refs, get_att=self._get_att, conditions=conditions)
        return {k: str(v) for k, v in resolved.items()}

    def function_ids(self) -> list[str]:
        return list(resources_of_type(self.template, "AWS::Serverless::Function"))

    # --- invoking handlers -------------------------------------------------------------------------

    def _module(self, function_id: str) -> ModuleType:
        if function_id not in self._modules:
            code_uri = function_properties(self.template, function_id)["CodeUri"]
            path = ROOT / code_uri / "app.py"
            spec = importlib.util.spec_from_file_location(f"clinicsync_fn_{function_id}", path)
            if spec is None or spec.loader is None:
                raise RuntimeError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # pydantic resolves postponed annotations through it
            spec.loader.exec_module(module)
            self._modules[function_id] = module
        return self._modules[function_id]

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Handlers read their settings from env vars, as on Lambda. Switching to another clinic's
        env drops cached clients (a cold start); invoking the same clinic again stays warm."""
        from clinicsync.runtime import wiring

        with _env_lock:
            if any(os.environ.get(k) != v for k, v in self.env.items()):
                os.environ.update(self.env)
                wiring.reset()
            yield

    def invoke(self, function_id: str, event: Mapping[str, Any]) -> Any:
        props = function_properties(self.template, function_id)
        context = FakeContext(function_name=f"{self.stack_name}-{function_id}", timeout_s=int(props["Timeout"]))
        with self.environment():
            return self._module(function_id).lambda_handler(dict(event), context)

    # --- EventBridge Scheduler ---------------------------------------------------------------------

    def scheduled_event(self, function_id: str = "MisPollerFunction", name: str | None = None) -> dict[str, Any]:
        events = function_properties(self.template, function_id)["Events"]
        schedule = next(e for n, e in events.items() if e["Type"] == "ScheduleV2" and (name is None or n == name))
        text = str(schedule["Properties"]["Input"])
        text = text.replace("<aws.scheduler.scheduled-time>", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        text = text.replace("<aws.scheduler.execution-id>", str(uuid.uuid4()))
        return dict(json.loads(text))

    def run_schedule(self, name: str | None = None) -> Any:
        return self.invoke("MisPollerFunction", self.scheduled_event(name=name))

    # --- SQS event source mapping ------------------------------------------------------------------

    def _sqs_event(self, queue_url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue_url.rsplit('/', 1)[-1]}"
        records = [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
        return {"Records": records}

    def _event_source(self, queue_id: str) -> tuple[str, int]:
        """(function, batch size) of the SQS event source mapping that reads ``queue_id``."""
        for function_id in self.function_ids():
            for event in function_properties(self.template, function_id).get("Events", {}).values():
                if event["Type"] == "SQS" and event["Properties"]["Queue"] == {"Fn::GetAtt": [queue_id, "Arn"]}:
                    return function_id, int(event["Properties"].get("BatchSize", 10))
        raise KeyError(f"no SQS event source reads {queue_id}")

    def _receive(self, queue_url: str, batch_size: int) -> list[dict[str, Any]]:
        # SQS hands out at most 10 per call; the event source mapping gathers up to its batch size.
        sqs = self.aws.client("sqs")
        received: list[dict[str, Any]] = []
        while len(received) < batch_size:
            page = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=min(10, batch_size - len(received)),
                AttributeNames=["All"],
                WaitTimeSeconds=0,
            ).get("Messages", [])
            if not page:
                break
            received.extend(page)
        return received

    def drain_queue(
        self, queue_id: str = "SyncQueue", max_rounds: int = 10_000, on_batch: Any = None
    ) -> dict[str, int]:
        """Deliver queued messages to their function in batches, as the event source mapping does.

        Failed items are made visible again at once (standing in for the visibility timeout); an
        invocation error returns the whole batch; SQS moves a message to the DLQ after maxReceiveCount.
        """
        queue_url = self.physical[queue_id]
        function_id, batch_size = self._event_source(queue_id)
        totals = {"batches": 0, "messages": 0, "failed": 0}
        for _ in range(max_rounds):
            received = self._receive(queue_url, batch_size)
            if not received:
                break
            failed = self._deliver(queue_id, function_id, received)
            totals["batches"] += 1
            totals["messages"] += len(received)
            totals["failed"] += len(failed)
            if on_batch is not None:
                on_batch(len(received))
        return totals

    @contextlib.contextmanager
    def event_sources(self, *queue_ids: str) -> Iterator[None]:
        """Serve queues in the background the way Lambda's event source mappings do while the block
        runs: poll, gather up to the batch size or until the template's batching window closes, invoke."""
        stop = threading.Event()

        def serve(queue_id: str) -> None:
            function_id, batch_size = self._event_source(queue_id)
            window = self._batching_window(queue_id)
            url = self.physical[queue_id]
            while not stop.is_set():
                received = self._receive(url, batch_size)
                if not received:
                    stop.wait(0.02)  # the mapping long-polls; a short nap stands in for it
                    continue
                deadline = time.monotonic() + window
                while len(received) < batch_size and time.monotonic() < deadline and not stop.is_set():
                    more = self._receive(url, batch_size - len(received))
                    received.extend(more)
                    if not more:
                        stop.wait(0.02)
                self._deliver(queue_id, function_id, received)

        threads = [threading.Thread(target=serve, args=(q,), daemon=True) for q in queue_ids]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

    def _batching_window(self, queue_id: str) -> float:
        for function_id in self.function_ids():
            for event in function_properties(self.template, function_id).get("Events", {}).values():
                props = event.get("Properties", {})
                if event["Type"] == "SQS" and props.get("Queue") == {"Fn::GetAtt": [queue_id, "Arn"]}:
                    return float(props.get("MaximumBatchingWindowInSeconds", 0))
        return 0.0

    def _deliver(self, queue_id: str, function_id: str, received: list[dict[str, Any]]) -> set[str]:
        sqs = self.aws.client("sqs")
        queue_url = self.physical[queue_id]
        try:
            response = self.invoke(function_id, self._sqs_event(queue_url, received))
            failed = {f["itemIdentifier"] for f in (response or {}).get("batchItemFailures", [])}
        except (Exception, InvocationCrash):
            failed = {m["MessageId"] for m in received}
        for message in received:
            # A delete that never happened (chaos): SQS delivers the message again.
            redelivered = self.redeliver is not None and self.redeliver()
            if message["MessageId"] in failed or redelivered:
                sqs.change_message_visibility(
                    QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
            else:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return failed

    def drain_all(self) -> dict[str, int]:
        """CRM events become patient observations on the sync queue: drain until both are empty."""
        totals = {"batches": 0, "messages": 0, "failed": 0}
        while True:
            for queue_id in ("CrmEventQueue", "SyncQueue", "ConsentQueue"):
                for key, value in self.drain_queue(queue_id).items():
                    totals[key] += value
            if all(self.queue_depth(q) == 0 for q in ("SyncQueue", "CrmEventQueue", "ConsentQueue")):
                return totals

    def queue_depth(self, queue_id: str = "SyncQueue", dlq: bool = False) -> int:
        dlqs = {"SyncQueue": "SyncDLQ", "CrmEventQueue": "CrmEventDLQ", "ConsentQueue": "ConsentDLQ"}
        url = self.physical[dlqs[queue_id] if dlq else queue_id]
        attrs = self.aws.client("sqs").get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    # --- HTTP API ----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        routes = []
        for function_id in self.function_ids():
            for event in function_properties(self.template, function_id).get("Events", {}).values():
                if event["Type"] == "HttpApi":
                    props = event["Properties"]
                    routes.append(Route(props["Method"].upper(), props["Path"], function_id))
        return routes

    def http_event(self, request: Request, route: Route, path_params: dict[str, str]) -> dict[str, Any]:
        body = request.get_data()
        text_types = ("application/json", "application/x-www-form-urlencoded", "text/")
        is_text = any(t in (request.content_type or "") for t in text_types) or not body
        try:
            decoded = body.decode("utf-8") if is_text else None
        except UnicodeDecodeError:
            decoded = None
        now = datetime.now(UTC)
        return {
            "version": "2.0",
            "routeKey": f"{route.method} {route.path}",
            "rawPath": request.path,
            "rawQueryString": request.query_string.decode("latin-1"),
            "cookies": [f"{k}={v}" for k, v in request.cookies.items()] or None,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "queryStringParameters": dict(parse_qsl(request.query_string.decode("latin-1"))) or None,
            "pathParameters": path_params or None,
            "requestContext": {
                "accountId": ACCOUNT,
                "apiId": "local",
                "domainName": request.host,
                "domainPrefix": "local",
                "http": {
                    "method": request.method,
                    "path": request.path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": request.remote_addr or "127.0.0.1",
                    "userAgent": request.user_agent.string,
                },
                "requestId": str(uuid.uuid4()),
                "routeKey": f"{route.method} {route.path}",
                "stage": "$default",
                "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "timeEpoch": int(now.timestamp() * 1000),
            },
            "body": decoded if decoded is not None else base64.b64encode(body).decode(),
            "isBase64Encoded": decoded is None,
        }

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        for route in self.routes():
            params = route.match(request.method, request.path)
            if params is not None:
                result = self.invoke(route.function, self.http_event(request, route, params))
                body = result.get("body") or ""
                raw = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode()
                response = Response(raw, status=int(result.get("statusCode", 200)), headers=result.get("headers"))
                return response(environ, start_response)
        return Response(json.dumps({"message": "Not Found"}), 404, content_type="application/json")(
            environ, start_response
        )

    def serve_http(self) -> ServedApp:
        return ServedApp(self.wsgi).start()

    # --- Lambda Invoke API (for the operator CLI: AWS_ENDPOINT_URL_LAMBDA points here) --------------

    def lambda_wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        """``POST /2015-03-31/functions/<stack>-<FunctionId>/invocations``, as boto3's ``lambda.invoke``
        sends it: the real handler runs with the event, its result is the payload; an exception becomes
        a ``X-Amz-Function-Error: Unhandled`` answer, as Lambda reports it."""
        request = Request(environ)
        parts = request.path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["2015-03-31", "functions"] or parts[3] != "invocations":
            return Response(json.dumps({"message": "Not Found"}), 404)(environ, start_response)
        name = parts[2].rsplit(":", 1)[-1]
        function_id = name.removeprefix(f"{self.stack_name}-")
        if function_id not in self.function_ids():
            body = {"Type": "User", "message": f"Function not found: {name}"}
            return Response(json.dumps(body), 404, headers={"x-amzn-ErrorType": "ResourceNotFoundException"})(
                environ, start_response
            )
        event = json.loads(request.get_data() or b"{}")
        try:
            result = self.invoke(function_id, event)
        except Exception as exc:
            error = {"errorMessage": str(exc), "errorType": type(exc).__name__}
            return Response(json.dumps(error), 200, headers={"X-Amz-Function-Error": "Unhandled"})(
                environ, start_response
            )
        return Response(json.dumps(result, default=str), 200, content_type="application/json")(environ, start_response)

    def serve_lambda(self) -> ServedApp:
        return ServedApp(self.lambda_wsgi).start()
