"""Publish replaces one date's partition atomically and keeps an audit row per run."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa

import tasks.publish_postgres as publish_postgres
from fulcrum.warehouse import Warehouse, create_engine_for
from tasks import publish
from tasks.publish import publish_scores, record_run_end, record_run_start

AS_OF = dt.date(2024, 4, 1)

# Text that CSV, COPY or an ASCII assumption could break. The longest key is 10,000
# characters that compress well, because PostgreSQL rejects a B-tree index entry above
# about 2,700 bytes after compression.
AWKWARD_LEAD_IDS = [
    "comma, inside",
    'quote " inside',
    "new\nline",
    "carriage\r\nreturn",
    "tab\tand \\ backslash",
    "\\.",
    "",
    "NULL",
    "客户-线索-0001",
    "عميل-محتمل-٠٠٢",
    "🚀-lead-🎯",
    "L" + "é" * 9_999,
]
# 10,000 characters with commas, quotes, newlines and non-Latin scripts, for a column
# without an index.
LONG_SEGMENT = ('Ωmega, "quoted"\nline 北京 🚀 ' * 400)[:10_000]


def score_rows(lead_ids: list[str], p: float = 0.5) -> pd.DataFrame:
    count = len(lead_ids)
    return pd.DataFrame(
        {
            "lead_id": lead_ids,
            "p_convert": [p] * count,
            "predicted_ltv": [1000.0] * count,
            "expected_value": [p * 1000.0] * count,
            "overlay_weight": [0.5] * count,
            "overlay_score": [0.1] * count,
            "rank_volume": list(range(1, count + 1)),
            "rank_value": list(range(1, count + 1)),
            "rank_expected_value": list(range(1, count + 1)),
            "rank_overlay": list(range(1, count + 1)),
            "route": ["nurture"] * count,
            "conversion_model_version": ["1"] * count,
            "value_model_version": [None] * count,
        }
    )


def ltv_rows(account_ids: list[str]) -> pd.DataFrame:
    count = len(account_ids)
    return pd.DataFrame(
        {
            "account_id": account_ids,
            "segment": ["growth"] * count,
            "currency": ["USD"] * count,
            "months_billed": [2.0] * count,
            "revenue": [200.0] * count,
            "cost": [40.0] * count,
            "arpu": [100.0] * count,
            "gross_margin": [0.8] * count,
            "churn_rate": [0.02] * count,
            "expected_lifetime_months": [50.0] * count,
            "ltv": [4000.0] * count,
            "is_active": [True] * count,
        }
    )


def frontier_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "overlay_weight": [0.0, 0.5, 1.0],
            "capacity": [2, 2, 2],
            "expected_conversions": [1.0, 0.9, 0.5],
            "expected_value": [500.0, 700.0, 900.0],
        }
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def warehouse(request, tmp_path) -> Warehouse:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'out.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    warehouse = Warehouse(engine=create_engine_for(url))
    warehouse.metadata.drop_all(warehouse.engine)
    warehouse.create_output_tables()
    yield warehouse
    warehouse.engine.dispose()


@pytest.fixture
def postgres_warehouse(postgres_url) -> Warehouse:
    warehouse = Warehouse(engine=create_engine_for(postgres_url))
    warehouse.metadata.drop_all(warehouse.engine)
    drop_staging_tables(warehouse)
    warehouse.create_output_tables()
    yield warehouse
    warehouse.engine.dispose()


def read_table(warehouse: Warehouse, name: str) -> pd.DataFrame:
    with warehouse.engine.connect() as connection:
        return pd.read_sql_query(sa.select(warehouse.outputs[name]), connection)


def read_rows(warehouse: Warehouse, name: str, key: str) -> dict[str, dict]:
    """Return the rows of output table ``name`` as dicts, keyed by column ``key``."""
    table = warehouse.outputs[name]
    with warehouse.engine.connect() as connection:
        rows = connection.execute(sa.select(table)).mappings().all()
    return {row[key]: dict(row) for row in rows}


def read_with(engine: sa.Engine, name: str) -> list[tuple[str, str]]:
    """Return the (lead_id, run_id) pairs of ``name``, read on a connection of ``engine``."""
    with engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT lead_id, run_id FROM {name} ORDER BY lead_id"))
        return [tuple(row) for row in rows]


def partitions(warehouse: Warehouse, name: str) -> list[str]:
    with warehouse.engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT inhrelid::regclass::text FROM pg_inherits "
                "WHERE inhparent = CAST(:name AS regclass) ORDER BY 1"
            ),
            {"name": name},
        ).scalars().all()


def staging_tables(warehouse: Warehouse) -> list[str]:
    with warehouse.engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT relname FROM pg_class WHERE relname LIKE '%\\_staging\\_%' "
                "AND relkind = 'r' ORDER BY 1"
            )
        ).scalars().all()


def drop_staging_tables(warehouse: Warehouse) -> None:
    with warehouse.engine.begin() as connection:
        for name in staging_tables(warehouse):
            connection.exec_driver_sql(f'DROP TABLE "{name}"')


def test_create_output_tables_is_idempotent(warehouse):
    assert warehouse.create_output_tables() == []
    names = set(sa.inspect(warehouse.engine).get_table_names())
    assert {"lead_scores", "account_ltv", "score_runs", "volume_value_frontier"} <= names


@pytest.mark.postgres
def test_output_tables_partitioned_by_as_of(postgres_warehouse):
    with postgres_warehouse.engine.connect() as connection:
        kinds = dict(
            connection.execute(
                sa.text(
                    "SELECT relname, CAST(relkind AS text) || ' ' || coalesce(pg_get_partkeydef(oid), '') "
                    "FROM pg_class WHERE relname IN ('lead_scores', 'account_ltv', "
                    "'volume_value_frontier', 'score_runs') AND relkind IN ('r', 'p')"
                )
            ).all()
        )

    assert kinds == {
        "lead_scores": "p LIST (as_of)",
        "account_ltv": "p LIST (as_of)",
        "volume_value_frontier": "p LIST (as_of)",
        "score_runs": "r ",
    }


def test_publish_same_date_twice_leaves_one_copy(warehouse):
    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    publish_scores(warehouse, AS_OF, "run-2", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())

    scores = read_table(warehouse, "lead_scores")
    assert sorted(scores["lead_id"]) == ["L1", "L2"]
    assert set(scores["run_id"]) == {"run-2"}
    assert len(read_table(warehouse, "account_ltv")) == 1
    assert len(read_table(warehouse, "volume_value_frontier")) == 3


@pytest.mark.postgres
def test_republish_swaps_partition(postgres_warehouse):
    warehouse = postgres_warehouse
    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    publish_scores(warehouse, AS_OF, "run-2", score_rows(["L2"]), ltv_rows([]), frontier_rows())

    assert partitions(warehouse, "lead_scores") == ["lead_scores_20240401"]
    assert partitions(warehouse, "account_ltv") == ["account_ltv_20240401"]
    assert partitions(warehouse, "volume_value_frontier") == ["volume_value_frontier_20240401"]
    assert staging_tables(warehouse) == []
    assert read_with(warehouse.engine, "lead_scores_20240401") == [("L2", "run-2")]
    assert read_table(warehouse, "account_ltv").empty


@pytest.mark.postgres
def test_partition_found_by_bound_not_name(postgres_warehouse):
    warehouse = postgres_warehouse
    with warehouse.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE lead_scores_manual PARTITION OF lead_scores FOR VALUES IN ('2024-04-01')"
        )
        connection.exec_driver_sql(
            "INSERT INTO lead_scores_manual VALUES ('2024-04-01', 'L0', 0.5, NULL, NULL, 0.5, 0.1, "
            "1, NULL, NULL, 1, 'nurture', '1', NULL, 'manual')"
        )

    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1"]), ltv_rows([]), frontier_rows())

    assert partitions(warehouse, "lead_scores") == ["lead_scores_20240401"]
    assert read_with(warehouse.engine, "lead_scores") == [("L1", "run-1")]


def test_publish_keeps_other_dates(warehouse):
    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    later = AS_OF + dt.timedelta(days=1)
    publish_scores(warehouse, later, "run-2", score_rows(["L1", "L9"]), ltv_rows([]), frontier_rows())

    scores = read_table(warehouse, "lead_scores")
    counts = scores.groupby(scores["as_of"].astype(str)).size().to_dict()
    assert counts == {"2024-04-01": 1, "2024-04-02": 2}
    runs = scores.groupby(scores["as_of"].astype(str))["run_id"].unique().map(list).to_dict()
    assert runs == {"2024-04-01": ["run-1"], "2024-04-02": ["run-2"]}


def test_awkward_values_round_trip(warehouse):
    scores = pd.DataFrame(
        {
            "lead_id": AWKWARD_LEAD_IDS,
            "p_convert": [0.1, 1 / 3, 1e-300, 5e-324, 0.0, -0.0, 1.0, 0.7, 0.2, 2.0**-52, 0.9, 0.5],
            "predicted_ltv": [float("nan"), None, float("inf"), float("-inf"), 1e300, 12.5,
                              0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            "expected_value": [None] * 12,
            "overlay_weight": [0.5] * 12,
            "overlay_score": [-1.25] * 12,
            "rank_volume": list(range(1, 13)),
            # Whole floats with NaN, the dtype pandas gives an integer column with gaps.
            "rank_value": [1.0, float("nan"), 3.0, None, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
            "rank_expected_value": pd.array([None, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], dtype="Int64"),
            "rank_overlay": list(range(12, 0, -1)),
            "route": ["sales", "nurture", "", "a,b", 'q"', "x\ny", "é", "中", "🚀", "s", "n", "d"],
            "conversion_model_version": ["1"] * 12,
            "value_model_version": [None, "", "v,1", 'v"2', "v\n3", None, "7", "8", "9", "10", "11", "12"],
        }
    )
    labels = pd.DataFrame(
        {
            "account_id": ["A,1", "账户-北京-01", "A" * 10_000],
            "segment": [LONG_SEGMENT, None, ""],
            "currency": ["USD", "EUR", "JPY"],
            "months_billed": [1.0, 2.5, 0.0],
            "revenue": [0.1, -20.0, 1e15],
            "cost": [0.0, 0.0, 0.0],
            "arpu": [None, float("nan"), 3.25],
            "gross_margin": [0.8, None, 1.0],
            "churn_rate": [0.02, 0.0, None],
            "expected_lifetime_months": [50.0, None, 1.0],
            "ltv": [4000.0, None, -1.5],
            "is_active": [True, False, True],
        }
    )

    publish_scores(warehouse, AS_OF, "run,\"1\"", scores, labels, frontier_rows())

    stored = read_rows(warehouse, "lead_scores", "lead_id")
    assert sorted(stored) == sorted(AWKWARD_LEAD_IDS)
    assert stored["comma, inside"] == {
        "as_of": AS_OF, "lead_id": "comma, inside", "p_convert": 0.1, "predicted_ltv": None,
        "expected_value": None, "overlay_weight": 0.5, "overlay_score": -1.25,
        "rank_volume": 1, "rank_value": 1, "rank_expected_value": None, "rank_overlay": 12,
        "route": "sales", "conversion_model_version": "1", "value_model_version": None,
        "run_id": "run,\"1\"",
    }
    by_position = [stored[lead_id] for lead_id in AWKWARD_LEAD_IDS]
    assert [row["p_convert"] for row in by_position] == [
        0.1, 1 / 3, 1e-300, 5e-324, 0.0, 0.0, 1.0, 0.7, 0.2, 2.0**-52, 0.9, 0.5
    ]
    assert [row["predicted_ltv"] for row in by_position] == [
        None, None, float("inf"), float("-inf"), 1e300, 12.5, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0
    ]
    assert [row["rank_value"] for row in by_position] == [1, None, 3, None, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [row["rank_expected_value"] for row in by_position] == [None, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [row["route"] for row in by_position] == ["sales", "nurture", "", "a,b", 'q"', "x\ny", "é", "中", "🚀", "s", "n", "d"]
    assert [row["value_model_version"] for row in by_position] == [
        None, "", "v,1", 'v"2', "v\n3", None, "7", "8", "9", "10", "11", "12"
    ]

    accounts = read_rows(warehouse, "account_ltv", "account_id")
    assert accounts["A,1"]["segment"] == LONG_SEGMENT
    assert len(accounts["A,1"]["segment"]) == 10_000
    assert accounts["账户-北京-01"]["segment"] is None
    assert accounts["A" * 10_000]["segment"] == ""
    assert [accounts[key]["is_active"] for key in ("A,1", "账户-北京-01", "A" * 10_000)] == [True, False, True]
    assert [accounts[key]["arpu"] for key in ("A,1", "账户-北京-01", "A" * 10_000)] == [None, None, 3.25]
    assert [accounts[key]["revenue"] for key in ("A,1", "账户-北京-01", "A" * 10_000)] == [0.1, -20.0, 1e15]
    assert {row["as_of"] for row in accounts.values()} == {AS_OF}


def test_fractional_rank_rejected_before_any_change(warehouse):
    publish_scores(warehouse, AS_OF, "good", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    bad = score_rows(["L7", "L8"]).assign(rank_volume=[1.0, 2.5])

    with pytest.raises(ValueError, match=r"column lead_scores\.rank_volume .*2\.5.*INTEGER"):
        publish_scores(warehouse, AS_OF, "bad", bad, ltv_rows(["A7"]), frontier_rows())

    assert read_table(warehouse, "lead_scores")["run_id"].tolist() == ["good"]
    assert read_table(warehouse, "account_ltv")["account_id"].tolist() == ["A1"]


def test_null_capacity_raises_integrity_error(warehouse):
    publish_scores(warehouse, AS_OF, "good", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    frontier = frontier_rows().assign(capacity=[2, None, 2])

    with pytest.raises(sa.exc.IntegrityError, match="capacity"):
        publish_scores(warehouse, AS_OF, "bad", score_rows(["L7"]), ltv_rows(["A7"]), frontier)

    assert read_table(warehouse, "lead_scores")["run_id"].tolist() == ["good"]
    assert read_table(warehouse, "volume_value_frontier")["run_id"].tolist() == ["good"] * 3


def test_failure_while_writing_keeps_previous_partition(warehouse, monkeypatch):
    publish_scores(warehouse, AS_OF, "good", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    # Each backend's per-table write: the insert on SQLite, the COPY into staging on PostgreSQL.
    module, name = (
        (publish, "replace_partition") if warehouse.dialect == "sqlite"
        else (publish_postgres, "stage_partition")
    )
    original = getattr(module, name)

    def fail_on_frontier(connection, *arguments):
        written = original(connection, *arguments)
        table = next(argument for argument in arguments if isinstance(argument, sa.Table))
        if table.name == "volume_value_frontier":
            raise ConnectionError("connection dropped while writing")
        return written

    monkeypatch.setattr(module, name, fail_on_frontier)
    with pytest.raises(ConnectionError):
        publish_scores(warehouse, AS_OF, "bad", score_rows(["L7"]), ltv_rows(["A7"]), frontier_rows())

    scores = read_table(warehouse, "lead_scores")
    assert sorted(scores["lead_id"]) == ["L1", "L2"]
    assert set(scores["run_id"]) == {"good"}
    assert read_table(warehouse, "account_ltv")["account_id"].tolist() == ["A1"]
    if warehouse.dialect == "postgresql":
        assert staging_tables(warehouse) == []


@pytest.mark.postgres
def test_failure_before_swap_drops_staging(postgres_warehouse, monkeypatch):
    warehouse = postgres_warehouse
    publish_scores(warehouse, AS_OF, "good", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    seen_staging = []

    def fail_before_swap(connection, staged, as_of):
        seen_staging.extend(staging_tables(warehouse))
        raise ConnectionError("connection dropped before the swap")

    monkeypatch.setattr(publish_postgres, "swap_partition", fail_before_swap)
    with pytest.raises(ConnectionError):
        publish_scores(warehouse, AS_OF, "bad", score_rows(["L7"]), ltv_rows(["A7"]), frontier_rows())

    assert len(seen_staging) == 3
    assert staging_tables(warehouse) == []
    assert read_with(warehouse.engine, "lead_scores") == [("L1", "good"), ("L2", "good")]
    assert read_table(warehouse, "account_ltv")["run_id"].tolist() == ["good"]
    assert partitions(warehouse, "lead_scores") == ["lead_scores_20240401"]


@pytest.mark.postgres
def test_failure_mid_swap_rolls_back(postgres_warehouse, monkeypatch):
    warehouse = postgres_warehouse
    publish_scores(warehouse, AS_OF, "good", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    original = publish_postgres.swap_partition

    def fail_on_frontier(connection, staged, as_of):
        if staged.table.name == "volume_value_frontier":
            raise ConnectionError("connection dropped during the swap")
        original(connection, staged, as_of)

    monkeypatch.setattr(publish_postgres, "swap_partition", fail_on_frontier)
    with pytest.raises(ConnectionError):
        publish_scores(warehouse, AS_OF, "bad", score_rows(["L7"]), ltv_rows(["A7"]), frontier_rows())

    assert read_with(warehouse.engine, "lead_scores") == [("L1", "good")]
    assert read_table(warehouse, "account_ltv")["run_id"].tolist() == ["good"]
    assert set(read_table(warehouse, "volume_value_frontier")["run_id"]) == {"good"}
    assert partitions(warehouse, "lead_scores") == ["lead_scores_20240401"]
    assert staging_tables(warehouse) == []


@pytest.mark.postgres
def test_unpartitioned_table_uses_delete_insert(postgres_warehouse, caplog, monkeypatch):
    warehouse = postgres_warehouse
    monkeypatch.setattr(publish_postgres, "_reported_unpartitioned", set())
    # lead_scores as an earlier version created it: a plain table, ids VARCHAR(255).
    with warehouse.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE lead_scores")
        connection.exec_driver_sql(
            "CREATE TABLE lead_scores (as_of DATE NOT NULL, lead_id VARCHAR(255) NOT NULL, "
            "p_convert FLOAT NOT NULL, predicted_ltv FLOAT, expected_value FLOAT, "
            "overlay_weight FLOAT NOT NULL, overlay_score FLOAT NOT NULL, "
            "rank_volume INTEGER NOT NULL, rank_value INTEGER, rank_expected_value INTEGER, "
            "rank_overlay INTEGER NOT NULL, route VARCHAR(16) NOT NULL, "
            "conversion_model_version VARCHAR(64) NOT NULL, value_model_version VARCHAR(64), "
            "run_id VARCHAR(64) NOT NULL, PRIMARY KEY (as_of, lead_id))"
        )
    later = AS_OF + dt.timedelta(days=1)

    with caplog.at_level(logging.WARNING, logger="tasks.publish_postgres"):
        publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
        publish_scores(warehouse, AS_OF, "run-2", score_rows(["L3"]), ltv_rows(["A2"]), frontier_rows())
        counts = publish_scores(warehouse, later, "run-3", score_rows(["L1"]), ltv_rows([]), frontier_rows())

    assert counts == {"lead_scores": 1, "account_ltv": 0, "volume_value_frontier": 3}
    rows = read_table(warehouse, "lead_scores").sort_values("lead_id")
    assert rows[["lead_id", "run_id"]].values.tolist() == [["L1", "run-3"], ["L3", "run-2"]]
    assert rows["as_of"].tolist() == [later, AS_OF]
    warnings = [r.getMessage() for r in caplog.records if "not partitioned" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("output table public.lead_scores is not partitioned by as_of")
    assert partitions(warehouse, "lead_scores") == []
    assert partitions(warehouse, "account_ltv") == ["account_ltv_20240401", "account_ltv_20240402"]
    assert staging_tables(warehouse) == []


def test_reader_sees_old_rows_until_commit(warehouse, monkeypatch):
    publish_scores(warehouse, AS_OF, "old", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    reader = create_engine_for(warehouse.engine.url.render_as_string(hide_password=False))
    seen_during = []
    # SQLite: read after lead_scores and account_ltv are rewritten, before the frontier's turn.
    # PostgreSQL: read after all three tables are staged, before the first swap, because a
    # read during the swap waits for its locks.
    module, name, table_name = (
        (publish, "replace_partition", "volume_value_frontier") if warehouse.dialect == "sqlite"
        else (publish_postgres, "swap_partition", "lead_scores")
    )
    original = getattr(module, name)

    def read_then_write(connection, *arguments):
        table = next(
            argument if isinstance(argument, sa.Table) else argument.table
            for argument in arguments
            if isinstance(argument, (sa.Table, publish_postgres.StagedTable))
        )
        if table.name == table_name:
            seen_during.append(read_with(reader, "lead_scores"))
        return original(connection, *arguments)

    monkeypatch.setattr(module, name, read_then_write)
    publish_scores(warehouse, AS_OF, "new", score_rows(["L3"]), ltv_rows(["A3"]), frontier_rows())
    seen_after = read_with(reader, "lead_scores")
    reader.dispose()

    assert seen_during == [[("L1", "old"), ("L2", "old")]]
    assert seen_after == [("L3", "new")]


class BlockingReader:
    """A connection that has read lead_scores and keeps its transaction open."""

    def __init__(self, url: str):
        self.engine = create_engine_for(url)
        self.connection = self.engine.connect()
        self.connection.begin()

    def read(self) -> list[tuple[str, str]]:
        rows = self.connection.execute(sa.text("SELECT lead_id, run_id FROM lead_scores ORDER BY lead_id"))
        return [tuple(row) for row in rows]

    def close(self) -> None:
        self.connection.rollback()
        self.connection.close()
        self.engine.dispose()


def wait_for_lock_wait(warehouse: Warehouse, publisher: threading.Thread) -> None:
    """Return once another session waits for a lock; fail if the publisher ends first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with warehouse.engine.connect() as connection:
            waiting = connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar_one()
        if waiting:
            return
        if not publisher.is_alive():
            raise AssertionError("the publish finished without waiting for the reader's lock")
        time.sleep(0.05)
    raise AssertionError("the publish did not reach the swap within 60 s")


@pytest.mark.postgres
def test_swap_waits_for_open_reader(postgres_warehouse):
    warehouse = postgres_warehouse
    publish_scores(warehouse, AS_OF, "old", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    url = warehouse.engine.url.render_as_string(hide_password=False)
    reader = BlockingReader(url)
    errors: list[BaseException] = []

    def publish_new() -> None:
        try:
            publish_scores(warehouse, AS_OF, "new", score_rows(["L3"]), ltv_rows(["A3"]), frontier_rows())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    try:
        first = reader.read()
        publisher = threading.Thread(target=publish_new)
        publisher.start()
        wait_for_lock_wait(warehouse, publisher)
        second = reader.read()
    finally:
        reader.close()
    publisher.join(timeout=60)

    assert errors == []
    assert first == second == [("L1", "old"), ("L2", "old")]
    assert read_with(warehouse.engine, "lead_scores") == [("L3", "new")]


@pytest.mark.postgres
def test_attach_skips_validation_scan(postgres_warehouse):
    url = postgres_warehouse.engine.url.render_as_string(hide_password=False)
    warehouse = Warehouse(engine=create_engine_for(url))
    notices: list[str] = []

    @sa.event.listens_for(warehouse.engine, "connect")
    def _collect_debug_notices(dbapi_connection, _record):
        dbapi_connection.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary))
        dbapi_connection.execute("SET client_min_messages = debug1")
        dbapi_connection.commit()

    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    publish_scores(warehouse, AS_OF, "run-2", score_rows(["L2"]), ltv_rows(["A2"]), frontier_rows())
    warehouse.engine.dispose()

    implied = [notice for notice in notices if "is implied by existing constraints" in notice]
    assert implied == [
        f'partition constraint for table "{name}_20240401" is implied by existing constraints'
        for name in ("lead_scores", "account_ltv", "volume_value_frontier")
    ] * 2


@pytest.mark.postgres
def test_abandoned_staging_tables_dropped(postgres_warehouse, caplog):
    warehouse = postgres_warehouse
    live = warehouse.engine.connect()
    live_comment = publish_postgres._staging_comment(live)
    pid, started = live_comment.split(" server process ")[1].split(" started at ")
    started = int(started.split()[0])
    prefix = publish_postgres.STAGING_COMMENT_PREFIX
    comments = {
        "lead_scores_staging_live": live_comment,
        # The same pid, reused by a server process that started later.
        "lead_scores_staging_reused": f"{prefix} of server process {pid} started at {started - 1} us since 1970",
        # Linux pids are at most 2**22 (pid_max), so no process has this one.
        "lead_scores_staging_ended": f"{prefix} of server process 4194305 started at {started} us since 1970",
    }
    with warehouse.engine.begin() as connection:
        for name, comment in comments.items():
            connection.exec_driver_sql(f"CREATE TABLE {name} (LIKE lead_scores)")
            connection.exec_driver_sql(f"COMMENT ON TABLE {name} IS '{comment}'")

    try:
        with caplog.at_level(logging.WARNING, logger="tasks.publish_postgres"):
            publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
        remaining = staging_tables(warehouse)
    finally:
        live.close()
        drop_staging_tables(warehouse)

    assert remaining == ["lead_scores_staging_live"]
    assert "dropped staging table public.lead_scores_staging_ended" in caplog.text
    assert "dropped staging table public.lead_scores_staging_reused" in caplog.text
    assert read_with(warehouse.engine, "lead_scores") == [("L1", "run-1")]


def test_failed_staging_drop_logged_not_raised(caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/test")
    table = Warehouse(engine=engine).outputs["lead_scores"]
    staged = publish_postgres.StagedTable(
        table=table, schema="public", name="lead_scores_staging_0", columns=(), partitioned=True, rows=0
    )

    with caplog.at_level(logging.WARNING, logger="tasks.publish_postgres"):
        publish_postgres.drop_staging_tables(engine, [staged])
    engine.dispose()

    assert "could not drop the staging tables public.lead_scores_staging_0 after a failed publish" in caplog.text
    assert "Connection refused" in caplog.text


def test_driver_other_than_psycopg_rejected():
    engine = sa.create_engine("postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    table = Warehouse(engine=engine).outputs["lead_scores"]

    with pytest.raises(RuntimeError, match="names the driver 'asyncpg'. Write the URL as postgresql"):
        publish_postgres.publish_by_partition_swap(engine, AS_OF, [(table, score_rows(["L1"]))])
    engine.dispose()


@pytest.mark.postgres
def test_datetime_as_of_rejected(postgres_warehouse):
    with pytest.raises(TypeError, match="as_of must be a datetime.date"):
        publish_scores(
            postgres_warehouse, dt.datetime(2024, 4, 1, 12), "run-1",
            score_rows(["L1"]), ltv_rows([]), frontier_rows(),
        )


def test_iter_records_batches_typed_rows():
    table = Warehouse(engine=sa.create_engine("sqlite://")).outputs["volume_value_frontier"]
    frame = frontier_rows().assign(
        as_of=AS_OF,
        run_id="run-1",
        expected_value=[500.0, float("nan"), None],
        capacity=[2.0, 3.0, 4.0],
    )

    batches = list(publish.iter_records(frame, list(table.columns), batch_rows=2))

    assert batches == [
        [
            {"as_of": AS_OF, "overlay_weight": 0.0, "capacity": 2, "expected_conversions": 1.0,
             "expected_value": 500.0, "run_id": "run-1"},
            {"as_of": AS_OF, "overlay_weight": 0.5, "capacity": 3, "expected_conversions": 0.9,
             "expected_value": None, "run_id": "run-1"},
        ],
        [
            {"as_of": AS_OF, "overlay_weight": 1.0, "capacity": 4, "expected_conversions": 0.5,
             "expected_value": None, "run_id": "run-1"},
        ],
    ]
    assert type(batches[0][0]["capacity"]) is int


def test_publish_writes_more_rows_than_sqlite_variable_limit(warehouse, monkeypatch):
    monkeypatch.setattr(publish, "INSERT_BATCH_ROWS", 7_000)
    lead_ids = [f"L{i:06d}" for i in range(40_000)]

    counts = publish_scores(warehouse, AS_OF, "big", score_rows(lead_ids), ltv_rows([]), frontier_rows())

    assert counts["lead_scores"] == 40_000
    assert len(read_table(warehouse, "lead_scores")) == 40_000


def test_run_audit_row_records_failure(warehouse):
    record_run_start(warehouse, "run-9", "flow-1", "nightly-scores", AS_OF)
    record_run_end(warehouse, "run-9", "failed", failed_stage="validate", message="x" * 10_000,
                   validation_summary={"success": False})

    runs = read_table(warehouse, "score_runs")
    row = runs.iloc[0]
    assert row["status"] == "failed"
    assert row["failed_stage"] == "validate"
    assert len(row["message"]) == publish.MESSAGE_MAX_CHARS
    assert row["validation_summary"] == '{"success": false}'
    assert row["finished_at"] is not None
