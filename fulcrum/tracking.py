"""A quick check, made before a run reads any data, that the MLflow tracking store can be used.

MLflow 3.17 retries a failed HTTP request ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times (default
7) with exponential backoff, and waits up to ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds (default
120) for each reply. With those defaults, one call to a closed local port raised after 247 s
(measured once with MLflow 3.17.2). Without a check, a run would find out in train or score,
after extract, validation and labels. This check makes one request with no retry and a
timeout of a few seconds, and raises ``TrackingStoreError`` with a message that names the
store and what to check.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import sqlalchemy as sa
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from requests.exceptions import Timeout
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fulcrum.settings import redact_url
from fulcrum.warehouse import describe_database_error

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 5.0
"""How long the check waits to connect, and then for the reply, before it fails."""

CHECK_ENDPOINT = "/api/2.0/mlflow/experiments/get-by-name"

_DATABASE_BACKENDS = ("postgresql", "mysql", "mssql")
# Backends whose drivers take a connect timeout in seconds as ``connect_timeout``.
_CONNECT_TIMEOUT_BACKENDS = ("postgresql", "mysql")
_SERVER_ADVICE = (
    "Check that the MLflow server is running and that this host can reach it, or set "
    "mlflow_tracking_uri (or mlflow_tracking_uri_secret_block) to the right store"
)


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store in the settings cannot be reached or used."""

    def __init__(self, uri: str, problem: str, advice: str) -> None:
        self.uri = redact_url(uri)
        super().__init__(f"the MLflow tracking store {self.uri} {problem}. {advice}")


def check_tracking_store(
    uri: str, experiment_name: str, timeout_seconds: float = CHECK_TIMEOUT_SECONDS
) -> None:
    """Raise TrackingStoreError when the tracking store at ``uri`` cannot be reached or used.

    An HTTP(S) server gets one request, with no retry. A database server gets one
    connection. A SQLite file or a local folder is only checked on disk: the folder must be,
    or be creatable as, a writable folder. Other schemes, such as ``databricks``, are not
    checked.
    """
    scheme = urlsplit(uri).scheme.lower()
    backend = scheme.split("+")[0]
    if scheme in ("http", "https"):
        check_http_store(uri, experiment_name, timeout_seconds)
    elif backend == "sqlite":
        database = make_url(uri).database
        if database and database != ":memory:":
            check_local_folder(uri, Path(database).parent)
    elif backend in _DATABASE_BACKENDS:
        check_database_store(uri, timeout_seconds)
    elif scheme == "file":
        check_local_folder(uri, Path(url2pathname(urlsplit(uri).path)))
    elif scheme == "":
        check_local_folder(uri, Path(uri))
    else:
        logger.debug("The MLflow tracking store scheme %r is not checked before the run", scheme)


def check_http_store(uri: str, experiment_name: str, timeout_seconds: float) -> None:
    """Ask an MLflow server for the experiment once, without retrying, and check its reply.

    A reply of 429 or 5xx is logged and accepted, because the server replied and MLflow
    retries such replies on the run's own requests.

    NOTE: The timeout does not cover the lookup of the server's host name, which takes as long
    as the system resolver allows.
    """
    try:
        response = http_request(
            get_default_host_creds(uri),
            CHECK_ENDPOINT,
            "GET",
            max_retries=0,
            backoff_factor=0,
            backoff_jitter=0,
            timeout=timeout_seconds,
            raise_on_status=False,
            params={"experiment_name": experiment_name},
        )
    except MlflowException as exc:
        # The cause is a chain of exceptions from MLflow, requests, urllib3 and the socket.
        # Its one useful line goes into the message, so the chain is only logged at DEBUG.
        logger.debug("The MLflow tracking store check failed", exc_info=True)
        problem = describe_request_failure(exc, timeout_seconds)
        raise TrackingStoreError(uri, problem, _SERVER_ADVICE) from None

    status = response.status_code
    # An experiment that does not exist yet is created by the run's first training.
    error_code = response_error_code(response)
    missing_experiment = status == 404 and error_code == "RESOURCE_DOES_NOT_EXIST"
    if status == 200 or missing_experiment:
        return
    if status in (401, 403):
        raise TrackingStoreError(
            uri,
            f"rejected the request with HTTP {status} {response.reason}",
            "Check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
            "MLFLOW_TRACKING_TOKEN, in the environment of the run",
        )
    if status == 429 or status >= 500:
        logger.warning(
            "The MLflow tracking store %s replied HTTP %d %s to the check before extract. The "
            "run goes on, because MLflow retries such replies itself",
            redact_url(uri), status, response.reason,
        )
        return
    raise TrackingStoreError(
        uri,
        f"replied HTTP {status} {response.reason} to GET {CHECK_ENDPOINT}, which an MLflow "
        f"tracking server does not",
        "Check that mlflow_tracking_uri is the MLflow server's base URL, including the path "
        "prefix when a proxy serves it under one",
    )


def check_database_store(uri: str, timeout_seconds: float) -> None:
    """Open one connection to the database behind ``uri`` and run ``SELECT 1``."""
    url = make_url(uri)
    connect_args = {}
    if url.get_backend_name() in _CONNECT_TIMEOUT_BACKENDS:
        # libpq rounds a connect timeout below 2 s up to 2 s, and the drivers take whole seconds.
        connect_args["connect_timeout"] = max(2, math.ceil(timeout_seconds))
    try:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except ImportError as exc:
        raise TrackingStoreError(
            uri,
            f"names a database driver that is not installed ({exc})",
            "Install that driver, or name an installed one in mlflow_tracking_uri, for "
            "example postgresql+psycopg://",
        ) from None
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        raise TrackingStoreError(
            uri,
            f"is unreachable: {describe_database_error(exc)}",
            "Check that the database server is running and accepts this user from this host, "
            "or set mlflow_tracking_uri (or mlflow_tracking_uri_secret_block) to the right store",
        ) from None
    finally:
        engine.dispose()


def check_local_folder(uri: str, folder: Path) -> None:
    """Check that ``folder`` is a writable folder, or that it can be created as one.

    Nothing is created: MLflow creates the folder and the store on its first call.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrackingStoreError(
            uri,
            f"cannot be created: {existing} is a file, not a folder",
            "Move that file away, or set mlflow_tracking_uri to a store in another folder",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrackingStoreError(
            uri,
            f"cannot be written: the folder {existing} is not writable by this process",
            "Give the user that runs Fulcrum write access to it, or set mlflow_tracking_uri "
            "to a store in another folder",
        )


def describe_request_failure(error: BaseException, timeout_seconds: float) -> str:
    """Return why a request got no reply, from the innermost OS error of its cause chain.

    For example ``is unreachable: Connection refused`` or ``did not reply within 5 s``.
    """
    reason = None
    timed_out = False
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (Timeout, TimeoutError)):
            timed_out = True
        elif isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        current = current.__cause__ or current.__context__
    if timed_out:
        return f"did not reply within {timeout_seconds:g} s"
    if reason is None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = lines[0][:300]
    return f"is unreachable: {reason}"


def response_error_code(response) -> str | None:
    """Return the ``error_code`` of an MLflow JSON error reply, or None for any other body."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error_code") if isinstance(body, dict) else None
