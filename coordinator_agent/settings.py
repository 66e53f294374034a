"""One typed settings object: defaults < ``config/coordinator.yaml`` < ``COORDINATOR_*`` env vars.

Nested fields use a double underscore in the environment, for example
``COORDINATOR_LIMITS__MAX_RETRIES=5``. A ``COORDINATOR_*`` variable that is neither a setting
nor one of the command line's own (``OTHER_VARIABLES``) is refused, top-level or nested alike:
a misspelt name must not be ignored silently.
"""

from __future__ import annotations

import contextvars
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from coordinator_agent.exceptions import ConfigError

DEFAULT_CONFIG_PATH = Path("config/coordinator.yaml")
CONFIG_ENV = "COORDINATOR_CONFIG"
ENV_PREFIX = "COORDINATOR_"
#: COORDINATOR_* variables that are not settings: the command line's own options (each named in
#: its --help; tests/unit/test_cli_newcomer.py keeps the two in step) and the config file's name.
OTHER_VARIABLES = frozenset({
    CONFIG_ENV, "COORDINATOR_URL", "COORDINATOR_JSON", "COORDINATOR_PRINCIPAL",
    "COORDINATOR_AGENT_ID", "COORDINATOR_AGENT_KIND", "COORDINATOR_AGENT_CAPABILITIES",
    "COORDINATOR_AGENT_CONCURRENCY", "COORDINATOR_AGENT_BATCH_LIMIT", "COORDINATOR_TASK_FILE",
    "COORDINATOR_TASK_KIND", "COORDINATOR_TASK_CAPABILITIES", "COORDINATOR_TASK_LABELS",
    "COORDINATOR_TASK_SUBTASKS",
    "COORDINATOR_TASK_STEPS", "COORDINATOR_TASK_SPEC", "COORDINATOR_TASK_INPUT",
    "COORDINATOR_TASK_ID", "COORDINATOR_TASK_TIMEOUT_S", "COORDINATOR_WAIT",
    "COORDINATOR_WAIT_TIMEOUT_S",
    "COORDINATOR_WATCH_INTERVAL", "COORDINATOR_WATCH_TASKS", "COORDINATOR_WATCH_ONCE",
    "COORDINATOR_CHECK_CONFIG_ONLY",
    "COORDINATOR_KEYS_PRINCIPAL", "COORDINATOR_KEYS_ROLE", "COORDINATOR_KEYS_OUT",
    "COORDINATOR_DEMO_AGENTS", "COORDINATOR_DEMO_TASKS", "COORDINATOR_DEMO_FOREVER",
    "COORDINATOR_DEMO_RATE",
    "COORDINATOR_ROUTE_KIND", "COORDINATOR_ROUTE_CAPABILITIES", "COORDINATOR_ROUTE_LABELS",
    "COORDINATOR_ROUTE_LOCAL",
    "COORDINATOR_DRAIN_REASON",
    "COORDINATOR_CONFORMANCE_ID", "COORDINATOR_CONFORMANCE_KIND", "COORDINATOR_CONFORMANCE_TASKS",
    "COORDINATOR_CONFORMANCE_WAIT",
    "COORDINATOR_REPLAY_CONFIG", "COORDINATOR_REPLAY_STORE", "COORDINATOR_REPLAY_SEED",
    "COORDINATOR_TASK_PRIORITY", "COORDINATOR_CANCEL_REASON", "COORDINATOR_REDIRECT_KIND",
    "COORDINATOR_RETRY_KIND", "COORDINATOR_RETRY_AGENT", "COORDINATOR_RESOLVE_OUTPUT",
    "COORDINATOR_FAIL_REASON",
})
#: The test suite's own variables (COORDINATOR_TEST_BROKER_URL, ...): never settings.
TEST_VARIABLE_PREFIX = "COORDINATOR_TEST_"
#: cryptography's Fernet accepts tokens stamped up to this far in the future.
FERNET_MAX_CLOCK_SKEW_S = 60


class Limits(BaseModel):
    model_config = {"extra": "forbid"}

    max_message_bytes: int = Field(256 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_output_bytes: int = Field(64 * 1024, ge=256)
    max_in_flight_per_agent: int = Field(32, ge=1)
    #: Open tasks held at once (~5 KiB of coordinator memory each: docs/RELIABILITY.md).
    max_pending_tasks: int = Field(20_000, ge=1)
    task_timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(2, ge=0, le=20)
    publish_timeout_s: float = Field(10.0, gt=0)
    drain_timeout_s: float = Field(15.0, gt=0)


class SecuritySettings(BaseModel):
    model_config = {"extra": "forbid"}

    #: Telemetry (heartbeats, metrics, progress) older than this is rejected as expired.
    message_ttl_s: int = Field(120, ge=5)
    #: Messages that carry work may wait in a durable queue while their receiver is down.
    durable_message_ttl_s: int = Field(86_400, ge=60)
    #: Message ids are remembered this long; must cover the telemetry TTL plus Fernet's 60 s
    #: clock-skew bound. Older work messages are harmless when replayed: handlers are idempotent.
    replay_window_s: int = Field(180, ge=5, validate_default=True)

    @field_validator("replay_window_s")
    @classmethod
    def _window_covers_ttl(cls, v: int, info: Any) -> int:
        needed = info.data.get("message_ttl_s", 0) + FERNET_MAX_CLOCK_SKEW_S
        if v < needed:
            raise ValueError(
                f"must be at least message_ttl_s + {FERNET_MAX_CLOCK_SKEW_S} ({needed})"
            )
        return v


class Liveness(BaseModel):
    model_config = {"extra": "forbid"}

    heartbeat_interval_s: float = Field(2.0, gt=0)
    #: Missed-heartbeat multiples after which an agent is suspect (no new work) and then dead.
    suspect_after: float = Field(2.5, gt=1)
    dead_after: float = Field(5.0, gt=1, validate_default=True)
    #: On-time heartbeats a suspect agent must send before it gets work again (no flapping).
    recover_after: int = Field(2, ge=1, le=100)
    #: Heartbeat multiples the coordinator may lag behind its agents' reports (their age when
    #: handled, or its own loop's delay) before it pauses silence verdicts and sheds repeat
    #: heartbeats (coordinator/backlog.py): its backlog is not the agents' silence.
    behind_after: float = Field(0.5, gt=0)

    @field_validator("dead_after")
    @classmethod
    def _dead_after_suspect(cls, v: float, info: Any) -> float:
        if v <= info.data.get("suspect_after", 0):
            raise ValueError("must be greater than suspect_after")
        return v


class RegistrySettings(BaseModel):
    """Consul: the coarse, authoritative catalogue of agents. Heartbeats stay on AMQP."""

    model_config = {"extra": "forbid"}

    #: Consul service name agents register under (their id is the agent id). Several
    #: coordinators may share it: each one only watches the agents that name it in their meta.
    agent_service: str = Field("coordinator-agent-worker", pattern=r"^[A-Za-z0-9-]{1,64}$")
    coordinator_service: str = Field("coordinator-agent", pattern=r"^[A-Za-z0-9-]{1,64}$")
    #: An agent's TTL check turns critical this long after its last refresh. Agents refresh
    #: every ttl_s / 3 (with jitter). A refresh costs a Consul agent ~10 us of CPU per service
    #: it holds (measured, bench/discovery.py), so 1,000 agents on one Consul agent at 120 s
    #: cost it about a quarter of a core; at 30 s, a whole core. Liveness comes from AMQP.
    ttl_s: float = Field(120.0, ge=3)
    #: Consul removes a service critical this long (its minimum is one minute).
    deregister_critical_after_s: int = Field(300, ge=60)
    #: Longest wait of one blocking query; Consul adds up to 1/16 of it as jitter.
    watch_wait_s: float = Field(30.0, ge=1, le=600)
    #: Timeout of every other call, so a hung Consul never stalls an agent or the coordinator.
    call_timeout_s: float = Field(5.0, gt=0)
    #: URL Consul's HTTP check uses to reach this coordinator's /healthz (default: the
    #: monitoring address, with 0.0.0.0 read as 127.0.0.1).
    advertise_url: str | None = None
    check_interval_s: float = Field(10.0, ge=1)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_verify: bool = True


class HASettings(BaseModel):
    """High availability: coordinators of one name campaign for a lease; one leads (docs/HA.md)."""

    model_config = {"extra": "forbid"}

    #: Off: this process leads alone, as before. On: it campaigns for the lease, on Consul
    #: with ``registry_url``, else on the broker alone.
    enabled: bool = False
    #: The leadership lease. A silent leader loses it within this long; Consul's
    #: ``session_ttl_min`` must be at most half of it (the dev agent's is 1 s).
    lease_ttl_s: float = Field(2.0, ge=1, le=86_400)
    #: The leader stops acting this long before its lease could be taken.
    lease_margin_s: float = Field(0.3, gt=0, validate_default=True)

    @field_validator("lease_margin_s")
    @classmethod
    def _margin_within_ttl(cls, v: float, info: Any) -> float:
        if 2 * v >= info.data.get("lease_ttl_s", 0):
            raise ValueError("must be less than half of lease_ttl_s")
        return v

    # Retention and snapshots (docs/HA.md, "Snapshots and retention"). A snapshot is written
    # every snapshot_every_events events, every quarter of log_max_bytes of log, and every
    # snapshot_interval_s while the log grows; so one always lies inside the log's retention.
    snapshot_every_events: int = Field(100_000, ge=1_000)
    snapshot_interval_s: float = Field(600.0, ge=10)
    #: The log stream's x-max-age (RabbitMQ form: 7D, 12h, 30m, 1Y...): at least 4 intervals.
    log_max_age: str = "7D"
    log_max_bytes: int = Field(20 * 1024**3, ge=64 * 1024**2)
    log_segment_bytes: int = Field(100 * 1024**2, ge=1024**2)
    #: The snapshots stream keeps this many bytes (no age limit): at least two snapshots.
    snapshots_max_bytes: int = Field(2 * 1024**3, ge=64 * 1024**2)

    @model_validator(mode="after")
    def _retention_covers_snapshots(self) -> HASettings:
        age = max_age_seconds(self.log_max_age)
        if age < 4 * self.snapshot_interval_s:
            raise ValueError(f"ha.log_max_age ({self.log_max_age}) must be at least 4 x "
                             f"ha.snapshot_interval_s ({self.snapshot_interval_s:g} s), so the "
                             "log keeps everything after the newest snapshot")
        if self.log_max_bytes < 4 * self.log_segment_bytes:
            raise ValueError("ha.log_max_bytes must be at least 4 x ha.log_segment_bytes: "
                             "retention drops whole segments")
        return self


_AGE_UNITS = {"Y": 365 * 86_400, "M": 30 * 86_400, "D": 86_400, "h": 3600, "m": 60, "s": 1}


def max_age_seconds(value: str) -> float:
    """A RabbitMQ stream ``x-max-age`` (``7D``, ``12h``) in seconds; ValueError if malformed."""
    number, unit = value[:-1], value[-1:]
    if unit not in _AGE_UNITS or not number.isdigit() or int(number) <= 0:
        raise ValueError(f"{value!r} is not a stream max-age: a positive integer and one of "
                         "Y, M, D, h, m, s (for example 7D)")
    return int(number) * _AGE_UNITS[unit]



class SchedulingSettings(BaseModel):
    """Who goes next: fair shares between principals, then priority with bounded aging."""

    model_config = {"extra": "forbid"}

    #: A waiting task gains one priority band per this many seconds (0: no aging).
    aging_s: float = Field(10.0, ge=0)
    #: ... and at most this many bands: the bound on aging (9 lets any task overtake any band).
    max_aging_bands: int = Field(9, ge=0, le=9)
    #: Fair-share weight per submitting principal; a principal not named here has the default.
    weights: dict[str, float] = {}
    default_weight: float = Field(1.0, gt=0)
    #: A submission that names no priority gets one from the analysis' urgency words.
    priority_from_urgency: bool = True
    #: A dispatch pass leaves a principal after this many of its tasks in a row found no agent.
    scan_limit: int = Field(256, ge=1)
    #: Intake holds a principal with this many tasks pending while others have work
    #: (coordinator/readahead.py); None: never.
    read_ahead: int | None = Field(1000, ge=1)
    #: A principal that submitted within this many seconds keeps its fair share of the fleet
    #: free between its submissions (scheduling.py); 0: work-conserving, no room kept.
    reserve_s: float = Field(0.5, ge=0)

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(p for p, w in v.items() if w <= 0)
        if bad:
            raise ValueError(f"weights must be positive (not for {', '.join(bad)})")
        return v


def _per_second(rate: str) -> float:
    """``"5/s"``, ``"300/min"`` or ``"1000/h"`` -> tasks per second."""
    count, _, unit = rate.partition("/")
    seconds = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}.get(unit.strip())
    try:
        value = float(count)
    except ValueError:
        value = -1.0
    if seconds is None or value <= 0:
        raise ValueError(f"rate must look like 5/s, 300/min or 1000/h, not {rate!r}")
    return value / seconds


class FleetLimit(BaseModel):
    """Limits on one agent kind or one principal, enforced across the whole fleet."""

    model_config = {"extra": "forbid"}

    #: Tasks of this kind (or principal) running at once, on all agents together.
    max_running: int | None = Field(None, ge=1)
    #: Token bucket: tasks started per second, minute or hour, e.g. ``10/s`` or ``300/min``.
    rate: str | None = None
    #: Bucket size: starts allowed at once after a quiet spell (default: one second's worth).
    burst: int | None = Field(None, ge=1)

    @field_validator("rate")
    @classmethod
    def _valid_rate(cls, v: str | None) -> str | None:
        if v is not None:
            _per_second(v)
        return v

    @property
    def per_second(self) -> float | None:
        return _per_second(self.rate) if self.rate is not None else None


class PrincipalLimit(FleetLimit):
    #: Admission control: past this many pending tasks, new submissions are refused
    #: (HTTP 429 with Retry-After, a ``rejected`` notice over AMQP).
    max_backlog: int | None = Field(None, ge=1)


class FleetLimits(BaseModel):
    model_config = {"extra": "forbid"}

    #: Tasks in flight (assigned or running) on the whole fleet at once; unset: no cap.
    max_in_flight: int | None = Field(None, ge=1)
    kinds: dict[str, FleetLimit] = {}
    principals: dict[str, PrincipalLimit] = {}
    #: What applies to a principal not named under ``principals``.
    default_principal: PrincipalLimit = PrincipalLimit(max_backlog=10_000)
    #: The Retry-After a refused submission is told to wait.
    retry_after_s: float = Field(5.0, gt=0, le=3600)


class EscalationSettings(BaseModel):
    """The escalation desk: what a task does when its fallback chain runs out."""

    model_config = {"extra": "forbid"}

    #: ``fail`` (the task ends failed, with its chain) or ``desk`` (it waits, ``escalated``,
    #: for an operator to retry, resolve or fail it).
    default: Literal["fail", "desk"] = "fail"
    #: Per agent kind (the kind of its last attempt), overriding ``default``.
    kinds: dict[str, Literal["fail", "desk"]] = {}
    #: An escalated task waiting longer than this is overdue (metric, alert rule).
    overdue_after_s: float = Field(3600.0, gt=0)


class SpawnedKind(BaseModel):
    """How many agents of one kind the spawner keeps, and how it starts one."""

    model_config = {"extra": "forbid"}

    min: int = Field(0, ge=0)
    max: int = Field(4, ge=0)
    #: Task slots of one agent: the spawner wants ceil((pending + running) / slots) agents.
    slots: int = Field(4, ge=1)
    #: Local backend: the agent's command; ``{agent_id}`` and ``{kind}`` are filled in. It gets
    #: COORDINATOR_AGENT_ID, COORDINATOR_AGENT_KIND and COORDINATOR_KEYRING_PATH (its own key).
    #: Default: ``<python> -m coordinator_agent worker --kind KIND --concurrency SLOTS``.
    command: list[str] | None = None

    @field_validator("max")
    @classmethod
    def _max_at_least_min(cls, v: int, info: Any) -> int:
        if v < info.data.get("min", 0):
            raise ValueError("must be at least min")
        return v


class SpawnerSettings(BaseModel):
    """Agents on demand: ``local`` processes, or a desired count for Kubernetes (KEDA)."""

    model_config = {"extra": "forbid"}

    #: ``none``, ``local`` (supervised processes), or ``kubernetes`` (export
    #: coordinator_desired_agents{kind} for KEDA; start nothing).
    backend: Literal["none", "local", "kubernetes"] = "none"
    kinds: dict[str, SpawnedKind] = {}
    #: Spawned agents of all kinds together, at most.
    max_agents: int = Field(20, ge=1)
    #: Pending tasks that name no kind count for this kind (unset: they count for none).
    default_kind: str | None = None
    #: A kind whose oldest pending task has waited this long wants one agent more than it has
    #: (slow tasks: the backlog is small but the wait grows).
    wait_threshold_s: float = Field(30.0, gt=0)
    #: How often the spawner compares what it has with what it wants.
    interval_s: float = Field(2.0, gt=0)
    #: An agent above the wanted number, idle this long, is drained and stopped.
    idle_timeout_s: float = Field(60.0, gt=0)
    #: A crashed agent is restarted after this delay, doubled at each crash, up to the max.
    restart_backoff_s: float = Field(1.0, gt=0)
    max_restart_backoff_s: float = Field(60.0, gt=0)
    #: After the drain, how long an agent has to exit before it is killed.
    stop_timeout_s: float = Field(30.0, gt=0)


class Settings(BaseSettings):
    """Everything the coordinator, workers and CLI read from configuration."""

    model_config = SettingsConfigDict(
        env_prefix="COORDINATOR_", env_nested_delimiter="__", extra="forbid"
    )

    #: Also the coordinator's principal id and the namespace of its queues.
    name: str = Field("coordinator", pattern=r"^[A-Za-z0-9_.:@-]{1,64}$")
    broker_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    #: Consul's HTTP address, e.g. http://127.0.0.1:8500; unset = AMQP announcements only.
    registry_url: str | None = Field(None, pattern=r"^https?://[^\s/]+/?$")
    #: Consul ACL token (never logged).
    registry_token: SecretStr | None = None
    registry: RegistrySettings = RegistrySettings()
    #: Routing vocabulary, weights and policies (YAML); unset = the packaged default,
    #: coordinator_agent/routing/data/routing.yaml. Copy that file to customise it.
    routing_config: Path | None = None
    monitoring_host: str = "127.0.0.1"
    monitoring_port: int = Field(9464, ge=0, le=65535)
    log_level: str = "INFO"
    #: The long-running commands' event loop: uvloop where installed (the 'fast' extra), or
    #: asyncio's own; "uvloop" refuses to start without it.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    keyring_path: Path = Path("var/keyring.json")
    data_dir: Path = Path("var")
    prefetch: int = Field(256, ge=1, le=65535)
    limits: Limits = Limits()
    security: SecuritySettings = SecuritySettings()
    liveness: Liveness = Liveness()
    ha: HASettings = HASettings()
    scheduling: SchedulingSettings = SchedulingSettings()
    fleet: FleetLimits = FleetLimits()
    escalation: EscalationSettings = EscalationSettings()
    spawner: SpawnerSettings = SpawnerSettings()
    #: The YAML file these settings were read from (None: none was found); see load_settings.
    _config_file: Path | None = PrivateAttr(None)

    @property
    def config_file(self) -> Path | None:
        return self._config_file

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        level = v.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (CLI flags) win over the environment, which wins over the file.
        check_environment(os.environ)
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def monitoring_client_host(self) -> str:
        """Where a local client reaches the monitoring server (loopback when it listens on all)."""
        everywhere = ("", "0.0.0.0", "::")  # noqa: S104 - recognising it, not binding
        return "127.0.0.1" if self.monitoring_host in everywhere else self.monitoring_host

    @property
    def store_path(self) -> Path:
        return self.data_dir / f"{self.name}.sqlite3"

    @property
    def routing_store_path(self) -> Path:
        """Where the router's learned outcomes live (see docs/ROUTING.md for backups)."""
        return self.data_dir / f"{self.name}.routing.sqlite3"


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(*config_choice())


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse a COORDINATOR_* variable that nothing reads, naming the closest real one."""
    sections = {name.upper() for name, field in Settings.model_fields.items()
                if isinstance(field.default, BaseModel)}
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    for variable in sorted(environ):
        name = variable.upper()
        if (not name.startswith(ENV_PREFIX) or name in known
                or name.startswith(TEST_VARIABLE_PREFIX)):
            continue
        section, nested, _ = name[len(ENV_PREFIX):].partition("__")
        if nested and section in sections:
            continue  # COORDINATOR_LIMITS__X: the section's model checks X itself
        guess = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise ConfigError(
            f"unknown environment variable {variable}{hint}: no setting or option reads it; "
            "config/coordinator.yaml lists every setting, `coordinator-agent COMMAND --help` "
            "every option"
        )


#: A config file named by the command line (--config) for the load under way, and its origin.
_CHOSEN: contextvars.ContextVar[tuple[Path, str] | None] = contextvars.ContextVar(
    "coordinator_config_file", default=None)


def config_choice() -> tuple[Path | None, str]:
    """The config file to read and who named it: --config, COORDINATOR_CONFIG or the default."""
    chosen = _CHOSEN.get()
    if chosen is not None:
        return chosen
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit), CONFIG_ENV
    found = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    return found, "default"


def config_path() -> Path | None:
    return config_choice()[0]


def read_config_file(path: Path | None, origin: str = CONFIG_ENV) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        # A file object, not its text: YAML's error marks then name the file.
        with path.open(encoding="utf-8") as stream:
            data = yaml.safe_load(stream) or {}
    except FileNotFoundError:
        named = "" if origin == "default" else f" (named by {origin})"
        raise ConfigError(f"config file {path}{named} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def describe_config_source(settings: Settings) -> str:
    """One line for the log: which config file was read, or that none was and where we looked."""
    if settings.config_file is not None:
        return f"configuration from {settings.config_file.resolve()}"
    return (f"no config file ({DEFAULT_CONFIG_PATH} not found in {Path.cwd()}; name one with "
            f"--config or {CONFIG_ENV}): defaults and {ENV_PREFIX}* variables only")


def load_settings(*, config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings, turning validation errors into one readable ConfigError.

    ``config_file`` (the command line's --config) wins over COORDINATOR_CONFIG.
    """
    token = _CHOSEN.set((Path(config_file), "--config")) if config_file else None
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        settings._config_file = config_path()
        return settings
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        if token is not None:
            _CHOSEN.reset(token)
