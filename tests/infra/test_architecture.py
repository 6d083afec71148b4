"""The shape the project's guide asks for, checked on the source itself.

Handlers stay thin: parse, call one use case, shape the reply. Their size is the symptom that shows first
when that slips, so every ``functions/*/app.py`` is held to 40 code lines (docstrings and comments are
documentation and do not count).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = sorted(ROOT.glob("functions/*/app.py"))
MAX_HANDLER_LINES = 40


def code_lines(source: str) -> int:
    """Lines holding a token other than a comment, a docstring or layout (blank lines, indents)."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in layout:
            lines.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docstrings)
    return len(lines)


def test_code_lines_skip_comments_docstrings_and_blank_lines() -> None:
    source = "\n".join(
        [
            '"""Module.',
            "",
            'More."""',
            "# a comment",
            "import os  # trailing",
            "",
            "def f() -> None:",
            '    """Doc."""',
            "    x = (",
            "        1,",
            "    )",
        ]
    )
    assert code_lines(source) == 5  # import, def, and the three lines of the tuple


def test_there_are_handlers_to_check() -> None:
    assert {p.parent.name for p in HANDLERS} >= {"crm_webhook", "mis_poller", "stage_syncer", "unsubscribe"}


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda p: p.parent.name)
def test_handlers_have_at_most_40_code_lines(handler: Path) -> None:
    lines = code_lines(handler.read_text(encoding="utf-8"))
    assert lines <= MAX_HANDLER_LINES, f"{handler.parent.name}: {lines} code lines; move the work behind a use case"


SOURCES = [*HANDLERS, *sorted((ROOT / "layers" / "shared" / "clinicsync").rglob("*.py"))]
# The amoCRM client counts its breaker opening where it opens (alarmed in the template).
ADAPTER_METRICS = {"layers/shared/clinicsync/adapters/amocrm/client.py"}


def test_metrics_and_health_counts_are_written_by_observe_only() -> None:
    """One place knows which figure a report becomes, so a handler cannot forget the health item."""
    writers = {
        str(path.relative_to(ROOT))
        for path in SOURCES
        if re.search(r"add_metric\(|\.health\(\)\.record_", path.read_text(encoding="utf-8"))
    }
    assert writers == {"layers/shared/clinicsync/runtime/observe.py", *ADAPTER_METRICS}


MAX_MODULE_LINES = 400
DEPLOYED = sorted((ROOT / "layers" / "shared" / "clinicsync").rglob("*.py"))


def test_there_are_deployed_modules_to_check() -> None:
    assert len(DEPLOYED) > 50


@pytest.mark.parametrize("module", DEPLOYED, ids=lambda p: str(p.relative_to(ROOT / "layers" / "shared")))
def test_no_deployed_module_exceeds_400_lines(module: Path) -> None:
    """A module past 400 lines has grown a second job: split it along the seam it already has."""
    lines = len(module.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module.name}: {lines} lines"
