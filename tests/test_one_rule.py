"""Each rule lives in one place: the deployed code spells a key format, a stage rule or a mechanism once."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.keys import (
    SUBJECT_PATTERN,
    contact_intent,
    deal_intent,
    email_subject,
    patient_subject,
    subject_patient,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOYED = [ROOT / "layers" / "shared", ROOT / "functions"]
KEYS_MODULE = ROOT / "layers" / "shared" / "clinicsync" / "keys.py"


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
