"""The environment is read as pydantic-settings read it (before it was dropped for the cold start): each field
from the variable of its name in any letter case, anything else ignored, a missing or empty one refused."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from clinicsync.settings import Settings

FIELDS = sorted(Settings.model_fields)
VALUES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


def _spelled(name: str, uppers: list[bool]) -> str:
    return "".join(c.upper() if up else c for c, up in zip(name, uppers + [False] * len(name), strict=False))


@st.composite
def environments(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str | None]]:
    """A process environment, and the value each field should read from it (None: missing)."""
    env: dict[str, str] = {}
    expected: dict[str, str | None] = {}
    for name in FIELDS:
        value = draw(st.none() | VALUES)
        expected[name] = value
        if value is not None:
            env[_spelled(name, draw(st.lists(st.booleans(), max_size=len(name))))] = value
    for other in draw(st.lists(st.from_regex(r"X_[A-Z]{1,6}", fullmatch=True), max_size=3)):
        env[other] = draw(VALUES)  # another variable of the function: ignored
    return env, expected


@given(environments())
def test_each_field_reads_its_variable_in_any_case_and_a_missing_or_empty_one_is_refused(
    case: tuple[dict[str, str], dict[str, str | None]],
) -> None:
    env, expected = case
    with mock.patch.dict(os.environ, env, clear=True):
        refused = {name for name, value in expected.items() if not value}
        if refused:
            with pytest.raises(ValidationError) as caught:
                Settings.from_env()
            assert {str(error["loc"][0]) for error in caught.value.errors()} == refused
        else:
            assert Settings.from_env().model_dump() == expected


def test_the_settings_are_frozen() -> None:
    with mock.patch.dict(os.environ, {name.upper(): "x" for name in FIELDS}, clear=True):
        settings = Settings.from_env()
    with pytest.raises(ValidationError):
        settings.clinic_id = "other"  # type: ignore[misc]
