"""The warehouse behind a small interface: engines, source selectables and output tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from fulcrum.contract import SOURCES, define_output_tables
from fulcrum.settings import Settings, SourceSpec, redact_url

logger = logging.getLogger(__name__)


class SourceMappingError(RuntimeError):
    """A source mapping points at a table or query that cannot be read."""


def create_engine_for(url: str) -> Engine:
    """Create an engine; for a SQLite file, create its folder and enable WAL and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _configure_sqlite(dbapi_connection, _record):  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.get_driver_name() in ("", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        # Sessions run in UTC so that naive timestamps and casts to timestamptz mean UTC,
        # whatever the server's default time zone is.
        return sa.create_engine(
            parsed, pool_pre_ping=True, connect_args={"options": "-c timezone=UTC"}
        )
    return sa.create_engine(parsed, pool_pre_ping=True)


@dataclass
class Warehouse:
    """A warehouse connection plus the contract's output tables in the configured schema."""

    engine: Engine
    schema: str | None = None
    metadata: sa.MetaData = field(default_factory=sa.MetaData)

    def __post_init__(self) -> None:
        self.outputs = define_output_tables(self.metadata, schema=self.schema)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Warehouse":
        engine = create_engine_for(settings.warehouse_url.get_secret_value())
        return cls(engine=engine, schema=settings.output_schema)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=False))

    def create_output_tables(self) -> list[str]:
        """Create the output tables that do not exist yet; return the names created."""
        inspector = sa.inspect(self.engine)
        existing = set(inspector.get_table_names(schema=self.schema))
        if self.schema is not None and self.dialect == "postgresql":
            with self.engine.begin() as connection:
                connection.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        self.metadata.create_all(self.engine, checkfirst=True)
        return [name for name in self.outputs if name not in existing]


def source_selectable(engine: Engine, name: str, spec: SourceSpec) -> sa.FromClause:
    """Return a FROM clause for source ``name`` as mapped by ``spec``.

    Table names are quoted by SQLAlchemy, never pasted into SQL. A SQL mapping is
    wrapped as a subquery whose columns are read from a zero-row probe.
    """
    if name not in SOURCES:
        raise SourceMappingError(f"unknown source {name!r}; expected one of {sorted(SOURCES)}")
    if spec.table is not None:
        try:
            table = sa.Table(spec.table, sa.MetaData(), schema=spec.schema_name, autoload_with=engine)
        except sa.exc.NoSuchTableError as exc:
            where = f"{spec.schema_name}.{spec.table}" if spec.schema_name else spec.table
            raise SourceMappingError(
                f"source {name!r} is mapped to table {where!r}, which does not exist in the "
                f"warehouse; create it or map the source to another table or a SQL query"
            ) from exc
        return table
    probe = sa.text(spec.sql)
    try:
        with engine.connect() as connection:
            keys = list(
                connection.execute(
                    sa.select(sa.text("*")).select_from(probe.columns().subquery("probe")).limit(0)
                ).keys()
            )
    except SQLAlchemyError as exc:
        raise SourceMappingError(
            f"source {name!r} is mapped to a SQL query that failed: "
            f"{type(exc.orig or exc).__name__}: {str(exc.orig or exc).splitlines()[0]}. "
            f"Query starts with {spec.sql[:80]!r}"
        ) from exc
    return probe.columns(*[sa.column(key) for key in keys]).subquery(f"src_{name}")


def check_source_columns(name: str, selectable: sa.FromClause) -> None:
    """Raise SourceMappingError when a mapped source lacks a contract column."""
    present = {column.name for column in selectable.columns}
    missing = [column for column in SOURCES[name].column_names if column not in present]
    if missing:
        raise SourceMappingError(
            f"source {name!r} lacks required column(s) {missing}; it has {sorted(present)}. "
            f"Rename the columns in a SQL mapping, for example 'SELECT my_col AS {missing[0]} ...'"
        )
