"""EmulatorConfig.update validation and the CLI flags built from it."""

from __future__ import annotations

import argparse
import math

import pytest

from batchd.emulator import DEFAULT_PORT, EmulatorConfig
from batchd.emulator.cli import add_arguments, config_from_args, run
from batchd.emulator.config import KNOB_HELP


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
