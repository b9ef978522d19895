"""demo.py's run bookkeeping (the whole story runs in tests/e2e/test_demo.py)."""

from __future__ import annotations

import json

import torch

from preflab.demo import DemoConfig, _config_json, numerics


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
