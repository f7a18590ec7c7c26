"""prefect.yaml deploys to a real Prefect server, a worker runs it, and the UI shows the run."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deployments.automation import create_automation
from deployments.render import WORK_POOL, build_config, render, schedule_problems
from fulcrum.settings import Settings
from tests.flows.conftest import AS_OF, FAST_TRAINING_ENV, copy_sqlite

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "prefect.yaml"
SCREENSHOTS = REPO / "var"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
    "--virtual-time-budget=20000",
]
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
}


def committed_config() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def test_every_scheduled_deployment_names_a_time_zone():
    config = committed_config()

    assert schedule_problems(config) == []
    by_name = {deployment["name"]: deployment for deployment in config["deployments"]}
    assert set(by_name) == {"nightly", "backfill"}
    assert by_name["nightly"]["schedules"] == [
        {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    ]
    assert by_name["backfill"]["schedules"] == []
    for deployment in by_name.values():
        assert deployment["work_pool"]["name"] == WORK_POOL


def test_schedule_without_time_zone_is_reported():
    config = {"deployments": [{"name": "nightly", "schedules": [{"cron": "0 2 * * *"}]}]}

    problems = schedule_problems(config)

    assert len(problems) == 1
    assert "deployment 'nightly' schedule 0 has no timezone" in problems[0]


def test_schedule_with_unknown_time_zone_is_reported():
    config = {"deployments": [{"name": "nightly", "schedules": [{"cron": "0 2 * * *", "timezone": "Mars/Olympus"}]}]}

    assert "not an IANA zone name" in schedule_problems(config)[0]


def test_render_takes_schedule_from_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(business_timezone="America/New_York", nightly_cron="30 1 * * 1-5")

    config = yaml.safe_load(render(settings))

    nightly = config["deployments"][0]
    assert nightly["schedules"] == [
        {"cron": "30 1 * * 1-5", "timezone": "America/New_York", "active": True}
    ]
    assert schedule_problems(config) == []


def test_render_rejects_invalid_cron(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValueError, match="cron"):
        build_config(Settings(nightly_cron="every night at two"))


@dataclass
class PrefectServer:
    url: str
    home: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_env(server: PrefectServer, **extra: str) -> dict[str, str]:
    """The environment of a Prefect CLI process that talks to ``server`` only."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "FULCRUM_"))}
    env.update(TELEMETRY_OFF)
    env["PREFECT_HOME"] = str(server.home / "client")
    env["PREFECT_API_URL"] = server.api_url
    env.update(extra)
    return env


def wait_until_healthy(server: PrefectServer, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (server.home / "server.log").read_text()
            pytest.fail(f"prefect server exited with status {process.returncode}:\n{log[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"prefect server at {server.url} did not answer /api/health within {timeout:.0f} s")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server with its UI on a free loopback port, with a private PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    server = PrefectServer(url=f"http://127.0.0.1:{free_port()}", home=home)
    env = prefect_env(
        server,
        PREFECT_HOME=str(home / "server"),
        PREFECT_UI_API_URL=server.api_url,
        PREFECT_UI_URL=server.url,
    )
    env.pop("PREFECT_API_URL")
    port = server.url.rsplit(":", 1)[1]
    with open(home / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_until_healthy(server, process, timeout=180)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prefect_cli(server: PrefectServer, *args: str, timeout: float = 300, **env: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO, env=prefect_env(server, **env), capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, (
        f"prefect {' '.join(args)} exited with {completed.returncode}:\n"
        f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    return completed.stdout


def call_api(server: PrefectServer, method: str, *args, **kwargs):
    """Call one PrefectClient method against ``server`` and return its result."""
    from prefect.client.orchestration import PrefectClient

    async def call():
        async with PrefectClient(api=server.api_url) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(call())


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """Create the process work pool and run `prefect deploy --all` from the repository root."""
    prefect_cli(prefect_server, "work-pool", "create", WORK_POOL, "--type", "process")
    prefect_cli(prefect_server, "deploy", "--all")
    return prefect_server


@pytest.mark.slow
def test_deploy_all_registers_schedules_and_parameters(deployed):
    nightly = call_api(deployed, "read_deployment_by_name", "nightly-scores/nightly")
    backfill = call_api(deployed, "read_deployment_by_name", "backfill-scores/backfill")
    pool = call_api(deployed, "read_work_pool", WORK_POOL)

    assert pool.type == "process"
    assert nightly.work_pool_name == backfill.work_pool_name == WORK_POOL
    assert len(nightly.schedules) == 1
    schedule = nightly.schedules[0]
    assert schedule.active
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "UTC"
    assert backfill.schedules == []

    nightly_parameters = nightly.parameter_openapi_schema["properties"]
    assert list(nightly_parameters) == ["as_of", "retrain"]
    assert nightly_parameters["retrain"]["default"] is True
    assert {"format": "date", "type": "string"} in nightly_parameters["as_of"]["anyOf"]

    schema = backfill.parameter_openapi_schema
    assert list(schema["properties"]) == ["start", "end", "every", "retrain", "force"]
    assert schema["required"] == ["start", "end"]
    assert schema["properties"]["start"]["format"] == "date"
    assert schema["properties"]["every"]["enum"] == ["day", "week", "month"]
    assert schema["properties"]["every"]["default"] == "day"
    assert schema["properties"]["retrain"]["default"] is False
    assert schema["properties"]["force"]["default"] is False


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed; `apt-get install -y chromium` enables this test")
    return path


def open_in_chromium(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """Return the DOM of ``url`` after its scripts ran, and save a screenshot when asked."""
    command = [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    if screenshot is not None:
        subprocess.run(
            [*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True
        )
    return dom


class NotificationReceiver(http.server.BaseHTTPRequestHandler):
    """A webhook endpoint on loopback that keeps the JSON bodies posted to it."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("content-length", 0))
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the access log
        pass


@pytest.fixture(scope="module")
def notifications(deployed):
    """The failure automation, sending to a custom webhook block that posts to loopback."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    receiver = http.server.HTTPServer(("127.0.0.1", 0), NotificationReceiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    hook_url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    with temporary_settings(updates={PREFECT_API_URL: deployed.api_url}):
        CustomWebhookNotificationBlock(
            name="fulcrum-test", url=hook_url, json_data={"text": "{{subject}}\n{{body}}"}
        ).save("fulcrum-alerts", overwrite=True)
        asyncio.run(create_automation("custom-webhook/fulcrum-alerts"))
    try:
        yield NotificationReceiver.received
    finally:
        receiver.shutdown()
        receiver.server_close()


@pytest.fixture(scope="module")
def worker_runs(deployed, notifications, small_company_db, tmp_path_factory):
    """Two runs of the nightly deployment executed by one process worker: one on the small
    company, which succeeds, and one on an empty warehouse, which fails in the extract stage.
    """
    folder = tmp_path_factory.mktemp("worker-run")
    copy_sqlite(small_company_db, folder / "warehouse.db")
    (folder / "fulcrum.toml").write_text("")
    settings_env = {
        "FULCRUM_CONFIG": str(folder / "fulcrum.toml"),
        "FULCRUM_WAREHOUSE_URL": f"sqlite:///{folder / 'warehouse.db'}",
        "FULCRUM_MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "FULCRUM_MLFLOW_ARTIFACT_LOCATION": str(folder / "mlartifacts"),
        "FULCRUM_VAR_DIR": str(folder / "var"),
        **FAST_TRAINING_ENV,
    }
    deployment = call_api(deployed, "read_deployment_by_name", "nightly-scores/nightly")
    succeeded = call_api(
        deployed, "create_flow_run_from_deployment", deployment.id,
        parameters={"as_of": AS_OF.isoformat()},
    )
    # A process worker passes a run's job variable env on to the flow's process.
    empty_warehouse = {"FULCRUM_WAREHOUSE_URL": f"sqlite:///{folder / 'empty.db'}"}
    failed = call_api(
        deployed, "create_flow_run_from_deployment", deployment.id,
        parameters={"as_of": AS_OF.isoformat()}, job_variables={"env": empty_warehouse},
    )

    prefect_cli(deployed, "worker", "start", "--pool", WORK_POOL, "--run-once", timeout=480, **settings_env)

    return {
        "succeeded": call_api(deployed, "read_flow_run", succeeded.id),
        "failed": call_api(deployed, "read_flow_run", failed.id),
    }


@pytest.mark.slow
def test_ui_shows_nightly_run_and_its_summary(deployed, worker_runs, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    chromium_path()
    flow_run = worker_runs["succeeded"]

    assert flow_run.state.is_completed(), flow_run.state.message
    artifacts = call_api(
        deployed, "read_artifacts",
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])),
    )
    summary = next(artifact for artifact in artifacts if artifact.key == "fulcrum-run-summary")
    assert f"# Fulcrum scores as of {AS_OF}" in summary.data

    SCREENSHOTS.mkdir(exist_ok=True)
    profile = tmp_path / "chromium-profile"
    run_page = open_in_chromium(
        f"{deployed.url}/runs/flow-run/{flow_run.id}", profile, SCREENSHOTS / "ui-nightly-flow-run.png"
    )
    assert flow_run.name in run_page
    assert "nightly-scores" in run_page
    assert "Completed" in run_page

    summary_page = open_in_chromium(
        f"{deployed.url}/artifacts/artifact/{summary.id}", profile, SCREENSHOTS / "ui-nightly-run-summary.png"
    )
    assert f"Fulcrum scores as of {AS_OF}" in summary_page
    assert "Open leads scored" in summary_page
    assert (SCREENSHOTS / "ui-nightly-run-summary.png").stat().st_size > 10_000


@pytest.mark.slow
def test_failed_run_names_stage_and_sends_notification(worker_runs, notifications):
    flow_run = worker_runs["failed"]

    assert flow_run.state.is_failed()
    assert "stage 'extract' failed: source 'leads' is mapped to table 'leads'" in flow_run.state.message

    deadline = time.monotonic() + 90
    while not notifications and time.monotonic() < deadline:
        time.sleep(1)
    assert len(notifications) == 1, "the failure automation sent no notification within 90 s"
    text = notifications[0]["text"]
    assert f"nightly-scores run {flow_run.name} Failed" in text
    assert "stage 'extract' failed" in text
    assert f"/runs/flow-run/{flow_run.id}" in text
