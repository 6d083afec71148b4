"""Each rule lives in one place: the deployed code spells a key format, a stage rule or a mechanism once."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.domain.crm_ports import CrmGateway
from clinicsync.domain.keys import (
    SUBJECT_PATTERN,
    contact_intent,
    deal_intent,
    email_subject,
    patient_subject,
    subject_patient,
)
from clinicsync_cli.planning import verified
from tests.helpers import demo_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOYED = [ROOT / "layers" / "shared", ROOT / "functions"]
KEYS_MODULE = ROOT / "layers" / "shared" / "clinicsync" / "domain" / "keys.py"


def _deployed_modules() -> Iterator[Path]:
    for root in DEPLOYED:
        yield from sorted(root.rglob("*.py"))


def _string_literals(path: Path) -> Iterator[str]:
    """Every string the code spells (f-string parts included), docstrings left out: they may explain a format."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


def _modules_spelling(pattern: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for path in _deployed_modules():
        for text in _string_literals(path):
            for match in re.finditer(pattern, text):
                found[match.group(1)].add(str(path.relative_to(ROOT)))
    return found


def test_subject_and_intent_key_prefixes_are_spelled_only_in_the_keys_module() -> None:
    found = _modules_spelling(r"(?<![\w.])(pat:|email:)")
    found.update(_modules_spelling(r"^([PA]#)"))
    keys = str(KEYS_MODULE.relative_to(ROOT))
    assert set(found) == {"pat:", "email:", "P#", "A#"}
    assert {prefix: modules - {keys} for prefix, modules in found.items()} == {p: set() for p in found}


def test_each_table_key_prefix_is_spelled_in_one_module() -> None:
    found = _modules_spelling(r"(?<![\w.#])([A-Z][A-Z_]*#)")
    assert "PAT#" in found and "CONSENT#" in found  # the scan sees the store's keys
    assert {prefix: modules for prefix, modules in found.items() if len(modules) > 1} == {}


_ids = st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=64)


@given(_ids)
def test_a_patient_subject_names_its_patient_and_passes_the_job_schema(patient_id: str) -> None:
    subject = patient_subject(patient_id)
    assert subject_patient(subject) == patient_id
    assert re.fullmatch(SUBJECT_PATTERN, subject)


@given(st.text(alphabet="0123456789abcdef", min_size=40, max_size=40))
def test_an_email_subject_names_no_patient_and_passes_the_job_schema(email_key: str) -> None:
    subject = email_subject(email_key)
    assert subject_patient(subject) is None
    assert re.fullmatch(SUBJECT_PATTERN, subject)


@given(_ids)
def test_contact_and_deal_intents_never_collide(record_id: str) -> None:
    assert contact_intent(record_id) != deal_intent(record_id)


def test_closed_stages_are_merged_only_by_the_config() -> None:
    """ "Won/lost stages are closed" is ``ClinicConfig.with_crm_closed_stages``; start-up and the dry run call it."""
    rewriters = set()
    for path in _deployed_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "model_copy":
                updates = [k for kw in node.keywords if isinstance(kw.value, ast.Dict) for k in kw.value.keys]
                if any(isinstance(k, ast.Constant) and k.value == "closed_stages" for k in updates):
                    rewriters.add(str(path.relative_to(ROOT)))
    assert rewriters == {"layers/shared/clinicsync/domain/config.py"}


class _StagesCrm:
    def __init__(self, closed: frozenset[str]) -> None:
        self.closed = closed

    def verify_pipelines(self, pipelines: object) -> frozenset[str]:
        return self.closed


@given(st.frozensets(st.sampled_from(["C1:WON", "C1:LOSE", "C3:WON", "C3:APOLOGY", "NEW"]), max_size=4))
def test_the_crms_won_and_lost_stages_count_as_closed_in_every_pipeline(crm_closed: frozenset[str]) -> None:
    config = demo_config()
    merged = config.with_crm_closed_stages(crm_closed)
    assert verified(config, cast(CrmGateway, _StagesCrm(crm_closed))) == merged
    assert merged.crm.pipelines.keys() == config.crm.pipelines.keys()
    for name, before in config.crm.pipelines.items():
        after = merged.crm.pipelines[name]
        assert after.closed_stages == before.closed_stages | crm_closed
        assert after.model_copy(update={"closed_stages": before.closed_stages}) == before


def _definitions(names: set[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for path in _deployed_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names:
                found[node.name].add(str(path.relative_to(ROOT)))
    return found


def test_the_oauth_lease_and_token_store_are_defined_once_for_every_vendor() -> None:
    """The vendor modules only parametrise them (``BITRIX24``, ``AMOCRM``): no wrapper, no subclass."""
    oauth_module = "layers/shared/clinicsync/adapters/http/oauth.py"
    assert _definitions({"lease_lock", "SecretsManagerTokenStore"}) == {
        "lease_lock": {oauth_module},
        "SecretsManagerTokenStore": {oauth_module},
    }
    writers = {
        str(path.relative_to(ROOT))
        for path in _deployed_modules()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "put_secret_value"
    }
    assert writers == {oauth_module}


def test_the_pacer_lives_in_the_shared_http_mechanics_not_in_a_vendor_client() -> None:
    """Bitrix24, amoCRM and vTiger are paced by one ``Pacer``; nobody reaches it through a vendor module."""
    assert _definitions({"Pacer"}) == {"Pacer": {"layers/shared/clinicsync/adapters/http/pacing.py"}}
    importers = {
        f"{path.relative_to(ROOT)}: from {node.module}"
        for root in [*DEPLOYED, ROOT / "sandbox", ROOT / "cli", ROOT / "connector", ROOT / "tests"]
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and any(alias.name == "Pacer" for alias in node.names)
    }
    assert importers and all(line.endswith("from clinicsync.adapters.http.pacing") for line in importers), importers
