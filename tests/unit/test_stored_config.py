"""A deploy stores the clinic config in SSM as JSON, so a function's cold start parses it with the stdlib's
json and loads no YAML parser (tests/infra/test_cold_start.py). The stored form must read back exactly as
the operator's file reads, whatever YAML makes of its unquoted values; a file it cannot say in JSON is refused."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.domain.config import parse_clinic_config, stored_config
from tests.helpers import DEMO_CONFIG

DEMO = DEMO_CONFIG.read_text(encoding="utf-8")
# Written unquoted below, so YAML resolves them: numbers, booleans, null, dates and plain strings alike.
SCALARS = st.one_of(
    st.from_regex(r"[A-Za-z0-9:_-]{1,12}", fullmatch=True),
    st.sampled_from(["0", "007", "1e3", "yes", "off", "null", "~", "2026-12-07", "C1:WON", "Ёлка", "0x1F"]),
)


@given(stage=SCALARS, category=SCALARS, branch=SCALARS, shards=st.integers(-1, 300), ttl=SCALARS)
def test_the_stored_config_reads_back_as_the_file_reads(
    stage: str, category: str, branch: str, shards: int, ttl: str
) -> None:
    text = (
        DEMO.replace("        no_show: UC_NOSHOW ", f"        no_show: {stage} ")
        .replace('category_id: "0"', f"category_id: {category}")
        .replace("  branches: null", f"  branches: [{branch}]")
        .replace("shards: 4", f"shards: {shards}")
        + f"consent:\n  link_ttl_days: {ttl}\n"
    )
    try:
        expected = parse_clinic_config(text)
    except (ValueError, yaml.YAMLError) as refused:
        with pytest.raises(type(refused)):  # refused as the file is, never stored
            stored_config(text)
        return
    stored = stored_config(text)
    assert stored.lstrip().startswith("{")
    assert parse_clinic_config(stored) == expected


def test_a_config_stored_before_as_yaml_still_reads() -> None:
    # A stack deployed before configs were stored as JSON keeps its YAML in SSM until its next deploy.
    assert parse_clinic_config(DEMO) == parse_clinic_config(stored_config(DEMO))
