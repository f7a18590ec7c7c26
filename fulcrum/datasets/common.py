"""Steps shared by the dataset loaders: read files, land raw tables, render SQL and the config.

A loader never reshapes data in Python. It reads each file as published (CSV values as
text, Parquet with its own types), writes it to a raw table, and expresses every
interpretation as SQL over the raw tables. SQL that differs between SQLite and PostgreSQL
is produced by `SqlDialect`, so one mapping template serves both.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from fulcrum.settings import SOURCE_NAMES, Settings, SourceSpec, redact_url
from fulcrum.warehouse import (
    SourceMappingError,
    check_source_columns,
    create_engine_for,
    source_selectable,
)

logger = logging.getLogger(__name__)

SUPPORTED_DIALECTS = ("sqlite", "postgresql")

# pandas names a column whose header cell is empty "Unnamed: <position>".
_UNNAMED_COLUMN = re.compile(r"^Unnamed: \d+$")


class DatasetFileError(FileNotFoundError):
    """A dataset file is not where the loader looks for it."""


def locate_file(data_dir: Path, folder: str, name: str) -> Path:
    """Return the path of ``folder/name`` under ``data_dir``, or of ``name`` directly in it.

    ``data_dir`` is either the folder that contains the dataset folders (``../shared/data``)
    or the dataset folder itself.
    """
    data_dir = Path(data_dir)
    candidates = [data_dir / folder / name, data_dir / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise DatasetFileError(
        f"dataset file {name!r} not found; looked for {tried}. Pass as DIR the folder that "
        f"contains {folder}/, or {folder}/ itself"
    )


def read_csv_as_text(path: Path, separator: str = ",") -> pd.DataFrame:
    """Read a CSV file with every value as text, and empty cells as empty strings.

    A column with an empty header and only empty values is dropped. It is what a trailing
    separator at the end of every line produces, not a column of the data.
    """
    frame = pd.read_csv(
        path, sep=separator, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8"
    )
    artefacts = [
        column
        for column in frame.columns
        if _UNNAMED_COLUMN.match(str(column)) and (frame[column] == "").all()
    ]
    return frame.drop(columns=artefacts)


def write_raw_tables(engine: Engine, tables: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Replace each raw table with its frame's rows in one transaction and return the row counts.

    Text columns become TEXT, so values such as ``' '`` or ``'05'`` reach SQL unchanged.
    """
    counts = {}
    with engine.begin() as connection:
        for name, frame in tables.items():
            text_columns = {
                column: sa.Text()
                for column in frame.columns
                if pd.api.types.is_string_dtype(frame[column].dtype)
            }
            frame.to_sql(
                name, connection, if_exists="replace", index=False, dtype=text_columns,
                chunksize=20_000,
            )
            counts[name] = len(frame)
            logger.info("loaded raw table %s: %d rows", name, len(frame))
    return counts


@dataclass(frozen=True)
class SqlDialect:
    """SQL fragments whose spelling differs between SQLite and PostgreSQL.

    Timestamps produced by these fragments are naive and mean UTC: ISO text
    (``YYYY-MM-DD HH:MM:SS``) on SQLite and ``timestamp without time zone`` on PostgreSQL,
    whose sessions Fulcrum runs in UTC. Arguments named ``expression`` are SQL fragments
    written by the loaders, never user input. Numbers and dates are formatted here from
    typed values.
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in SUPPORTED_DIALECTS:
            raise ValueError(
                f"dataset mappings are written for {list(SUPPORTED_DIALECTS)}. "
                f"Got the dialect {self.name!r}."
            )

    @classmethod
    def for_engine(cls, engine: Engine) -> "SqlDialect":
        return cls(engine.dialect.name)

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"

    def timestamp(self, expression: str) -> str:
        """Convert a date, timestamp or ISO text to a naive UTC timestamp."""
        if self.is_sqlite:
            # datetime() also turns a date-only '2018-02-01' into '2018-02-01 00:00:00',
            # so every value compares correctly as text.
            return f"datetime({expression})"
        return f"CAST({expression} AS TIMESTAMP)"

    def timestamp_literal(self, moment: dt.date | dt.datetime) -> str:
        if not isinstance(moment, dt.datetime):
            moment = dt.datetime.combine(moment, dt.time(0, 0))
        text = moment.strftime("%Y-%m-%d %H:%M:%S")
        return f"'{text}'" if self.is_sqlite else f"TIMESTAMP '{text}'"

    def null_timestamp(self) -> str:
        return "NULL" if self.is_sqlite else "CAST(NULL AS TIMESTAMP)"

    def add_days(self, expression: str, days: int) -> str:
        """Add a whole number of days to a timestamp expression."""
        days = _check_int(days, "days")
        if self.is_sqlite:
            return f"datetime({expression}, '{days:+d} days')"
        return f"({self.timestamp(expression)} + INTERVAL '{days} days')"

    def add_seconds(self, expression: str, seconds: str) -> str:
        """Add an integer SQL expression of seconds to a timestamp expression."""
        if self.is_sqlite:
            return f"datetime({expression}, ({seconds}) || ' seconds')"
        return f"({self.timestamp(expression)} + ({seconds}) * INTERVAL '1 second')"

    def add_months(self, expression: str, months: str) -> str:
        """Add an integer SQL expression of calendar months (may be negative) to a timestamp.

        Used only on the first day of a month, where SQLite and PostgreSQL agree.
        """
        if self.is_sqlite:
            return f"datetime({expression}, ({months}) || ' months')"
        return f"({self.timestamp(expression)} + ({months}) * INTERVAL '1 month')"

    def number(self, expression: str) -> str:
        """Convert text to a float. Blank text becomes NULL, where SQLite's cast gives 0.0."""
        target = "REAL" if self.is_sqlite else "DOUBLE PRECISION"
        return f"CAST(NULLIF(TRIM({expression}), '') AS {target})"

    def integer(self, expression: str) -> str:
        """Convert text to a 64-bit integer, with blank text as NULL."""
        return f"CAST(NULLIF(TRIM({expression}), '') AS BIGINT)"

    def text(self, expression: str) -> str:
        """Convert a number to text, for building identifiers."""
        return f"CAST({expression} AS VARCHAR(32))"


def sql_number(value: float) -> str:
    """Format a finite number as a SQL literal."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"a SQL literal must be a finite number. Got {value!r}.")
    return repr(value)


def _check_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer. Got {value!r}.")
    return value


@dataclass(frozen=True)
class ConfigEntry:
    """One ``key = value`` line of the generated config, with the comment lines above it."""

    key: str
    value: Any
    comment: str = ""


@dataclass(frozen=True)
class SourceMapping:
    """Mapping of one source: a SQL SELECT, or an absent source when ``sql`` is None."""

    name: str
    sql: str | None
    comment: str = ""

    @property
    def absent(self) -> bool:
        return self.sql is None

    def spec(self) -> SourceSpec:
        return SourceSpec(absent=True) if self.absent else SourceSpec(sql=self.sql)


@dataclass
class GeneratedConfig:
    """The fulcrum.toml a loader writes: settings, their reasons and the five source mappings."""

    dataset: str
    header: str
    settings: list[ConfigEntry] = field(default_factory=list)
    sections: dict[str, list[ConfigEntry]] = field(default_factory=dict)
    sources: list[SourceMapping] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [mapping.name for mapping in self.sources]
        if sorted(names) != sorted(SOURCE_NAMES):
            raise ValueError(
                f"a config maps exactly the sources {list(SOURCE_NAMES)}. Got {names}."
            )

    def mapping(self, name: str) -> SourceMapping:
        return next(mapping for mapping in self.sources if mapping.name == name)

    def overrides(self) -> dict[str, Any]:
        """Return the config as keyword overrides for `Settings`, for tests and checks."""
        values: dict[str, Any] = {entry.key: entry.value for entry in self.settings}
        for section, entries in self.sections.items():
            values[section] = {entry.key: entry.value for entry in entries}
        values["sources"] = {mapping.name: mapping.spec() for mapping in self.sources}
        return values

    def render(self) -> str:
        """Render the config as TOML text with each assumption's comment above its line."""
        lines = [*_comment_lines(self.header), ""]
        for entry in self.settings:
            lines += [*_entry_lines(entry), ""]
        for section, entries in self.sections.items():
            lines.append(f"[{section}]")
            for entry in entries:
                lines += _entry_lines(entry)
            lines.append("")
        for mapping in self.sources:
            lines += [*_comment_lines(mapping.comment), f"[sources.{mapping.name}]"]
            if mapping.absent:
                lines.append("absent = true")
            else:
                lines.append(f"sql = {_toml_literal_block(mapping.sql)}")
            lines.append("")
        return "\n".join(lines)


def _entry_lines(entry: ConfigEntry) -> list[str]:
    return [*_comment_lines(entry.comment), f"{entry.key} = {_toml_value(entry.value)}"]


def _comment_lines(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.strip().splitlines()] if text.strip() else []


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string of printable text is also a valid TOML basic string.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def _toml_literal_block(sql: str) -> str:
    if "'''" in sql:
        raise ValueError("a SQL mapping must not contain three single quotes in a row")
    return "'''\n" + sql.strip() + "\n'''"


def dedent_sql(sql: str) -> str:
    """Strip the common indentation and the blank first and last lines of a SQL template."""
    lines = sql.strip("\n").splitlines()
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents, default=0)
    return "\n".join(line[cut:].rstrip() for line in lines)


@dataclass
class LoadResult:
    """Outcome of a load: raw table row counts, the rows each mapping returns, and the config."""

    dataset: str
    warehouse: str
    raw_rows: dict[str, int]
    source_rows: dict[str, int | None]
    config: GeneratedConfig

    def describe(self) -> str:
        lines = [f"Loaded {self.dataset} into {self.warehouse}:"]
        lines += [f"  raw table {name}: {count:,} rows" for name, count in self.raw_rows.items()]
        for name, count in self.source_rows.items():
            if count is None:
                lines.append(f"  source {name}: declared absent")
            else:
                lines.append(f"  source {name}: {count:,} rows through its SQL mapping")
        return "\n".join(lines)


def count_mapped_rows(engine: Engine, mapping: SourceMapping) -> int | None:
    """Check that a mapping returns every contract column and return its row count."""
    if mapping.absent:
        return None
    selectable = source_selectable(engine, mapping.name, mapping.spec())
    check_source_columns(mapping.name, selectable)
    query = sa.select(sa.func.count()).select_from(selectable)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def warehouse_entry(url: str) -> ConfigEntry | None:
    """Return the warehouse_url line for the config, or None when the URL contains a password.

    A password never goes into a file. The config header then names the environment
    variable to set instead.
    """
    if make_url(url).password is not None:
        return None
    return ConfigEntry(
        "warehouse_url",
        url,
        "The warehouse the raw tables were loaded into. A relative SQLite path is\n"
        "resolved against the folder the flow runs in.",
    )


def load_dataset(
    dataset: str,
    url: str,
    read_raw_tables: Callable[[], dict[str, pd.DataFrame]],
    build_config: Callable[[SqlDialect], GeneratedConfig],
) -> LoadResult:
    """Read the files, land them as raw tables, and check every mapping against the warehouse."""
    engine = create_engine_for(url)
    try:
        dialect = SqlDialect.for_engine(engine)
        raw_tables = read_raw_tables()
        raw_rows = write_raw_tables(engine, raw_tables)

        config = build_config(dialect)
        entry = warehouse_entry(url)
        if entry is not None:
            config.settings.insert(0, entry)
        else:
            config.header += (
                "\nThe warehouse URL contains a password, so it is not written here. "
                "Set FULCRUM_WAREHOUSE_URL in the environment of the flow."
            )
        source_rows = {
            mapping.name: count_mapped_rows(engine, mapping) for mapping in config.sources
        }
        Settings(**config.overrides())
    finally:
        engine.dispose()
    return LoadResult(dataset, redact_url(url), raw_rows, source_rows, config)


__all__ = [
    "ConfigEntry",
    "DatasetFileError",
    "GeneratedConfig",
    "LoadResult",
    "SourceMapping",
    "SourceMappingError",
    "SqlDialect",
    "count_mapped_rows",
    "dedent_sql",
    "load_dataset",
    "locate_file",
    "read_csv_as_text",
    "sql_number",
    "write_raw_tables",
]
