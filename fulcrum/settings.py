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
    the stages that need it (see docs/data-contract.md) and says so.
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

    lifetime_cap_months: float = Field(60.0, gt=0, description="Longest lifetime an LTV may assume")
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
    output_schema: str | None = None
    mlflow_tracking_uri: SecretStr = SecretStr("sqlite:///var/mlflow.db")
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
    freshness_days: int = Field(
        7, ge=0, description="Newest lead may be at most this many days older than as_of"
    )
    chunk_rows: int = Field(100_000, ge=1000)

    sources: dict[str, SourceSpec] = Field(default_factory=_default_sources)
    ltv: LtvSettings = Field(default_factory=LtvSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    routes: RouteSettings = Field(default_factory=RouteSettings)

    model_config = SettingsConfigDict(
        env_prefix="FULCRUM_",
        env_nested_delimiter="__",
        extra="forbid",
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
    """Resolve settings from overrides, the environment and the TOML file."""
    return Settings(**overrides)


RouteName = Literal["priority", "sales_rep", "self_serve", "nurture"]
