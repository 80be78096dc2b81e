"""The supply-chain guard of the LiteLLM benchmark target: it must refuse releases
reported as compromised, and a virtualenv whose site-packages runs unknown code at
interpreter start-up, before LiteLLM is ever started."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.litellm_proxy import (
    LITELLM_VERSION,
    audit_startup_hooks,
    litellm_config,
    refuse_compromised,
)
from bench.targets import BenchFailed, Target


@pytest.mark.parametrize("version", ["1.82.7", "1.82.8", "1.107.0", "1.107.12"])
def test_compromised_releases_are_refused(version: str) -> None:
    with pytest.raises(BenchFailed, match="compromised"):
        refuse_compromised(version)


@pytest.mark.parametrize("version", [LITELLM_VERSION, "1.82.6", "1.108.0", "1.17.0"])
def test_other_releases_pass(version: str) -> None:
    refuse_compromised(version)


def test_the_pinned_release_is_not_compromised() -> None:
    refuse_compromised(LITELLM_VERSION)


def test_a_clean_site_packages_passes(tmp_path: Path) -> None:
    (tmp_path / "distutils-precedence.pth").write_text("import os; var = 'x'\n")
    (tmp_path / "_virtualenv.pth").write_text("import _virtualenv\n")
    (tmp_path / "editable.pth").write_text("/some/source/dir\n")
    audit_startup_hooks(tmp_path)


def test_litellm_init_pth_is_refused_whatever_it_holds(tmp_path: Path) -> None:
    (tmp_path / "litellm_init.pth").write_text("/harmless/looking/path\n")
    with pytest.raises(BenchFailed, match=r"litellm_init\.pth"):
        audit_startup_hooks(tmp_path)


@pytest.mark.parametrize("line", ["import base64; exec('')", "  import\tos", "import.x"])
def test_an_unknown_pth_with_an_import_line_is_refused(tmp_path: Path, line: str) -> None:
    (tmp_path / "zz_other.pth").write_text(f"/a/path\n{line}\n")
    with pytest.raises(BenchFailed, match="start-up"):
        audit_startup_hooks(tmp_path)


def test_the_config_has_auth_and_both_limiters_on() -> None:
    stub = Target("direct", "stub", "http://127.0.0.1:1/v1", "m", "k")
    config = litellm_config(stub)

    general = config["general_settings"]
    assert isinstance(general, dict)
    assert general["master_key"].startswith("sk-")
    assert general["global_max_parallel_requests"] > 0
    router = config["router_settings"]
    assert isinstance(router, dict)
    assert router["optional_pre_call_checks"] == ["enforce_model_rate_limits"]
    (deployment,) = config["model_list"]  # type: ignore[misc]
    assert deployment["litellm_params"]["api_base"] == stub.base_url
    assert deployment["litellm_params"]["rpm"] > 0
