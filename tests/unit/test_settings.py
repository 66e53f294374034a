"""Settings: defaults < YAML file < COORDINATOR_* environment < explicit arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator_agent.exceptions import ConfigError
from coordinator_agent.settings import (
    Liveness,
    SecuritySettings,
    Settings,
    config_path,
    load_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(clean_env: Path) -> None:
    assert config_path() is None
    settings = load_settings()
    assert settings.name == "coordinator"
    assert settings.log_level == "INFO"
    assert settings.limits.max_retries == 2
    assert settings.limits.max_message_bytes == 256 * 1024
    assert settings.security.message_ttl_s == 120
    assert settings.security.replay_window_s == 180
    assert settings.liveness.heartbeat_interval_s == 2.0
    assert settings.keyring_path == Path("var/keyring.json")
    assert settings.store_path == Path("var/coordinator.sqlite3")


def test_env_override_nested(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_LIMITS__MAX_RETRIES", "5")
    monkeypatch.setenv("COORDINATOR_NAME", "blue")
    monkeypatch.setenv("COORDINATOR_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.limits.max_retries == 5
    assert settings.limits.task_timeout_s == 60.0  # siblings keep their defaults
    assert settings.name == "blue"
    assert settings.log_level == "DEBUG"
    assert settings.store_path == Path("var/blue.sqlite3")


def test_explicit_arguments_win_over_env(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_NAME", "from-env")
    assert load_settings(name="from-cli").name == "from-cli"
    assert load_settings(name=None).name == "from-env"  # None means "not given"


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("COORDINATOR_LIMITS__MAX_RETRIES", "abc", "limits.max_retries"),
        ("COORDINATOR_LIMITS__MAX_RETRIES", "21", "limits.max_retries"),
        ("COORDINATOR_LIMITS__MAX_RETRIES", "-1", "limits.max_retries"),
        ("COORDINATOR_MONITORING_PORT", "70000", "monitoring_port"),
        ("COORDINATOR_LOG_LEVEL", "LOUD", "log_level"),
        ("COORDINATOR_LIVENESS__DEAD_AFTER", "2", "liveness.dead_after"),
    ],
)
def test_invalid_env_value_names_field(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_settings()
    assert f"{field}:" in str(info.value)


def test_malformed_json_section_in_env_is_config_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A whole section can be given as JSON; a typo in it must still be a readable ConfigError.
    monkeypatch.setenv("COORDINATOR_LIMITS", "{not json")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "limits" in str(info.value)


def test_section_as_json_in_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_LIMITS", '{"max_retries": 3}')
    assert load_settings().limits.max_retries == 3


def test_invalid_explicit_argument(clean_env: Path) -> None:
    with pytest.raises(ConfigError, match="prefetch"):
        load_settings(prefetch=0)


def test_yaml_file_via_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "elsewhere" / "c.yaml",
                  "name: green\nlimits:\n  max_retries: 7\n  task_timeout_s: 5\n"
                  "liveness:\n  heartbeat_interval_s: 1\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    assert config_path() == path
    settings = load_settings()
    assert settings.name == "green"
    assert settings.limits.max_retries == 7
    assert settings.limits.task_timeout_s == 5.0
    assert settings.limits.max_in_flight_per_agent == 32
    assert settings.liveness.heartbeat_interval_s == 1.0


def test_env_wins_over_yaml(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "c.yaml", "limits:\n  max_retries: 7\n  task_timeout_s: 5\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    monkeypatch.setenv("COORDINATOR_LIMITS__MAX_RETRIES", "4")
    settings = load_settings()
    assert settings.limits.max_retries == 4
    assert settings.limits.task_timeout_s == 5.0  # the rest of the YAML section still applies


def test_default_config_file_in_working_directory(clean_env: Path) -> None:
    _write(clean_env / "config" / "coordinator.yaml", "name: local\n")
    assert config_path() == Path("config/coordinator.yaml")
    assert load_settings().name == "local"


def test_repository_config_file_is_valid(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_config = REPO_ROOT / "config" / "coordinator.yaml"
    monkeypatch.setenv("COORDINATOR_CONFIG", str(repo_config))
    settings = load_settings()
    assert settings.name == "coordinator"
    assert settings.security.replay_window_s >= settings.security.message_ttl_s + 60
    assert settings.liveness.dead_after > settings.liveness.suspect_after


def test_invalid_yaml(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "bad.yaml", "limits: [\n  max_retries: 3\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_settings()
    assert str(path) in str(info.value)


def test_yaml_must_be_a_mapping(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "list.yaml", "- name\n- other\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    with pytest.raises(ConfigError, match="mapping"):
        load_settings()


def test_empty_yaml_means_defaults(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "empty.yaml", "# nothing here\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    assert load_settings().name == "coordinator"


def test_missing_explicit_config_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_CONFIG", str(clean_env / "nope.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_unknown_yaml_key_rejected(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "c.yaml", "limits:\n  max_retrys: 3\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"limits\.max_retrys"):
        load_settings()


def test_invalid_yaml_value_names_field(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(clean_env / "c.yaml", "security:\n  message_ttl_s: 1\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"security\.message_ttl_s"):
        load_settings()


def test_replay_window_must_cover_ttl_plus_skew(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_SECURITY__MESSAGE_TTL_S", "300")
    monkeypatch.setenv("COORDINATOR_SECURITY__REPLAY_WINDOW_S", "359")
    with pytest.raises(ConfigError, match=r"security\.replay_window_s") as info:
        load_settings()
    assert "360" in str(info.value)
    monkeypatch.setenv("COORDINATOR_SECURITY__REPLAY_WINDOW_S", "360")
    assert load_settings().security.replay_window_s == 360


def test_default_replay_window_too_short_for_longer_ttl(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_SECURITY__MESSAGE_TTL_S", "200")
    with pytest.raises(ConfigError, match="replay_window_s"):
        load_settings()


def test_suspect_after_beyond_default_dead_after_rejected(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dead_after keeps its default (5); suspecting after 6 intervals would make "suspect"
    # unreachable, so the cross-field rule must hold against defaults too.
    monkeypatch.setenv("COORDINATOR_LIVENESS__SUSPECT_AFTER", "6")
    with pytest.raises(ConfigError, match=r"liveness\.dead_after"):
        load_settings()


def test_section_models_directly() -> None:
    assert SecuritySettings(message_ttl_s=10, replay_window_s=70).replay_window_s == 70
    with pytest.raises(ValueError, match="message_ttl_s"):
        SecuritySettings(message_ttl_s=10, replay_window_s=69)
    with pytest.raises(ValueError, match="suspect_after"):
        Liveness(suspect_after=3, dead_after=3)


def test_settings_class_reads_env_too(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_PREFETCH", "7")
    assert Settings().prefetch == 7


# --- what a newcomer gets wrong --------------------------------------------------------------


def test_misspelt_top_level_variable_is_refused_like_a_nested_one(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_MONITORNG_PORT", "9999")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "unknown environment variable COORDINATOR_MONITORNG_PORT" in str(info.value)
    assert "did you mean COORDINATOR_MONITORING_PORT?" in str(info.value)
    monkeypatch.delenv("COORDINATOR_MONITORNG_PORT")
    monkeypatch.setenv("COORDINATOR_LIMTS__MAX_RETRIES", "3")  # a misspelt section
    with pytest.raises(ConfigError, match="unknown environment variable COORDINATOR_LIMTS__"):
        load_settings()
    monkeypatch.delenv("COORDINATOR_LIMTS__MAX_RETRIES")
    monkeypatch.setenv("COORDINATOR_LIMITS__NO_SUCH_LIMIT", "3")  # nested: refused as before
    with pytest.raises(ConfigError, match="no_such_limit"):
        load_settings()


def test_the_command_lines_and_the_test_suites_variables_are_not_settings_but_allowed(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("COORDINATOR_AGENT_ID", "COORDINATOR_JSON", "COORDINATOR_URL",
                 "COORDINATOR_TEST_BROKER_URL", "COORDINATOR_TEST_ANYTHING",
                 "COORDINATOR_DEMO_RATE", "COORDINATOR_NAME", "COORDINATOR_LIMITS"):
        monkeypatch.setenv(name, "{}" if name == "COORDINATOR_LIMITS" else "x")
    assert load_settings().name == "x"


def test_missing_config_named_by_the_flag_does_not_blame_the_variable(clean_env: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config_file="missing.yaml")
    assert str(info.value) == "config file missing.yaml (named by --config) does not exist"


def test_missing_config_named_by_the_variable_says_so(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_CONFIG", "gone.yaml")
    with pytest.raises(ConfigError, match=r"gone\.yaml \(named by COORDINATOR_CONFIG\)"):
        load_settings()


def test_the_flag_wins_over_the_variable_and_is_remembered(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flagged = _write(clean_env / "flag.yaml", "name: from-flag\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(_write(clean_env / "env.yaml", "name: env\n")))
    settings = load_settings(config_file=flagged)
    assert settings.name == "from-flag"
    assert settings.config_file == flagged
    assert load_settings().name == "env"  # the flag held for that one load only


def test_yaml_errors_name_the_file_and_the_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(clean_env / "bad.yaml", "name: x\nlimits: [\n  max_retries: 3\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "<unicode string>" not in str(info.value)
    assert f'in "{path}", line 2' in str(info.value)  # where the bad block starts


def test_which_config_file_was_read_is_said(clean_env: Path) -> None:
    from coordinator_agent.settings import describe_config_source

    none = load_settings()
    assert none.config_file is None
    text = describe_config_source(none)
    assert text.startswith("no config file (config/coordinator.yaml not found in ")
    assert str(clean_env) in text and "--config or COORDINATOR_CONFIG" in text
    _write(clean_env / "config" / "coordinator.yaml", "name: here\n")
    found = load_settings()
    assert found.config_file == Path("config/coordinator.yaml")
    assert describe_config_source(found) == (
        f"configuration from {clean_env / 'config' / 'coordinator.yaml'}")


def test_ha_is_off_by_default_and_works_with_or_without_consul(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().ha.enabled is False
    monkeypatch.setenv("COORDINATOR_HA__ENABLED", "true")
    broker_only = load_settings()  # no registry_url: the broker alone elects
    assert broker_only.ha.enabled and broker_only.registry_url is None
    monkeypatch.setenv("COORDINATOR_REGISTRY_URL", "http://127.0.0.1:8500")
    monkeypatch.setenv("COORDINATOR_HA__LEASE_TTL_S", "20")
    settings = load_settings()
    assert settings.ha.enabled and settings.ha.lease_ttl_s == 20


def test_ha_margin_must_leave_room_in_the_lease(clean_env: Path) -> None:
    with pytest.raises(ConfigError, match="lease_margin_s"):
        load_settings(ha={"lease_ttl_s": 1, "lease_margin_s": 0.5})
