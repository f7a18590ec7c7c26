"""Bulk row transfer: frames converted to their table's SQL types, as CSV for COPY or as Python values.

A frame is converted column by column with pyarrow, never value by value in Python: each
column is cast to the Arrow type of its SQL column, so both backends receive the same
values. NaN, NaT, None and NA become NULL, timestamps become UTC (naive ones are taken to be
UTC, as the data contract states), and a float column written to an INTEGER column must hold
whole numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection

# Rows per CSV chunk sent to COPY, so the client keeps one chunk of text in memory at a
# time rather than the whole table's (about 9 MB for 50,000 rows of lead_scores).
COPY_CHUNK_ROWS = 50_000

# "needed" quotes every string value and leaves NULL as an unquoted empty field, which is
# how PostgreSQL's CSV format distinguishes an empty string from NULL.
_CSV_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="needed")


def arrow_type(column: sa.Column) -> pa.DataType:
    """Return the Arrow type that stores the values of SQL column ``column`` exactly."""
    column_type = column.type
    if isinstance(column_type, sa.DateTime):
        # PostgreSQL stores microseconds, so finer digits are cut when casting.
        return pa.timestamp("us", tz="UTC")
    if isinstance(column_type, sa.Date):
        return pa.date32()
    if isinstance(column_type, sa.Boolean):
        return pa.bool_()
    if isinstance(column_type, sa.Integer):
        return pa.int64()
    if isinstance(column_type, sa.Float):
        return pa.float64()
    if isinstance(column_type, sa.String):
        return pa.large_string()
    raise TypeError(
        f"column {column.table.name}.{column.name} has SQL type {column_type!r}, which bulk "
        f"writes do not convert; supported types are DateTime, Date, Boolean, Integer, Float "
        f"and String"
    )


def to_arrow_table(frame: pd.DataFrame, columns: Sequence[sa.Column]) -> pa.Table:
    """Convert the ``columns`` of ``frame`` to an Arrow table with each column's SQL type.

    Raises ValueError naming the table, the column and the rule when a column cannot be
    converted, for example a float column with fractions written to an INTEGER column.
    """
    arrays = [_convert_column(frame[column.name], column) for column in columns]
    return pa.Table.from_arrays(arrays, names=[column.name for column in columns])


def _convert_column(values: pd.Series, column: sa.Column) -> pa.Array:
    target = arrow_type(column)
    try:
        array = pa.array(values, from_pandas=True)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        options = pc.CastOptions(target_type=target, allow_time_truncate=True)
        return pc.cast(array, options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        examples = values.dropna().head(3).tolist()
        raise ValueError(
            f"column {column.table.name}.{column.name} ({values.dtype} values such as "
            f"{examples!r}) cannot be converted to SQL type {column.type} without changing "
            f"a value: {exc}. Fix the values or their dtype before publishing"
        ) from exc


def iter_csv_chunks(rows: pa.Table, chunk_rows: int = COPY_CHUNK_ROWS) -> Iterator[pa.Buffer]:
    """Yield ``rows`` as UTF-8 CSV without a header, ``chunk_rows`` rows per chunk."""
    for batch in rows.to_batches(max_chunksize=chunk_rows):
        sink = pa.BufferOutputStream()
        pacsv.write_csv(batch, sink, _CSV_OPTIONS)
        yield sink.getvalue()


def copy_rows(
    connection: Connection, target: sql.Composable, rows: pa.Table, freeze: bool = False
) -> None:
    """COPY ``rows`` into the table ``target`` as CSV, in the connection's open transaction.

    ``freeze`` writes the rows already frozen, which PostgreSQL allows only into a table
    created or truncated in the same transaction. A database error is raised as SQLAlchemy's
    DBAPIError subclass, as for statements that SQLAlchemy runs itself.
    """
    options = sql.SQL("FORMAT csv, ENCODING 'UTF8', FREEZE") if freeze else sql.SQL(
        "FORMAT csv, ENCODING 'UTF8'"
    )
    names = sql.SQL(", ").join(sql.Identifier(name) for name in rows.column_names)
    statement = sql.SQL("COPY {} ({}) FROM STDIN ({})").format(target, names, options)
    driver_connection = connection.connection.driver_connection
    try:
        with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for chunk in iter_csv_chunks(rows):
                copy.write(memoryview(chunk))
    except psycopg.Error as exc:
        text = statement.as_string(driver_connection)
        raise sa.exc.DBAPIError.instance(text, None, exc, psycopg.Error) from exc


def to_python_columns(rows: pa.Table) -> list[list]:
    """Return each column of ``rows`` as a list of Python values, with None for NULL."""
    return [_to_python_list(rows.column(index)) for index in range(rows.num_columns)]


def _to_python_list(column: pa.ChunkedArray) -> list:
    if pa.types.is_date32(column.type):
        # numpy makes datetime.date objects about ten times faster than to_pylist in
        # pyarrow 25 (measured on 1,000,000 dates), and it turns NaT into None.
        return column.to_numpy().astype(object).tolist()
    return column.to_pylist()
