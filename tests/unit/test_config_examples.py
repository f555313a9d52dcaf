"""config/batchd.example.toml and config/batchd.env.example document every setting, nothing else, and at
its true default: loading either one gives exactly the defaults.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from batchd.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TOML = ROOT / "config" / "batchd.example.toml"
EXAMPLE_ENV = ROOT / "config" / "batchd.env.example"

FIELDS = dict(Settings.model_fields)
# Environment variables that are not fields of Settings but are read by batchd.settings all the same.
EXTRA_ENV = {"BATCHD_CONFIG"}

_TOML_KEY = re.compile(r"^(#\s*)?([a-z][a-z0-9_]*)\s*=")
_ENV_ASSIGNMENT = re.compile(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_name(field: str) -> str:
    return f"BATCHD_{field.upper()}"


def defaults() -> dict[str, Any]:
    return {name: field.default for name, field in FIELDS.items()}


def _comment_block(lines: list[str], index: int) -> str:
    """The run of comment lines right above lines[index] (not counting commented-out assignments)."""
    block: list[str] = []
    i = index - 1
    while i >= 0 and lines[i].startswith("#") and not _TOML_KEY.match(lines[i]):
        block.insert(0, lines[i].lstrip("#").strip())
        i -= 1
    return " ".join(block)


def _documented_default(comment: str, where: str) -> str:
    match = re.search(r"Default: (\S+)", comment)
    assert match, f"{where}: its comment does not say 'Default: ...'"
    token = match.group(1)
    return token[:-1] if token.endswith((".", ",")) else token


# --- TOML -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toml_lines() -> list[str]:
    return EXAMPLE_TOML.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def toml_keys(toml_lines: list[str]) -> dict[str, tuple[int, bool]]:
    """key -> (line index, active?) for every assignment, commented-out ones included."""
    keys: dict[str, tuple[int, bool]] = {}
    for index, line in enumerate(toml_lines):
        match = _TOML_KEY.match(line)
        if match:
            key = match.group(2)
            assert key not in keys, f"{key} appears twice in {EXAMPLE_TOML.name}"
            keys[key] = (index, match.group(1) is None)
    return keys


def test_toml_names_every_field_and_nothing_else(toml_keys: dict[str, tuple[int, bool]]) -> None:
    assert set(toml_keys) == set(FIELDS)
    assert set(tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8"))) <= set(FIELDS)


def test_toml_sets_every_field_that_has_a_value(toml_keys: dict[str, tuple[int, bool]]) -> None:
    # A default of None cannot be written in TOML: those are shown commented out; every other one is set.
    for name, (_, active) in toml_keys.items():
        assert active == (FIELDS[name].default is not None), name


def test_toml_comments_state_the_true_default(
    toml_lines: list[str], toml_keys: dict[str, tuple[int, bool]]
) -> None:
    for name, (index, _) in toml_keys.items():
        comment = _comment_block(toml_lines, index)
        assert len(comment) > 40, f"{name}: no real comment above it"
        documented = _documented_default(comment, name)
        default = FIELDS[name].default
        if default is None:
            assert documented == "unset", name
        else:
            assert tomllib.loads(f"v = {documented}")["v"] == default, name


def test_toml_example_loads_to_the_defaults() -> None:
    from_example = load_settings(config_path=EXAMPLE_TOML)
    assert from_example.model_dump() == load_settings().model_dump() == defaults()


def test_toml_example_values_have_the_declared_types() -> None:
    data = tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8"))
    for name, value in data.items():
        assert type(value) is type(FIELDS[name].default), name  # 30.0, not 30, for a float


def test_toml_mentions_only_real_environment_names() -> None:
    names = set(re.findall(r"\bBATCHD_[A-Z0-9_]+", EXAMPLE_TOML.read_text(encoding="utf-8")))
    assert names <= {env_name(field) for field in FIELDS} | EXTRA_ENV


# --- environment file -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_lines() -> list[str]:
    return EXAMPLE_ENV.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def env_assignments(env_lines: list[str]) -> dict[str, tuple[int, bool, str]]:
    """NAME -> (line index, active?, value)."""
    found: dict[str, tuple[int, bool, str]] = {}
    for index, line in enumerate(env_lines):
        match = _ENV_ASSIGNMENT.match(line)
        if match:
            name = match.group(2)
            assert name not in found, f"{name} appears twice in {EXAMPLE_ENV.name}"
            found[name] = (index, match.group(1) is None, match.group(3))
    return found


def test_env_names_every_field_and_nothing_else(env_assignments: dict[str, tuple[int, bool, str]]) -> None:
    assert set(env_assignments) == {env_name(field) for field in FIELDS} | EXTRA_ENV
    mentioned = set(re.findall(r"\bBATCHD_[A-Z0-9_]+", EXAMPLE_ENV.read_text(encoding="utf-8")))
    assert mentioned <= {env_name(field) for field in FIELDS} | EXTRA_ENV


def test_env_example_overrides_nothing(env_assignments: dict[str, tuple[int, bool, str]]) -> None:
    # An uncommented default would silently win over the TOML file.
    active = [name for name, (_, is_active, _) in env_assignments.items() if is_active]
    assert not active


def test_env_file_syntax_suits_systemd_and_compose(env_lines: list[str]) -> None:
    for line in env_lines:
        if not line or (line.startswith("#") and not _ENV_ASSIGNMENT.match(line)):
            continue
        match = _ENV_ASSIGNMENT.match(line)
        assert match, f"not a comment or an assignment: {line!r}"
        value = match.group(3)
        assert value == value.strip() and " #" not in value and not value.startswith(("'", '"')), line


def test_env_comments_state_the_true_default(
    env_lines: list[str], env_assignments: dict[str, tuple[int, bool, str]]
) -> None:
    fields_by_env = {env_name(field): field for field in FIELDS}
    for name, (index, _, value) in env_assignments.items():
        comment = _comment_block(env_lines, index)
        assert len(comment) > 20, f"{name}: no real comment above it"
        documented = _documented_default(comment, name)
        field = fields_by_env.get(name)
        if field is None or FIELDS[field].default is None:
            assert documented == "unset", name
        else:
            assert documented == value, f"{name}: comment says {documented}, example sets {value}"


def test_env_example_values_load_to_the_defaults(
    env_assignments: dict[str, tuple[int, bool, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for field, spec in FIELDS.items():
        if spec.default is None:
            continue  # example values (a key, the emulator's URL), not defaults
        _, _, value = env_assignments[env_name(field)]
        monkeypatch.setenv(env_name(field), value)
    assert load_settings().model_dump() == defaults()
