"""Project TOML files (`--config`): a typo in a table name or a value outside any table is an error
naming the file, not a run with every setting silently at its default."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from preflab.cli import app
from preflab.config import SECTIONS, ConfigError, load_toml, resolve
from preflab.evaluate.gates import GatesConfig
from preflab.train.reward import RewardConfig


@pytest.mark.parametrize("text, message", [
    ("[rmm]\nlr = 1e-3\n", "unknown table [rmm] (preflab reads [build], [cost]"),
    ("[PPO]\nsteps = 3\n", "unknown table [PPO]"),
    ("lr = 1e-3\n[rm]\nepochs = 2\n", "'lr' is outside any table (put it under one of"),
    ("[rm]\nlr = \n", "Invalid value"),
])
def test_a_bad_config_file_is_named(tmp_path, text, message):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        resolve(RewardConfig, tmp_path / "p.toml", "rm", {})


def test_one_file_carries_every_stage_and_each_reads_its_own_table(tmp_path):
    (tmp_path / "p.toml").write_text("".join(f"[{s}]\n" for s in SECTIONS))  # every table, all empty
    (tmp_path / "q.toml").write_text("[gates]\nwin_rate_lower_min = 0.55\n[rm]\nlr = 0.002\n[cost]\ncurrency = 'EUR'\n")
    assert resolve(RewardConfig, tmp_path / "q.toml", "rm", {}).lr == 0.002
    assert load_toml(GatesConfig, tmp_path / "q.toml", "gates").win_rate_lower_min == 0.55
    assert resolve(RewardConfig, tmp_path / "p.toml", "rm", {}).lr == RewardConfig().lr


def test_cli_names_a_missing_or_mistyped_config(tmp_path):
    (tmp_path / "typo.toml").write_text("[rmm]\nlr = 1e-3\n")
    for path, words in ((tmp_path / "typo.toml", "unknown table [rmm]"), (tmp_path / "none.toml", "--config: no such file")):
        r = CliRunner().invoke(app, ["rm", "train", "--data", str(tmp_path / "d.jsonl"), "--policy", str(tmp_path),
                                     "--out", str(tmp_path / "run"), "--config", str(path)], terminal_width=200)
        assert r.exit_code == 2 and words in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_rm_curve_follows_the_rm_seed_unless_told_otherwise(tmp_path, monkeypatch):
    import preflab.evaluate.curve as curve

    seen = {}

    def fake_curve(cfg, rm_cfg, **kw):  # noqa: ANN001, ANN003
        seen["curve"], seen["rm"] = cfg.seed, rm_cfg.seed
        raise ValueError("stop here")

    monkeypatch.setattr(curve, "learning_curve", fake_curve, raising=False)
    (tmp_path / "d.jsonl").write_text("".join(f'{{"prompt": "q{i}", "chosen": "a", "rejected": "b"}}\n'
                                              for i in range(20)))
    for toml, want in (("[rm]\nseed = 5\n", 5), ("[rm]\nseed = 5\n[curve]\nseed = 2\n", 2)):
        (tmp_path / "p.toml").write_text(toml)
        r = CliRunner().invoke(app, ["rm", "curve", "--data", str(tmp_path / "d.jsonl"), "--policy", str(tmp_path),
                                     "--out", str(tmp_path / "c"), "--config", str(tmp_path / "p.toml"),
                                     "--ceiling", "0.8"])
        assert seen.get("curve") == want, r.output
