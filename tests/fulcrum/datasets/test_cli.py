"""The load command: parsing, the files it writes and its errors."""

from __future__ import annotations

import argparse
import datetime as dt
import tomllib

import pytest

from fulcrum.cli import main
from fulcrum.datasets.cli import add_load_parser


def test_load_parser_joins_other_parser():
    parser = argparse.ArgumentParser(prog="fulcrum")
    add_load_parser(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["load", "olist", "data", "--churn-months", "3", "--sales-end", "2018-08-01"])

    assert (args.command, args.dataset) == ("load", "olist")
    assert args.churn_months == 3
    assert args.sales_end == dt.date(2018, 8, 1)
    assert args.commission_rate == 0.10


def test_rate_outside_unit_interval_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["load", "olist", "data", "--commission-rate", "1.5"])

    assert exit_info.value.code == 2
    assert "must be a number from 0 to 1. Got '1.5'" in capsys.readouterr().err


def test_existing_config_is_kept(tmp_path, capsys):
    config = tmp_path / "fulcrum.toml"
    config.write_text("horizon_days = 30\n")

    code = main(["load", "telco", str(tmp_path), "--url", f"sqlite:///{tmp_path / 'w.db'}", "--config", str(config)])

    assert code == 2
    assert "already exists. Pass --force" in capsys.readouterr().err
    assert config.read_text() == "horizon_days = 30\n"


def test_missing_files_name_the_folder(tmp_path, capsys):
    code = main(["load", "xeducation", str(tmp_path), "--url", f"sqlite:///{tmp_path / 'w.db'}", "--print"])

    assert code == 2
    assert "'Leads.csv' not found" in capsys.readouterr().err


@pytest.mark.realdata
def test_load_writes_readable_config(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "configs" / "telco.toml"

    code = main(["load", "telco", str(shared_data), "--url", "sqlite:///var/telco.db", "--config", str(config)])

    written = tomllib.loads(config.read_text())
    output = capsys.readouterr().out
    assert code == 0
    assert written["warehouse_url"] == "sqlite:///var/telco.db"
    assert written["ltv"]["churn_grace_days"] == 0
    assert written["sources"]["leads"] == {"absent": True}
    assert "source invoices: 233,164 rows through its SQL mapping" in output
    assert (tmp_path / "var" / "telco.db").is_file()


@pytest.mark.realdata
def test_print_writes_no_config_file(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    code = main(["load", "telco", str(shared_data), "--url", "sqlite:///w.db", "--print"])

    captured = capsys.readouterr()
    assert code == 0
    assert "[sources.invoices]" in captured.out
    assert "raw table telco_raw_customers: 7,043 rows" in captured.err
    assert not (tmp_path / "fulcrum.toml").exists()
