"""The check before extract that the MLflow tracking store can be reached and used."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.exceptions import MlflowException

from fulcrum.tracking import (
    CHECK_ENDPOINT,
    TrackingStoreError,
    check_tracking_store,
    describe_request_failure,
)

SERVER_ADVICE = (
    "Check that the MLflow server is running and that this host can reach it, or set "
    "mlflow_tracking_uri (or mlflow_tracking_uri_secret_block) to the right store"
)


class FakeTrackingServer:
    """An HTTP server on 127.0.0.1 that gives every request the same reply and records it."""

    def __init__(self, status: int, body: str, content_type: str = "application/json") -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                server.requests.append(self.path)
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve():
    servers: list[FakeTrackingServer] = []

    def start(status: int, body: str, content_type: str = "application/json") -> FakeTrackingServer:
        server = FakeTrackingServer(status, body, content_type)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def mlflow_defaults(monkeypatch):
    """MLflow's own retry and timeout defaults, so the check must bound itself."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def closed_local_port() -> int:
    """A loopback port with no listener: bound once to pick it, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


MISSING_EXPERIMENT = json.dumps(
    {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Could not find experiment"}
)


def test_closed_port_names_uri_and_advice():
    port = closed_local_port()

    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(f"http://127.0.0.1:{port}", "fulcrum")

    assert str(raised.value) == (
        f"the MLflow tracking store http://127.0.0.1:{port} is unreachable: Connection "
        f"refused. {SERVER_ADVICE}"
    )
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


def test_existing_experiment_passes_with_one_request(serve):
    server = serve(200, json.dumps({"experiment": {"experiment_id": "1", "name": "fulcrum"}}))

    check_tracking_store(server.uri, "fulcrum")

    assert len(server.requests) == 1
    request = urlsplit(server.requests[0])
    assert request.path == CHECK_ENDPOINT
    assert parse_qs(request.query) == {"experiment_name": ["fulcrum"]}


def test_missing_experiment_passes(serve):
    server = serve(404, MISSING_EXPERIMENT)

    check_tracking_store(server.uri, "fulcrum")

    assert len(server.requests) == 1


def test_server_error_is_not_retried(serve, caplog):
    # MLflow's default would try a 503 again 7 times, with backoff, before giving up.
    server = serve(503, json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE"}))

    with caplog.at_level("WARNING", logger="fulcrum.tracking"):
        check_tracking_store(server.uri, "fulcrum")

    assert len(server.requests) == 1
    assert caplog.messages == [
        f"The MLflow tracking store {server.uri} replied HTTP 503 Service Unavailable to the "
        f"check before extract. The run goes on, because MLflow retries such replies itself"
    ]


@pytest.mark.parametrize(("status", "reason"), [(401, "Unauthorized"), (403, "Forbidden")])
def test_rejected_credentials_fail(serve, status, reason):
    server = serve(status, json.dumps({"error_code": "UNAUTHENTICATED"}))

    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(server.uri, "fulcrum")

    assert str(raised.value) == (
        f"the MLflow tracking store {server.uri} rejected the request with HTTP {status} "
        f"{reason}. Check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
        f"MLFLOW_TRACKING_TOKEN, in the environment of the run"
    )


def test_server_that_is_not_mlflow_fails(serve):
    server = serve(404, "<html>Not Found</html>", content_type="text/html")

    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(server.uri, "fulcrum")

    message = str(raised.value)
    assert message.startswith(
        f"the MLflow tracking store {server.uri} replied HTTP 404 Not Found to GET "
        f"{CHECK_ENDPOINT}, which an MLflow tracking server does not. "
    )
    assert "base URL, including the path prefix" in message


def test_silent_server_times_out():
    # A listening socket that never accepts: the connection opens, and no reply ever comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"

        with pytest.raises(TrackingStoreError) as raised:
            check_tracking_store(uri, "fulcrum", timeout_seconds=0.5)

    assert str(raised.value) == (
        f"the MLflow tracking store {uri} did not reply within 0.5 s. {SERVER_ADVICE}"
    )


def test_sqlite_store_under_a_file_fails(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    uri = f"sqlite:///{blocker}/nested/mlflow.db"

    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(uri, "fulcrum")

    assert str(raised.value) == (
        f"the MLflow tracking store {uri} cannot be created: {blocker} is a file, not a "
        f"folder. Move that file away, or set mlflow_tracking_uri to a store in another folder"
    )


def test_new_sqlite_store_passes_and_creates_nothing(tmp_path):
    folder = tmp_path / "var" / "mlflow"

    check_tracking_store(f"sqlite:///{folder}/mlflow.db", "fulcrum")
    check_tracking_store(f"sqlite:///{tmp_path}/mlflow.db", "fulcrum")

    assert list(tmp_path.iterdir()) == []


def test_relative_sqlite_path_uses_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var").write_text("a file named like the default store's folder")

    with pytest.raises(TrackingStoreError, match="cannot be created: var is a file, not a folder"):
        check_tracking_store("sqlite:///var/mlflow.db", "fulcrum")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root may write to any folder, so a read-only folder cannot be made for it",
)
def test_read_only_folder_fails(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        expected = re.escape(f"the folder {folder} is not writable")
        with pytest.raises(TrackingStoreError, match=expected):
            check_tracking_store(f"sqlite:///{folder}/mlflow.db", "fulcrum")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("form", ["file_uri", "plain_path"])
def test_file_store_under_a_file_fails(tmp_path, form):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    uri = (blocker / "mlruns").as_uri() if form == "file_uri" else str(blocker / "mlruns")

    expected = re.escape(f"cannot be created: {blocker} is a file")
    with pytest.raises(TrackingStoreError, match=expected):
        check_tracking_store(uri, "fulcrum")


def test_unreachable_database_hides_password():
    port = closed_local_port()
    uri = f"postgresql+psycopg://scorer:Canary-Pw-7@127.0.0.1:{port}/mlflow"

    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(uri, "fulcrum")

    message = str(raised.value)
    assert "Canary-Pw-7" not in message
    assert message.startswith(
        f"the MLflow tracking store postgresql+psycopg://scorer:***@127.0.0.1:{port}/mlflow is "
        f"unreachable: OperationalError: "
    )
    assert "Connection refused" in message
    assert message.endswith(
        "Check that the database server is running and accepts this user from this host, or "
        "set mlflow_tracking_uri (or mlflow_tracking_uri_secret_block) to the right store"
    )


def test_missing_database_driver_fails():
    if importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here, so the URI names no missing driver")
    port = closed_local_port()
    uri = f"postgresql+psycopg2://scorer@127.0.0.1:{port}/mlflow"

    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(uri, "fulcrum")

    assert "names a database driver that is not installed (No module named 'psycopg2')" in str(
        raised.value
    )


@pytest.mark.postgres
def test_reachable_database_passes(postgres_url):
    check_tracking_store(postgres_url, "fulcrum")


def test_unchecked_scheme_passes():
    check_tracking_store("databricks://profile", "fulcrum")


def test_request_failure_without_os_error_keeps_first_line():
    error = MlflowException("API request failed\nwith a second line")

    assert describe_request_failure(error, 5) == "is unreachable: API request failed"
