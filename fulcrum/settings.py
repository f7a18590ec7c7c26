"""Typed run settings, resolved when a run starts and passed down as one object.

Sources, highest priority first: keyword overrides, environment variables with the
prefix ``FULCRUM_`` (nested fields use ``__``, for example
``FULCRUM_LTV__LIFETIME_CAP_MONTHS=48``), the TOML file named by ``FULCRUM_CONFIG``
(or ``./fulcrum.toml`` when it exists), then the defaults below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

SOURCE_NAMES = ("leads", "lead_events", "opportunities", "billing_accounts", "invoices")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")

# Each setting that can be read from a Prefect Secret block, and the setting naming the block.
_SECRET_BLOCK_FIELDS = {
    "warehouse_url": "warehouse_url_secret_block",
    "mlflow_tracking_uri": "mlflow_tracking_uri_secret_block",
}


def validate_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise ValueError."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ValueError(
            f"{what} must be a plain SQL identifier (letters, digits and underscores, "
            f"starting with a letter or underscore, at most 63 characters). Got {value!r}."
        )
    return value


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its user info
        return re.sub(r"//[^@/]*@", "//***@", url)


class SourceSpec(BaseModel):
    """Where one source is read from: a table (optionally in a schema) or a SQL SELECT.

    ``absent = true`` declares that the warehouse has no such data. The run then skips
    the stages that need it (see docs/data-contract.md) and records which ones in its notes.
    """

    table: str | None = None
    schema_name: str | None = Field(default=None, alias="schema")
    sql: str | None = None
    absent: bool = False

    model_config = {"populate_by_name": True, "extra": "forbid"}

    @model_validator(mode="after")
    def _check_one_of(self) -> "SourceSpec":
        if self.absent:
            if self.table is not None or self.sql is not None:
                raise ValueError("a source declared absent takes no 'table' or 'sql'")
            return self
        if (self.table is None) == (self.sql is None):
            raise ValueError("a source mapping needs exactly one of 'table' or 'sql'")
        if self.table is not None:
            validate_identifier(self.table, "source table name")
        if self.schema_name is not None:
            validate_identifier(self.schema_name, "source schema name")
        if self.sql is not None:
            stripped = self.sql.strip().rstrip(";").strip()
            if not re.match(r"^(select|with)\b", stripped, re.IGNORECASE):
                raise ValueError(
                    f"a SQL source mapping must be one SELECT (or WITH ... SELECT) statement. "
                    f"Got {self.sql[:60]!r}."
                )
            if ";" in stripped:
                raise ValueError("a SQL source mapping must be a single statement without ';'")
            self.sql = stripped
        return self


def _default_sources() -> dict[str, SourceSpec]:
    return {name: SourceSpec(table=name) for name in SOURCE_NAMES}


class LtvSettings(BaseModel):
    """Rules that turn billing history into LTV labels."""

    lifetime_cap_months: float = Field(60.0, gt=0, description="Maximum lifetime, in months, that an LTV may assume")
    churn_prior_months: float = Field(
        120.0,
        ge=0,
        description="Account-months of the overall churn rate mixed into each segment's rate",
    )
    churn_grace_days: int = Field(
        31, ge=0, description="Gap in service after which an account counts as churned"
    )
    segment_column: str = Field("plan", description="billing_accounts column that defines a segment")
    min_history_days: int = Field(
        28, ge=0, description="Accounts with less paid service than this get no ARPU label"
    )

    @field_validator("segment_column")
    @classmethod
    def _check_segment_column(cls, value: str) -> str:
        return validate_identifier(value, "ltv.segment_column")


class ModelSettings(BaseModel):
    """Training sizes, holdout and promotion rules for both models."""

    min_training_positives: int = Field(50, ge=1)
    min_value_training_rows: int = Field(30, ge=2)
    calibration_folds: int = Field(3, ge=2)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    snapshot_count: int = Field(6, ge=1, description="Training snapshots per run")
    snapshot_step_days: int = Field(30, ge=1)
    max_training_rows: int = Field(400_000, ge=1000)
    max_lead_age_days: int = Field(
        365, ge=1, description="Older open leads are left out of training snapshots"
    )
    promotion_tolerance: float = Field(
        0.005, ge=0, description="How much worse on the holdout a new model may be and still win"
    )
    random_seed: int = 0


class RouteSettings(BaseModel):
    """Quantile thresholds that split open leads into the four routes."""

    probability_quantile: float = Field(0.7, ge=0, le=1)
    value_quantile: float = Field(0.7, ge=0, le=1)


class Settings(BaseSettings):
    """Everything a Fulcrum run needs to know, resolved once at run start."""

    warehouse_url: SecretStr = SecretStr("sqlite:///var/warehouse.db")
    warehouse_url_secret_block: str | None = Field(
        None,
        description="Name of a Prefect Secret block whose value is the warehouse URL. It "
        "replaces warehouse_url and is read when the settings are resolved",
    )
    output_schema: str | None = None
    warehouse_lock_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Seconds a warehouse statement waits for a lock held by another writer "
        "before it fails (SQLite busy timeout, PostgreSQL lock_timeout)",
    )
    extract_retry_delays_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 20.0, 60.0],
        max_length=10,
        description="Seconds to wait before each new attempt at a source read that lost its "
        "database connection. One retry per entry, and an empty list for none",
    )
    stale_run_after_hours: float = Field(
        24.0,
        gt=0,
        description="Hours after which a score_runs row still 'running' is marked failed when "
        "its process cannot be checked from this host",
    )
    mlflow_tracking_uri: SecretStr = SecretStr("sqlite:///var/mlflow.db")
    mlflow_tracking_uri_secret_block: str | None = Field(
        None,
        description="Name of a Prefect Secret block whose value is the MLflow tracking URI. It "
        "replaces mlflow_tracking_uri and is read when the settings are resolved",
    )
    mlflow_artifact_location: str = "var/mlartifacts"
    experiment_name: str = "fulcrum"
    conversion_model_name: str = "fulcrum-conversion"
    value_model_name: str = "fulcrum-value"
    var_dir: Path = Path("var")

    business_timezone: str = "UTC"
    horizon_days: int = Field(90, ge=1, le=3650)
    overlay_weight: float = Field(0.5, ge=0, le=1)
    rep_capacity: int = Field(100, ge=1)
    currencies: list[str] = Field(default_factory=lambda: ["USD", "EUR", "GBP", "BRL", "INR"])
    allow_mixed_currencies: bool = Field(
        False,
        description="Let one run label accounts billed in different currencies. Fulcrum "
        "converts no currency, so the value ranking then compares amounts in different units",
    )
    freshness_days: int = Field(
        7, ge=0, description="Newest lead may be at most this many days older than as_of"
    )
    chunk_rows: int = Field(
        100_000,
        ge=1000,
        description="Rows per chunk when reading sources, building scoring features, scoring "
        "and writing; memory grows with it, not with the number of leads",
    )
    dask_address: str | None = Field(
        None,
        description="Address of a running Dask scheduler, for example tcp://scheduler:8786. "
        "When set, scoring chunks run as Prefect tasks on its workers (needs the 'dask' extra)",
    )
    nightly_cron: str = Field(
        "0 2 * * *", description="Cron schedule of the nightly deployment, in business_timezone"
    )
    run_lock_wait_seconds: float = Field(
        3600,
        ge=0,
        description="Seconds a run waits for the run lock (fulcrum_locks) that another run holds "
        "before it fails",
    )
    run_lock_stale_seconds: float = Field(
        6 * 3600,
        gt=0,
        description="Age in seconds after which a run lock counts as abandoned and is taken over; "
        "keep it above the longest run",
    )

    sources: dict[str, SourceSpec] = Field(default_factory=_default_sources)
    ltv: LtvSettings = Field(default_factory=LtvSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    routes: RouteSettings = Field(default_factory=RouteSettings)

    model_config = SettingsConfigDict(
        env_prefix="FULCRUM_",
        env_nested_delimiter="__",
        extra="forbid",
        # pydantic repeats the rejected input in its message, which the CLI prints, and the
        # input can contain a URL with a password.
        hide_input_in_errors=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get("FULCRUM_CONFIG") or "fulcrum.toml"
        toml_source = TomlConfigSettingsSource(settings_cls, toml_file=config_file)
        return (init_settings, env_settings, toml_source)

    @field_validator("business_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"business_timezone must be an IANA zone name. Got {value!r}.") from exc
        return value

    @field_validator("output_schema")
    @classmethod
    def _check_schema(cls, value: str | None) -> str | None:
        return None if value is None else validate_identifier(value, "output_schema")

    @field_validator("currencies")
    @classmethod
    def _check_currencies(cls, value: list[str]) -> list[str]:
        bad = [code for code in value if not re.fullmatch(r"[A-Z]{3}", code)]
        if bad:
            raise ValueError(f"currencies must be ISO 4217 codes such as 'USD'. Got {bad!r}.")
        return value

    @field_validator("extract_retry_delays_seconds")
    @classmethod
    def _check_retry_delays(cls, value: list[float]) -> list[float]:
        bad = [delay for delay in value if not 0 <= delay <= 3600]
        if bad:
            raise ValueError(
                f"extract_retry_delays_seconds must be seconds between 0 and 3600. Got {bad!r}."
            )
        return value

    @field_validator("warehouse_url_secret_block", "mlflow_tracking_uri_secret_block")
    @classmethod
    def _check_block_name(cls, value: str | None, info) -> str | None:
        if value is not None and not _BLOCK_NAME.match(value):
            raise ValueError(
                f"{info.field_name} must be a Prefect block name (lowercase letters, digits "
                f"and dashes). Got {value!r}."
            )
        return value

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _check_tracking_uri(cls, value: SecretStr) -> SecretStr:
        check_tracking_uri_has_no_password(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _read_secret_blocks(self) -> "Settings":
        for field_name, block_field in _SECRET_BLOCK_FIELDS.items():
            block_name = getattr(self, block_field)
            if block_name is None:
                continue
            if field_name in self.model_fields_set:
                raise ValueError(
                    f"set either {field_name} or {block_field}, not both. "
                    f"{block_field} names a Prefect Secret block that contains the {field_name}"
                )
            value = read_secret_block(block_name, block_field)
            if field_name == "mlflow_tracking_uri":
                check_tracking_uri_has_no_password(value)
            setattr(self, field_name, SecretStr(value))
        return self

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, value: dict[str, SourceSpec]) -> dict[str, SourceSpec]:
        unknown = sorted(set(value) - set(SOURCE_NAMES))
        if unknown:
            raise ValueError(
                f"sources has unknown names {unknown}; allowed are {list(SOURCE_NAMES)}"
            )
        merged = _default_sources()
        merged.update(value)
        for group in (("billing_accounts", "invoices"), ("leads", "opportunities")):
            flags = {name: merged[name].absent for name in group}
            if len(set(flags.values())) > 1:
                raise ValueError(
                    f"sources {list(group)} must be absent together or present together. "
                    f"Got absent={flags}."
                )
        if merged["leads"].absent and not merged["lead_events"].absent:
            raise ValueError("sources.lead_events needs sources.leads; declare both absent")
        return merged

    @property
    def has_crm(self) -> bool:
        """Whether leads and opportunities are mapped, so conversion scores can be made."""
        return not self.sources["leads"].absent

    @property
    def has_billing(self) -> bool:
        """Whether accounts and invoices are mapped, so LTV labels can be made."""
        return not self.sources["billing_accounts"].absent

    @property
    def timezone(self) -> ZoneInfo:
        return ZoneInfo(self.business_timezone)

    def redacted(self) -> dict[str, Any]:
        """Return the settings as plain data with every password masked, for logs and MLflow."""
        data = self.model_dump(mode="json", by_alias=True)
        data["warehouse_url"] = redact_url(self.warehouse_url.get_secret_value())
        data["mlflow_tracking_uri"] = redact_url(self.mlflow_tracking_uri.get_secret_value())
        return data

    def __repr_args__(self):  # type: ignore[override]
        for key, value in super().__repr_args__():
            if key in ("warehouse_url", "mlflow_tracking_uri"):
                value = redact_url(value.get_secret_value())
            yield key, value


def load_settings(**overrides: Any) -> Settings:
    """Resolve settings from overrides, the environment, the TOML file and Secret blocks."""
    return Settings(**overrides)


def read_secret_block(block_name: str, setting: str) -> str:
    """Return the text value of the Prefect Secret block ``block_name``.

    Raises ValueError naming the block and the setting, never the value.
    """
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except Exception as exc:  # noqa: BLE001 - Prefect raises several types; all mean unreadable
        raise ValueError(
            f"{setting} names the Prefect Secret block {block_name!r}, which could not be "
            f"read ({type(exc).__name__}: {exc}). Create it with "
            f"Secret(value=...).save({block_name!r}) or fix the name"
        ) from None
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"the Prefect Secret block {block_name!r} named by {setting} must hold a non-empty "
            f"text value. Got a value of type {type(value).__name__}."
        )
    return value


def check_tracking_uri_has_no_password(uri: str) -> None:
    """Raise ValueError when an HTTP(S) MLflow tracking URI carries a password.

    MLflow repeats an HTTP tracking URI, user info included, in its error messages, which
    end up in logs and in score_runs. Database URIs are passed to SQLAlchemy, which hides
    the password, so they may carry one.
    """
    parsed = urlsplit(uri)
    if parsed.scheme.lower() in ("http", "https") and parsed.password is not None:
        raise ValueError(
            "mlflow_tracking_uri must not carry a password in an http(s) URI, because MLflow "
            f"repeats the URI in its error messages. Got {redact_url(uri)!r}. Set the "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD environment variables "
            "(or MLFLOW_TRACKING_TOKEN) instead"
        )


RouteName = Literal["priority", "sales_rep", "self_serve", "nurture"]
