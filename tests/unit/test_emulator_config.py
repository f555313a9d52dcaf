"""EmulatorConfig.update validation and the CLI flags built from it."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from batchd.emulator import DEFAULT_PORT, EmulatorConfig
from batchd.emulator.cli import add_arguments, config_from_args, run
from batchd.emulator.config import KNOB_HELP, TIERS


def test_defaults() -> None:
    config = EmulatorConfig()
    assert config.processing_seconds == 0.5
    assert config.expiry_seconds == 86400.0
    assert config.seed is None
    assert all(getattr(config, name) == 0.0 for name in KNOB_HELP if name.endswith("_rate"))


def test_update_sets_several_knobs() -> None:
    config = EmulatorConfig()
    config.update({"errored_rate": 0.25, "processing_seconds": 3, "seed": 42})
    assert config.errored_rate == 0.25
    assert config.processing_seconds == 3.0 and isinstance(config.processing_seconds, float)
    assert config.seed == 42
    config.update({"seed": None})
    assert config.seed is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"nope": 1}, "nope"),
        ({"errored_rate": 1.5}, "errored_rate"),
        ({"expired_rate": -0.1}, "expired_rate"),
        ({"processing_seconds": -1}, "processing_seconds"),
        ({"cancel_seconds": math.inf}, "cancel_seconds"),
        ({"retry_after_seconds": math.nan}, "retry_after_seconds"),
        ({"rate_limit_rate": "0.5"}, "rate_limit_rate"),
        ({"results_cut_rate": True}, "results_cut_rate"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_update_rejects_bad_knobs_naming_them(data: dict[str, object], key: str) -> None:
    config = EmulatorConfig()
    with pytest.raises(ValueError, match=key):
        config.update(data)


def test_update_is_all_or_nothing() -> None:
    config = EmulatorConfig()
    with pytest.raises(ValueError):
        config.update({"errored_rate": 0.5, "expired_rate": 7})
    assert config.errored_rate == 0.0


def test_every_knob_has_help_and_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for name, help_text in KNOB_HELP.items():
        assert help_text
        assert "--" + name.replace("_", "-") in text


def test_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--processing-seconds", "0.2", "--errored-rate", "0.1", "--seed", "9"])
    assert args.port == DEFAULT_PORT and args.host == "127.0.0.1"
    config = config_from_args(args)
    assert config.processing_seconds == 0.2 and config.errored_rate == 0.1 and config.seed == 9
    assert config.expiry_seconds == EmulatorConfig().expiry_seconds

    with pytest.raises(ValueError, match="expired_rate"):
        config_from_args(parser.parse_args(["--expired-rate", "2"]))


def test_run_refuses_bad_flags_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--results-cut-rate", "1.5"])) == 2
    assert "results_cut_rate" in capsys.readouterr().err


def test_constructor_values_are_checked_and_normalised() -> None:
    config = EmulatorConfig(retry_after_seconds=1, processing_seconds=2)
    assert isinstance(config.retry_after_seconds, float) and config.processing_seconds == 2.0
    with pytest.raises(ValueError, match="errored_rate"):
        EmulatorConfig(errored_rate=3)


# --- limits, keys, caching knobs -------------------------------------------------------------------------


def test_new_knob_defaults() -> None:
    config = EmulatorConfig()
    assert (config.rpm_limit, config.queue_limit) == (0, 0)  # unlimited
    assert config.valid_api_keys == []
    assert config.create_delay_seconds == 0.0
    assert config.cache_visibility_seconds == 0.1 and config.cache_min_tokens == 1024


@pytest.mark.parametrize(
    ("tier", "rpm", "queue"),
    [(1, 50, 100_000), (2, 1_000, 200_000), (3, 2_000, 300_000), (4, 4_000, 500_000)],
)
def test_tier_sets_both_limits(tier: int, rpm: int, queue: int) -> None:
    config = EmulatorConfig()
    config.update({"tier": tier})
    assert (config.rpm_limit, config.queue_limit) == (rpm, queue)
    assert TIERS[tier] == {"rpm_limit": rpm, "queue_limit": queue}


def test_explicit_limits_given_with_a_tier_win() -> None:
    config = EmulatorConfig()
    config.update({"rpm_limit": 7, "tier": 2})
    assert (config.rpm_limit, config.queue_limit) == (7, 200_000)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"tier": 5}, "tier"),
        ({"tier": "1"}, "tier"),
        ({"tier": True}, "tier"),
        ({"rpm_limit": 1.5}, "rpm_limit"),
        ({"queue_limit": -1}, "queue_limit"),
        ({"cache_min_tokens": True}, "cache_min_tokens"),
        ({"rpm_limit": math.inf}, "rpm_limit"),
        ({"valid_api_keys": "abc"}, "valid_api_keys"),
        ({"valid_api_keys": ["ok", ""]}, "valid_api_keys"),
        ({"valid_api_keys": [1]}, "valid_api_keys"),
        ({"create_delay_seconds": -1}, "create_delay_seconds"),
        ({"cache_visibility_seconds": math.nan}, "cache_visibility_seconds"),
    ],
)
def test_new_knobs_are_checked(data: dict[str, object], key: str) -> None:
    config = EmulatorConfig()
    with pytest.raises(ValueError, match=key):
        config.update(data)
    assert config.as_dict() == EmulatorConfig().as_dict()


def test_whole_numbers_stay_ints_and_lists_are_copies() -> None:
    keys = ["a", "b"]
    config = EmulatorConfig(rpm_limit=3.0, valid_api_keys=keys)
    assert config.rpm_limit == 3 and isinstance(config.rpm_limit, int)
    keys.append("c")
    shown = config.as_dict()["valid_api_keys"]
    assert shown == ["a", "b"]
    assert isinstance(shown, list)
    shown.append("d")
    assert config.valid_api_keys == ["a", "b"]


def test_flags_for_the_tier_limits_and_keys() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--tier", "1", "--queue-limit", "10", "--valid-api-keys", "k1, k2", "--cache-min-tokens", "5"]
    )
    config = config_from_args(args)
    assert (config.rpm_limit, config.queue_limit) == (50, 10)
    assert config.valid_api_keys == ["k1", "k2"] and config.cache_min_tokens == 5
    assert "--tier" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--tier", "9"])


def test_every_knob_is_documented_in_the_docs_and_the_readme() -> None:
    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "emulator.md").read_text()
    readme = (root / "README.md").read_text()
    for name in [*KNOB_HELP, "tier"]:
        assert f"| `{name}` |" in docs, name
        assert f"`{name}`" in readme, name
