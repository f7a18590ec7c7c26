"""Time publish_scores on a lead_scores frame against a raw bulk write of the same rows.

Usage: python bench/bench_publish.py --rows 1000000 [--url URL]

The frame has the 13 columns and dtypes that scoring produces. Each run writes into a fresh
schema on PostgreSQL (dropped afterwards) or, without --url, into a SQLite file in a
temporary folder that is deleted afterwards. It times three writes of the same rows:

- raw: the rows converted as publishing converts them, then written into a plain table with
  the same columns and no key or index: COPY on PostgreSQL, executemany on SQLite;
- publish: publish_scores for a date that has no rows yet;
- republish: publish_scores again for the same date, which replaces the first rows.

Throughput ratios are publish rows per second divided by raw rows per second, so 1.0 means
publishing costs nothing beyond the raw write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import sqlalchemy as sa
from psycopg import sql

from fulcrum.bulk import copy_rows, to_arrow_table
from fulcrum.settings import redact_url
from fulcrum.warehouse import Warehouse, create_engine_for
from tasks.publish import INSERT_BATCH_ROWS, iter_records, publish_scores

AS_OF = dt.date(2025, 6, 1)
RUN_ID = "bench-0123456789abcdef"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="lead_scores rows to publish (default 1,000,000)"
    )
    parser.add_argument(
        "--url",
        help="SQLAlchemy URL of the warehouse; default: a SQLite file in a temporary folder. "
        "On PostgreSQL the tables go to a new schema that is dropped afterwards; a SQLite "
        "file must not exist yet",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the scores")
    return parser.parse_args(argv)


def build_lead_scores(rows: int, seed: int) -> pd.DataFrame:
    """Build ``rows`` scored leads with the columns and dtypes that scoring produces."""
    rng = np.random.default_rng(seed)
    # Ids shaped like CRM lead ids, in random order as the scores arrive.
    lead_ids = pd.Series([f"00Q{number:012d}" for number in rng.permutation(rows)], dtype=object)
    p_convert = rng.beta(1.0, 20.0, rows)
    predicted_ltv = rng.lognormal(8.0, 1.2, rows)
    expected_value = p_convert * predicted_ltv
    overlay = 0.5 * np.log(np.clip(p_convert, 1e-12, None)) + 0.5 * np.log(predicted_ltv)

    routes = np.full(rows, "nurture", dtype=object)
    high_p = p_convert >= np.quantile(p_convert, 0.9)
    high_v = predicted_ltv >= np.quantile(predicted_ltv, 0.9)
    routes[high_p & high_v] = "priority"
    routes[high_p & ~high_v] = "self_serve"
    routes[~high_p & high_v] = "sales_rep"

    return pd.DataFrame(
        {
            "lead_id": lead_ids,
            "p_convert": p_convert,
            "predicted_ltv": predicted_ltv,
            "expected_value": expected_value,
            "overlay_weight": np.full(rows, 0.5),
            "overlay_score": overlay,
            "rank_volume": rank_descending(p_convert).astype(np.int64),
            "rank_value": pd.array(rank_descending(predicted_ltv), dtype="Int64"),
            "rank_expected_value": pd.array(rank_descending(expected_value), dtype="Int64"),
            "rank_overlay": rank_descending(overlay).astype(np.int64),
            "route": routes,
            "conversion_model_version": "17",
            "value_model_version": pd.Series(["9"] * rows, dtype=object),
        }
    )


def rank_descending(scores: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def frontier_rows() -> pd.DataFrame:
    weights = np.round(np.arange(11) / 10, 1)
    return pd.DataFrame(
        {
            "overlay_weight": weights,
            "capacity": np.full(11, 500),
            "expected_conversions": 60.0 - 20.0 * weights,
            "expected_value": 90_000.0 + 50_000.0 * weights,
        }
    )


def empty_account_ltv(table: sa.Table) -> pd.DataFrame:
    return pd.DataFrame(columns=[column.name for column in table.columns if column.name != "as_of"])


def time_raw_write(warehouse: Warehouse, source: sa.Table, frame: pd.DataFrame) -> float:
    """Return the seconds to convert ``frame`` and write it into a new table without a key.

    The new table has the columns of ``source`` that ``frame`` has. The rows go in one COPY
    of the CSV that publishing sends on PostgreSQL, and in one executemany on SQLite.
    """
    columns = [column for column in source.columns if column.name in frame.columns]
    plain = sa.Table(
        f"raw_{source.name}_{uuid.uuid4().hex[:8]}",
        sa.MetaData(),
        *[sa.Column(column.name, column.type) for column in columns],
        schema=warehouse.schema,
    )
    plain.create(warehouse.engine)
    try:
        started = time.perf_counter()
        with warehouse.engine.begin() as connection:
            if warehouse.dialect == "postgresql":
                target = sql.Identifier(*([warehouse.schema] if warehouse.schema else []), plain.name)
                copy_rows(connection, target, to_arrow_table(frame, columns))
            else:
                for records in iter_records(frame, columns, INSERT_BATCH_ROWS):
                    connection.execute(plain.insert(), records)
        return time.perf_counter() - started
    finally:
        plain.drop(warehouse.engine)


def time_publish(warehouse: Warehouse, frame: pd.DataFrame) -> float:
    """Return the seconds publish_scores takes for ``frame`` as of AS_OF."""
    account_ltv = empty_account_ltv(warehouse.outputs["account_ltv"])
    started = time.perf_counter()
    counts = publish_scores(warehouse, AS_OF, RUN_ID, frame, account_ltv, frontier_rows())
    seconds = time.perf_counter() - started
    if counts["lead_scores"] != len(frame):
        raise RuntimeError(f"published {counts['lead_scores']:,} lead_scores rows, expected {len(frame):,}")
    return seconds


def open_warehouse(url: str) -> tuple[Warehouse, str | None]:
    """Open the warehouse at ``url``, in a new schema on PostgreSQL; return it and the schema.

    Raises SystemExit for a SQLite file that exists already, whose output tables the
    benchmark would overwrite.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and Path(parsed.database).exists():
        raise SystemExit(
            f"the SQLite file {parsed.database} exists already and publishing would replace its "
            f"{AS_OF} scores; give the path of a file that does not exist yet, or omit --url"
        )
    engine = create_engine_for(url)
    schema = None
    if engine.dialect.name == "postgresql":
        schema = f"bench_publish_{uuid.uuid4().hex[:8]}"
    warehouse = Warehouse(engine=engine, schema=schema)
    warehouse.create_output_tables()
    return warehouse, schema


def drop_schema(warehouse: Warehouse, schema: str | None) -> None:
    if schema is None:
        return
    with warehouse.engine.begin() as connection:
        connection.execute(sa.schema.DropSchema(schema, cascade=True))


def format_report(rows: int, seconds: dict[str, float], dialect: str) -> str:
    """Return the Markdown table of seconds, rows per second and ratio to the raw write."""
    raw_label = "raw COPY, no index" if dialect == "postgresql" else "raw executemany, no index"
    labels = {"raw": raw_label, "publish": "publish_scores, new date", "republish": "publish_scores, same date again"}
    lines = [
        "| write | seconds | rows/s | throughput ours/raw |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, label in labels.items():
        ratio = "" if name == "raw" else f"{seconds['raw'] / seconds[name]:.2f}"
        lines.append(f"| {label} | {seconds[name]:.2f} | {rows / seconds[name]:,.0f} | {ratio} |")
    return "\n".join(lines)


def describe_machine(warehouse: Warehouse) -> str:
    with warehouse.engine.connect() as connection:
        if warehouse.dialect == "postgresql":
            server = connection.execute(sa.text("SHOW server_version")).scalar_one()
            database = f"PostgreSQL {server}"
        else:
            database = f"SQLite {connection.exec_driver_sql('SELECT sqlite_version()').scalar_one()}"
    return (
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"pandas {pd.__version__}, pyarrow {pa.__version__}, psycopg {psycopg.__version__}, {database}"
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    frame = build_lead_scores(arguments.rows, arguments.seed)
    with tempfile.TemporaryDirectory(prefix="fulcrum-bench-") as folder:
        url = arguments.url or f"sqlite:///{Path(folder) / 'warehouse.db'}"
        warehouse, schema = open_warehouse(url)
        try:
            seconds = {
                "raw": time_raw_write(
                    warehouse,
                    warehouse.outputs["lead_scores"],
                    frame.assign(as_of=AS_OF, run_id=RUN_ID),
                ),
                "publish": time_publish(warehouse, frame),
                "republish": time_publish(warehouse, frame),
            }
            machine = describe_machine(warehouse)
        finally:
            drop_schema(warehouse, schema)
            warehouse.engine.dispose()

    print(f"{arguments.rows:,} lead_scores rows into {redact_url(url)}")
    print(machine)
    print()
    print(format_report(arguments.rows, seconds, warehouse.dialect))
    return 0


if __name__ == "__main__":
    sys.exit(main())
