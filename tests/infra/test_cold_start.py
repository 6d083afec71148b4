"""A handler's cold start loads only what its clinic uses: wiring imports each MIS and CRM adapter where
it builds it, so importing a handler loads none of them, and a Bitrix24 clinic never loads amoCRM's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = (
    "amocrm",
    "amocrm_gateway",
    "bitrix24",
    "bitrix24_gateway",
    "medods",
    "lis",
    "infoclinica",
    "renovatio",
    "vtiger",
)


def _loaded_after(handler: str, statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "functions" / handler), str(ROOT / "layers" / "shared")]),
        "AWS_DEFAULT_REGION": "eu-central-1",
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        cwd=ROOT / "functions" / handler,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("handler", ["mis_poller", "stage_syncer", "crm_webhook", "unsubscribe"])
def test_importing_a_handler_loads_no_mis_or_crm_adapter(handler: str) -> None:
    loaded = _loaded_after(handler, "import app")
    assert "clinicsync.wiring" in loaded  # the handler really reached the wiring
    assert {f"clinicsync.adapters.{name}" for name in ADAPTERS} & loaded == set()


@pytest.mark.parametrize(
    ("crm", "wanted", "never"),
    [
        ("bitrix24", "clinicsync.adapters.bitrix24_gateway", "clinicsync.adapters.amocrm"),
        ("amocrm", "clinicsync.adapters.amocrm_gateway", "clinicsync.adapters.bitrix24_gateway"),
    ],
)
def test_building_a_clinics_crm_gateway_loads_that_crm_only(crm: str, wanted: str, never: str) -> None:
    config = ROOT / "sandbox" / "clinics" / "demo-dental.yaml"
    statement = f"""
from clinicsync import wiring
from clinicsync.config import parse_clinic_config
config = parse_clinic_config(open({str(config)!r}, encoding="utf-8").read().replace("kind: bitrix24", "kind: {crm}"))
wiring._bitrix_client = wiring._amocrm_client = lambda *args: object()  # no secret, no network
wiring.secret = lambda arn: {{}}
wiring.settings = lambda: wiring.Settings.model_construct(crm_secret_arn="arn")
try:
    wiring.crm_gateway(config)
except ValueError:  # amoCRM's field ids are not in the demo config; its gateway module is loaded by then
    pass
"""
    loaded = _loaded_after("stage_syncer", statement)
    assert wanted in loaded
    assert never not in loaded
    assert "clinicsync.adapters.medods" not in loaded  # the MIS is built by the poller, not here
