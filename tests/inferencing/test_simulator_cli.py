"""``python -m inferencing.simulator``: flags into configuration (the parser, not a process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferencing.simulator import FaultProfile, Latency, ScriptedReply, SimulatorConfig
from inferencing.simulator.__main__ import build_config


def test_without_flags_the_defaults_apply() -> None:
    config = build_config([])
    assert config == SimulatorConfig()
    assert (config.default_profile, config.seed, config.record_requests) == (None, None, True)


def test_fault_flags_build_the_default_profile() -> None:
    config = build_config(
        [
            "--seed",
            "7",
            "--error-rate",
            "0.1",
            "--fault-kinds",
            "rate_limited=1,unavailable=2,timeout",
            "--retry-after",
            "2.5",
            "--stream-cut-rate",
            "0.05",
            "--latency-p50",
            "0.4",
            "--latency-p99",
            "2",
            "--context-window",
            "8192",
            "--no-record",
        ]
    )
    assert config.seed == 7
    assert config.record_requests is False
    assert config.default_profile == FaultProfile(
        error_rate=0.1,
        kinds={"rate_limited": 1, "unavailable": 2, "timeout": 1},
        retry_after_s=2.5,
        stream_cut_rate=0.05,
        first_token_latency=Latency(kind="lognormal", p50_s=0.4, p99_s=2.0),
        context_window=8192,
    )


def test_a_single_fault_flag_leaves_the_rest_of_the_profile_at_its_defaults() -> None:
    config = build_config(["--context-window", "100", "--latency", "0.2"])
    assert config.default_profile == FaultProfile(context_window=100)
    assert config.first_token_latency_s == 0.2


def test_profiles_and_script_files_are_read(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(
        json.dumps(
            {
                "gpt-4o": {"error_rate": 0.2, "kinds": {"rate_limited": 1}, "retry_after_s": 2},
                "slow": {"first_token_latency": {"kind": "uniform", "min_s": 1, "max_s": 2}},
            }
        )
    )
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"replies": [{"content": "Hello"}]}))

    config = build_config(["--profiles", str(profiles), "--script", str(script)])
    assert config.profiles == {
        "gpt-4o": FaultProfile(error_rate=0.2, kinds={"rate_limited": 1}, retry_after_s=2),
        "slow": FaultProfile(first_token_latency=Latency(kind="uniform", min_s=1, max_s=2)),
    }
    assert config.default_profile is None
    assert config.script == [ScriptedReply(content="Hello")]


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--error-rate", "1.5"], "not between 0 and 1"),
        (["--stream-cut-rate", "nan"], "not between 0 and 1"),
        (["--fault-kinds", "stream_cut=1"], "unknown fault kind 'stream_cut'"),
        (["--fault-kinds", "unavailable=lots"], "'lots' is not a weight"),
        (["--fault-kinds", "unavailable=0"], "at least one positive weight"),
        (["--latency-p50", "0.4"], "go together"),
        (["--latency-p50", "2", "--latency-p99", "1"], "p99_s >= p50_s"),
        (["--context-window", "0"], "context_window"),
        (["--profiles", "/nonexistent/profiles.json"], "No such file"),
    ],
)
def test_invalid_flags_are_usage_errors(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_config(argv)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_a_profiles_file_with_an_invalid_profile_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"gpt-4o": {"error_rate": 2}}))
    with pytest.raises(SystemExit):
        build_config(["--profiles", str(profiles)])
    assert "gpt-4o.error_rate" in capsys.readouterr().err
