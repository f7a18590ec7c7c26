"""The fulcrum run command: how invalid settings and a failed run end."""

from __future__ import annotations

from fulcrum.cli import main


def test_run_rejects_invalid_settings_first(monkeypatch, capsys):
    monkeypatch.setenv("FULCRUM_SOURCES__LEADS__TABLE", "crm leads")

    code = main(["run", "--as-of", "2026-06-01"])

    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("fulcrum: invalid settings:")
    assert "'crm leads'" in error


def test_failed_run_ends_with_one_line(tmp_path, monkeypatch, capsys, prefect_api):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FULCRUM_VAR_DIR", str(tmp_path / "var"))

    code = main(["run", "--as-of", "2026-06-01"])

    assert code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("fulcrum run: the run failed in stage 'extract': ")
    assert "'leads'" in last_line

