"""demo.py's run bookkeeping (the whole story runs in tests/e2e/test_demo.py)."""

from __future__ import annotations

import json

import pytest
import torch

from preflab.config import ConfigError
from preflab.demo import DemoConfig, _config_json, numerics, run_demo


def test_numerics_records_what_the_numbers_depend_on():
    env = numerics(3)
    assert env["threads"] == 3 and env["torch"] == torch.__version__
    assert env["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]


def test_config_json_keeps_every_distinct_numerics_of_a_resumed_run(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), threads=2)
    first = _config_json(tmp_path, cfg, quick=True)
    assert first["numerics"] == [numerics(2)] and first["seed"] == cfg.seed
    (tmp_path / "config.json").write_text(json.dumps(first))
    assert _config_json(tmp_path, cfg, quick=True)["numerics"] == [numerics(2)]  # resumed on the same machine
    other = {**numerics(2), "cpu_kernels": "SOMETHING_ELSE"}
    (tmp_path / "config.json").write_text(json.dumps({**first, "numerics": [other]}))
    assert _config_json(tmp_path, cfg, quick=True)["numerics"] == [other, numerics(2)]


def test_a_damaged_run_file_is_an_error_naming_it_and_changes_nothing(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), threads=2)
    (tmp_path / "config.json").write_text('{"seed": 0, "numerics": [')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        _config_json(tmp_path, cfg, quick=True)
    (tmp_path / "config.json").write_text('{"numerics": "x86"}')
    with pytest.raises(ConfigError, match=r"config\.json: must be a JSON object whose 'numerics' is a list"):
        _config_json(tmp_path, cfg, quick=True)
    (tmp_path / "demo_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"demo_config\.json: not valid JSON"):
        run_demo(cfg, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "demo_config.json"]
    assert (tmp_path / "demo_config.json").read_text() == "{oops"


@pytest.mark.parametrize("sizes", [[], [0.5, 0.25], [0.5, 1.5], [0.0, 1.0]])
def test_rm_curve_sizes_must_be_ascending_shares(sizes):
    with pytest.raises(ConfigError, match=r"demo\.rm_curve_sizes: must be ascending shares in \(0, 1\]"):
        DemoConfig(rm_curve_sizes=sizes)


def test_the_simulated_parts_listed_are_those_of_this_run():
    from preflab.demo import demo_config_json

    with_drift = demo_config_json(DemoConfig(drift_week=3), quick=False)["simulated"]
    assert any(x.startswith("rater drift") for x in with_drift)
    without = demo_config_json(DemoConfig(drift_week=0), quick=True)  # --quick injects no drift
    assert without["quick"] and not any(x.startswith("rater drift") for x in without["simulated"])
    assert len(without["simulated"]) == len(with_drift) - 1
