"""A handler's cold start loads only what its clinic uses: wiring imports each MIS and CRM adapter where
it builds it, so importing a handler loads none of them, and a Bitrix24 clinic never loads amoCRM's; each
part (config, store, use cases) is imported where it is built, so a handler loads only its own, and what
every one of its invocations builds is loaded with it (Lambda's init), not deferred to its first call; the
stored config is JSON, so no YAML parser loads; the X-Ray SDK is loaded only where Powertools traces, and
the layer ships the phone parser without its data for geocoding and carriers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.bench.harness import deployed_constants

ROOT = Path(__file__).resolve().parents[2]
# The layer's requirements only, as deployed (`make layer-venv`); the dev venv where it is not built.
LAYER_PYTHON = ROOT / ".venv-layer" / "bin" / "python"
HANDLERS = ["mis_poller", "stage_syncer", "crm_webhook", "unsubscribe"]
ADAPTERS = (
    "amocrm.client",
    "amocrm.gateway",
    "bitrix24.client",
    "bitrix24.gateway",
    "medods.source",
    "lis.source",
    "infoclinica.api",
    "infoclinica.source",
    "renovatio.source",
    "vtiger.client",
)


def _env(handler: str, env_overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        **deployed_constants(),  # the template's Globals, as every deployed function has them
        "PYTHONPATH": os.pathsep.join([str(ROOT / "functions" / handler), str(ROOT / "layers" / "shared")]),
        "AWS_DEFAULT_REGION": "eu-central-1",
    }
    for name, value in (env_overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _loaded_after(handler: str, statement: str, env_overrides: dict[str, str | None] | None = None) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = _env(handler, env_overrides)
    python = LAYER_PYTHON if LAYER_PYTHON.exists() else Path(sys.executable)
    done = subprocess.run(
        [str(python), "-c", code],
        check=False,
        env=env,
        cwd=ROOT / "functions" / handler,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("handler", HANDLERS)
def test_importing_a_handler_loads_no_mis_or_crm_adapter(handler: str) -> None:
    loaded = _loaded_after(handler, "import app")
    assert "clinicsync.runtime.wiring" in loaded  # the handler really reached the wiring
    assert {f"clinicsync.adapters.{name}" for name in ADAPTERS} & loaded == set()
    # The HTTP stack loads with the first adapter that calls an API (Container.http_client), not at import.
    assert {"httpx", "clinicsync.adapters.mailchimp.client"} & loaded == set()


# What a handler never builds, so its import must not load it: the webhook receiver only checks a sender
# and queues (no config, table, use case, retry machinery, IDENT or Mailchimp models, MIME parser); the
# others never build another handler's use case. No handler reads YAML (the stored config is JSON), and a
# plain ASCII e-mail needs neither the Unicode database nor IDNA's tables.
USE_CASES = {f"clinicsync.application.{name}" for name in ("sync", "crm_events", "consent", "poll", "ident")}
NEVER_AT_IMPORT = {
    "crm_webhook": USE_CASES
    | {
        "clinicsync.domain.config",
        "clinicsync.adapters.aws.store",
        "clinicsync.adapters.aws.table",
        "clinicsync.adapters.ident.contract",
        "clinicsync.adapters.mailchimp.webhook",
        "tenacity",
        "email.policy",
        "idna",
        "unicodedata",
    },
    "unsubscribe": {f"clinicsync.application.{name}" for name in ("sync", "crm_events", "poll", "ident")}
    | {"idna", "unicodedata", "tenacity", "clinicsync.runtime.crm_senders", "clinicsync.domain.ports"}
    | {"clinicsync.domain.crm_ports"}  # the consent outputs' CRM and MIS writes are the syncer's
    | {f"clinicsync.adapters.{crm}.webhook" for crm in ("bitrix24", "amocrm")},
    # The poller validates its schedule's input itself: Powertools' parser package would load pydantic's
    # network types and a TypeAdapter cache (the syncer loads it, for its SQS record model).
    "mis_poller": {f"clinicsync.application.{name}" for name in ("sync", "crm_events", "consent", "ident")}
    | {"aws_lambda_powertools.utilities.parser", "pydantic.networks"}
    | {"clinicsync.domain.crm_ports"},  # the CRM port's types: the catch-up loads them with its CRM side
    # Powertools' batch types import its DynamoDB, Kinesis and Kafka record models when pydantic is already
    # loaded: the handler imports the batch utility first, so they are never built.
    "stage_syncer": {"clinicsync.application.ident", "clinicsync.application.poll"}  # its queue port: typing only
    | {f"aws_lambda_powertools.utilities.parser.models.{name}" for name in ("dynamodb", "kinesis", "kafka")},
}
# What every invocation builds: imported with the handler, so that moving it to the first call is not
# counted as a saving (the bench times the import).
AT_IMPORT = {
    "crm_webhook": {
        "clinicsync.adapters.aws.queue",
        "clinicsync.settings",
        "clinicsync.adapters.bitrix24.webhook",
        "clinicsync.runtime.crm_senders",
    },
    "unsubscribe": {"clinicsync.domain.config", "clinicsync.application.consent", "clinicsync.adapters.aws.store"},
    # Every poll's MIS requests and every batch's table reads retry through tenacity (clinicsync.retrying
    # imports it on first use, for the HTTP handlers, whose routes never retry).
    "mis_poller": {
        "clinicsync.domain.config",
        "clinicsync.application.poll",
        "clinicsync.adapters.aws.store",
        "tenacity",
    },
    "stage_syncer": {
        "tenacity",
        "clinicsync.domain.crm_ports",
        "clinicsync.domain.config",
        "clinicsync.application.sync",
        "clinicsync.application.crm_events",
        "clinicsync.application.consent",
        "clinicsync.adapters.aws.store",
    },
}


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_handler_imports_what_its_invocations_build_and_nothing_they_never_build(handler: str) -> None:
    loaded = _loaded_after(handler, "import app")
    assert NEVER_AT_IMPORT[handler] & loaded == set()
    assert "yaml" not in loaded
    assert AT_IMPORT[handler] <= loaded


# The domain's models a handler validates on every invocation are built with its import; those it never
# validates are deferred (``defer_build``) and cost it nothing. A sync message holds the patient and visit models.
SYNC_MESSAGE = {"Patient", "Appointment", "PatientChanges", "CrmObservation", "SyncMessage"}
STATE = {"state.PatientState", "state.AppointmentState", "state.LatestDeal"}
MODELS_BUILT = {
    "mis_poller": (SYNC_MESSAGE, {"CrmEvent"} | STATE),  # the catch-up's CRM events build on use
    "stage_syncer": (SYNC_MESSAGE | {"CrmEvent", "ConsentJob"} | STATE, set()),
    "crm_webhook": ({"CrmEvent"}, SYNC_MESSAGE | STATE),
    "unsubscribe": ({"ConsentJob"}, SYNC_MESSAGE | {"CrmEvent"} | STATE),
}


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_handler_builds_at_import_the_models_its_invocations_validate_and_no_other(handler: str) -> None:
    built, deferred = MODELS_BUILT[handler]
    statement = f"""
import app
from clinicsync.domain import models, state
def model(name):
    module, _, cls = name.rpartition(".")
    return getattr(state if module == "state" else models, cls)
built = {{name for name in {sorted(built | deferred)!r} if model(name).__pydantic_complete__}}
assert built == set({sorted(built)!r}), sorted(built)
"""
    assert "clinicsync.domain.models" in _loaded_after(handler, statement)


def test_a_deferred_model_validates_as_it_did_when_built_at_import() -> None:
    # The unsubscribe handler never builds the patient model: the first validation builds it, same rules.
    statement = """
import app
from pydantic import ValidationError
from clinicsync.domain.models import Patient
assert not Patient.__pydantic_complete__
assert Patient.model_validate({"mis_id": "p-1", "version": 3}).version == 3
try:
    Patient.model_validate({"mis_id": "p-1", "version": "3"})  # strict: no coercion
except ValidationError:
    pass
else:
    raise AssertionError("a deferred model lost its strictness")
"""
    _loaded_after("unsubscribe", statement)


@pytest.mark.parametrize("handler", ["mis_poller", "unsubscribe", "crm_webhook"])
def test_a_handler_that_writes_no_crm_record_creates_none_of_the_crm_ports_dataclasses(handler: str) -> None:
    # Each frozen dataclass compiles its methods at import (~3.3 M instructions); wherever they are defined.
    statement = """
import app
ours = [m for name, m in list(sys.modules.items()) if name.startswith("clinicsync") and m is not None]
defining = sorted(m.__name__ for m in ours for cls in ("ContactWrite", "DealWrite", "WriteOutcome") if hasattr(m, cls))
assert not defining, defining
"""
    _loaded_after(handler, statement)


def test_the_poller_refuses_an_invalid_schedule_input_as_powertools_event_parser_did() -> None:
    statement = """
import app
from pydantic import ValidationError
class Context:
    function_name = "mis-poller"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:eu-central-1:123456789012:function:mis-poller"
    aws_request_id = "req-1"
    def get_remaining_time_in_millis(self):
        return 60_000
for bad in ({"job": "nope"}, {"window_days": 0}, '{"max_pages": 1001}'):  # a JSON string is validated as JSON
    try:
        app.lambda_handler(bad, Context())
    except ValidationError:
        continue
    raise AssertionError(bad)
"""
    _loaded_after("mis_poller", statement)


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_handler_does_not_read_the_installed_distributions_for_pydantic_plugins(handler: str) -> None:
    statement = """
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
import app
assert app.__name__ == "app"
read = [path for path in opened if path.endswith("entry_points.txt")]
assert not read, read
"""
    # The template's PYDANTIC_DISABLE_PLUGINS (deployed_constants) is what turns the discovery off.
    assert "pydantic.main" in _loaded_after(handler, statement)


def test_the_stored_config_reads_back_without_a_yaml_parser() -> None:
    demo = ROOT / "sandbox" / "clinics" / "demo-dental.yaml"
    statement = f"""
from clinicsync.domain.config import parse_clinic_config, stored_config
stored = stored_config(open({str(demo)!r}, encoding="utf-8").read())  # what a deploy puts in SSM
for name in [m for m in sys.modules if m == "yaml" or m.startswith("yaml.")]:
    del sys.modules[name]  # the CLI's side read the YAML file; the function's side starts here
config = parse_clinic_config(stored)
assert config.clinic_id
"""
    loaded = _loaded_after("crm_webhook", statement)
    assert "yaml" not in loaded


def test_an_ascii_address_is_normalised_without_the_unicode_database() -> None:
    statement = """
from clinicsync.domain.emails import normalise_email
assert normalise_email(" Maria.Petrova@Example.ORG ") == "maria.petrova@example.org"
"""
    loaded = _loaded_after("crm_webhook", statement)
    assert {"unicodedata", "idna"} & loaded == set()


@pytest.mark.parametrize(
    ("crm", "wanted", "never"),
    [
        ("bitrix24", "clinicsync.adapters.bitrix24.gateway", "clinicsync.adapters.amocrm.client"),
        ("amocrm", "clinicsync.adapters.amocrm.gateway", "clinicsync.adapters.bitrix24.gateway"),
    ],
)
def test_building_a_clinics_crm_gateway_loads_that_crm_only(crm: str, wanted: str, never: str) -> None:
    config = ROOT / "sandbox" / "clinics" / "demo-dental.yaml"
    statement = f"""
from clinicsync.runtime import wiring
from clinicsync.domain.config import parse_clinic_config
config = parse_clinic_config(open({str(config)!r}, encoding="utf-8").read().replace("kind: bitrix24", "kind: {crm}"))
# No network: a webhook secret (Bitrix24) or a token pair (amoCRM) built in memory, nothing called.
secret = {{"webhook_url": "https://portal.invalid/rest/1/key/", "access_token": "a", "refresh_token": "r"}}
settings = wiring.Settings.model_construct(crm_secret_arn="arn", table_name="t")
parts = wiring.Container(settings, secrets=lambda arn: secret, store=object())  # the amoCRM phone index: unused
try:
    parts.crm_gateway(config)
except ValueError:  # amoCRM's field ids are not in the demo config; its gateway module is loaded by then
    pass
"""
    loaded = _loaded_after("stage_syncer", statement)
    assert wanted in loaded
    assert never not in loaded
    assert "clinicsync.adapters.medods.source" not in loaded  # the MIS is built by the poller, not here


# Where Powertools would not trace: disabled by its variable, or outside Lambda (tests, the local runtime).
TRACING_OFF: list[dict[str, str | None]] = [
    {"POWERTOOLS_TRACE_DISABLED": "true", "LAMBDA_TASK_ROOT": "/var/task"},
    {"POWERTOOLS_TRACE_DISABLED": None, "LAMBDA_TASK_ROOT": None},
]


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("env", TRACING_OFF, ids=["disabled_in_lambda", "outside_lambda"])
def test_a_handler_loads_no_xray_recorder_where_tracing_is_off(handler: str, env: dict[str, str | None]) -> None:
    loaded = _loaded_after(handler, "import app", env)
    assert "clinicsync.observability" in loaded
    assert {name for name in loaded if name.startswith("aws_xray_sdk.")} <= {"aws_xray_sdk.sdk_config"}


def test_a_handler_traces_with_xray_and_patches_botocore_where_tracing_is_on(tmp_path: Path) -> None:
    # As deployed (template: Tracing: Active): in Lambda, POWERTOOLS_TRACE_DISABLED unset.
    statement = """
import app
from clinicsync.observability import tracer
assert not tracer.disabled and type(tracer.provider).__module__.startswith("aws_xray_sdk"), tracer.provider
"""
    env: dict[str, str | None] = {"POWERTOOLS_TRACE_DISABLED": None, "LAMBDA_TASK_ROOT": str(tmp_path)}
    loaded = _loaded_after("stage_syncer", statement, env)
    assert {"aws_xray_sdk.core", "aws_xray_sdk.ext.botocore.patch"} <= loaded


def test_the_layer_ships_the_phone_parser_without_geocoder_and_carrier_data() -> None:
    # clinicsync.domain.phones only parses, validates and formats; phonenumbers' geocoder, carrier and time-zone
    # data were 23 MB of the 77 MB layer. phonenumberslite is the same parser, installed as `phonenumbers`.
    pinned = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "layers" / "shared" / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    assert "phonenumberslite" in pinned
    assert "phonenumbers" not in pinned


def test_the_layer_build_ships_bytecode_that_python_loads_without_checking_its_source(tmp_path: Path) -> None:
    # Lambda's /opt is read-only: without .pyc files in the layer every cold start compiles what it imports.
    # (tests/infra/test_template.py: the layer's BuildMethod is this Makefile.)
    stale = ROOT / "layers" / "shared" / "clinicsync" / "__pycache__" / "stale.cpython-313.pyc"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"not bytecode")  # a dev run's cache must not reach the layer
    try:
        done = subprocess.run(
            # The recipe sam build runs, with pip stubbed out (the test installs nothing from an index).
            ["make", "-s", "build-SharedLayer", f"ARTIFACTS_DIR={tmp_path}", "PIP=true", f"PYTHON={sys.executable}"],
            cwd=ROOT / "layers" / "shared",
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        stale.unlink()
    assert done.returncode == 0, done.stderr
    package = tmp_path / "python" / "clinicsync"
    sources = sorted(package.rglob("*.py"))
    assert package / "observability.py" in sources
    for source in sources:
        header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
        assert int.from_bytes(header[4:8], "little") == 0b01, source  # hash-based, source never checked
    assert not list(package.rglob("stale*"))
