"""Reward-model learning curve: nested subsets, paired gains, projection, and ``rm curve`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preflab.config import ConfigError
from preflab.evaluate.curve import (
    CurveConfig,
    curve_summary,
    describe,
    nested_subsets,
    resolve_sizes,
)
from preflab.train.data import PreferenceExample

torch.set_num_threads(1)


def _ex(prompt: str, i: int) -> PreferenceExample:
    return PreferenceExample(pair_id=f"{prompt}-{i}", prompt=prompt, chosen=f"good {i}", rejected=f"bad {i}")


# ---- pure pieces ----------------------------------------------------------------------------------


def test_resolve_sizes_shares_counts_and_errors():
    assert resolve_sizes([0.25, 0.5, 1.0], 200) == [50, 100, 200]
    assert resolve_sizes([10, 0.5, 150], 200) == [10, 100, 150]
    with pytest.raises(ConfigError, match="sizes: 300 pairs asked, the training split has 200"):
        resolve_sizes([0.5, 300], 200)
    with pytest.raises(ConfigError, match="strictly ascending"):
        resolve_sizes([0.5, 100], 200)  # both 100 pairs
    with pytest.raises(ConfigError, match="neither a share"):
        resolve_sizes([2.5], 200)
    for bad in ([], [0.5, 0.25], [0.0, 1.0]):
        with pytest.raises(ConfigError, match="CurveConfig.sizes"):
            CurveConfig(sizes=bad)
    with pytest.raises(ConfigError, match="CurveConfig.within"):
        CurveConfig(within=0.7)


def test_nested_subsets_are_nested_whole_prompts_in_train_order():
    # prompts with 1..4 pairs each, interleaved as a store returns them
    train = [_ex(f"p{k}", i) for i in range(4) for k in range(20) if i <= k % 4]
    subs = nested_subsets(train, [10, 25, len(train)], seed=3)
    assert subs[-1] == train  # the full size is the training split itself, in order (the `rm train` model)
    for small, big in zip(subs, subs[1:], strict=False):
        assert set(map(id, small)) < set(map(id, big))
    for sub, n in zip(subs, [10, 25], strict=False):
        assert len(sub) >= n
        prompts = {e.prompt for e in sub}
        assert sub == [e for e in train if e.prompt in prompts]  # whole prompts, train's order
        # the fewest prompts: dropping the last one to join leaves fewer than n pairs
        assert min(len(sub) - sum(e.prompt == p for e in sub) for p in prompts) < n
    assert nested_subsets(train, [10], seed=3) == subs[:1]
    assert nested_subsets(train, [10], seed=4) != subs[:1]


def test_curve_summary_hand_values():
    # 10 validation pairs; accuracy 0.6, 0.7, 0.8 at 100, 200, 400 pairs: exactly +10 points per doubling
    a = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    b = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    c = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    s = curve_summary([{"pairs": 100, "hits": a}, {"pairs": 200, "hits": b}, {"pairs": 400, "hits": c}],
                      ceiling=0.93, within=0.03)
    assert [p["accuracy"] for p in s["points"]] == pytest.approx([0.6, 0.7, 0.8])
    assert s["points"][0]["ci"] == pytest.approx([0.3127, 0.8318], abs=1e-3)  # Wilson 95% for 6/10
    g = s["gains"][0]
    # d = one 1 and nine 0s: mean 0.1, s = sqrt(0.1), half-width 1.96 s / sqrt(10) = 0.196
    assert (g["from"], g["to"], g["n"]) == (100, 200, 10)
    assert g["diff"] == pytest.approx(0.1) and g["ci"] == pytest.approx([0.1 - 0.196, 0.1 + 0.196], abs=1e-3)
    assert g["per_doubling"] == pytest.approx(0.1)
    assert s["per_doubling"] == pytest.approx(0.1)
    assert s["gap_to_ceiling"] == pytest.approx(0.13)
    # ten pairs cannot tell +10 points from zero: no projection, however steep the fit
    assert not s["still_climbing"] and s["pairs_to_target"] is None
    assert any("no projection to 90.0%" in line for line in describe(s))
    # nor is that a flat tail: the interval reaches far above the 3 points asked for
    assert not s["flat"] and any("nor called flat" in line for line in describe(s))
    assert any("whether more pairs help is not known" in line for line in describe(s))
    # the same curve on 100 pairs: d has ten 1s, s = 0.3015, half-width 0.0591, so the last step climbs
    s = curve_summary([{"pairs": 100, "hits": a * 10}, {"pairs": 200, "hits": b * 10}, {"pairs": 400, "hits": c * 10}],
                      ceiling=0.93, within=0.03)
    assert s["gains"][1]["ci"] == pytest.approx([0.1 - 0.0591, 0.1 + 0.0591], abs=1e-3)
    assert s["still_climbing"] and s["pairs_to_target"] == 800  # 0.90 is one more doubling at +10 points
    assert any("about 800 pairs" in line for line in describe(s))
    # a steep start and a flat tail: the fit over all points still rises, the decision follows the tail
    tail = curve_summary([{"pairs": 100, "hits": a * 10}, {"pairs": 200, "hits": c * 10},
                          {"pairs": 400, "hits": c * 10}], ceiling=0.93)
    assert tail["per_doubling"] > 0 and not tail["still_climbing"] and tail["pairs_to_target"] is None
    assert tail["flat"] and any("is flat (at most +0.0 points)" in line for line in describe(tail))
    # already within reach; tie labels (None) are left out, reward ties count a half
    assert curve_summary([{"pairs": 100, "hits": c}], ceiling=0.82)["pairs_to_target"] == 100
    t = curve_summary([{"pairs": 5, "hits": [1, None, 0.5, 0]}])
    assert t["points"][0]["accuracy"] == pytest.approx(0.5) and t["points"][0]["n"] == 3
    assert t["per_doubling"] is None and t["pairs_to_target"] is None and not t["still_climbing"]
    with pytest.raises(ValueError, match="at 5 pairs scored no validation pair"):
        curve_summary([{"pairs": 5, "hits": [None]}])


def test_plot_curve_draws_a_png():
    from preflab.report.plots import plot_curve, plot_experiment

    s = curve_summary([{"pairs": 100, "hits": [1, 0, 1], "gold_accuracy": 0.7, "gold_ci": [0.5, 0.9]},
                       {"pairs": 200, "hits": [1, 1, 1], "gold_accuracy": 0.8, "gold_ci": [0.6, 0.95]}],
                      ceiling=0.9)
    png = plot_curve(s)
    assert png.startswith(b"\x89PNG")
    assert plot_experiment({**s, "kind": "curve"}) == png


# ---- rm curve end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.train.rm_fixtures import tiny_policy_and_pairs, tiny_tokenizer

    tmp = tmp_path_factory.mktemp("curve")
    policy, data = tiny_policy_and_pairs(tiny_tokenizer(), tmp, n_pairs=80)
    (tmp / "rm.toml").write_text("[rm]\nlr = 1e-3\nval_fraction = 0.25\ncheckpoint_every = 0\nbatch_size = 8\n"
                                 "margin = \"none\"\n")
    return tmp, policy, data


def test_rm_curve_cli_trains_each_size_resumes_and_matches_rm_train(setup):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from preflab.cli import app

    tmp, policy, data = setup
    runner = CliRunner()
    out = tmp / "curve"
    args = ["rm", "curve", "--data", str(data), "--policy", str(policy), "--out", str(out), "--config",
            str(tmp / "rm.toml"), "--sizes", "0.5,1", "--ceiling", "0.9", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    curve = json.loads((out / "curve.json").read_text())
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    n_train, n_val = curve["n_train"], curve["n_val"]
    assert n_train + n_val + curve["n_val_ties"] == 80
    (half, full) = curve["points"]
    assert half["pairs"] >= n_train / 2 and full["pairs"] == n_train and half["pairs"] < n_train
    assert half["n"] == full["n"] == n_val and curve["gains"][0]["n"] == n_val
    assert 0 <= full["accuracy"] <= 1 and curve["ceiling"] == 0.9
    assert "learning curve" in r.output and "-> " in r.output and "under the duplicate ceiling" in r.output
    # the full-size point is the model `rm train` gives on the same data and settings
    rt = tmp / "rm_train"
    r2 = runner.invoke(app, ["rm", "train", "--data", str(data), "--policy", str(policy), "--out", str(rt),
                             "--config", str(tmp / "rm.toml")])
    assert r2.exit_code == 0, r2.output
    w_curve = load_file(str(out / f"n_{n_train:06d}" / "model" / "model.safetensors"))
    w_train = load_file(str(rt / "model" / "model.safetensors"))
    assert w_curve.keys() == w_train.keys()
    assert all(torch.equal(w_curve[k], w_train[k]) for k in w_curve)
    # so a caller holding that model (the demo's rm_v2) passes it in instead of training it again
    from preflab.config import resolve
    from preflab.evaluate.curve import learning_curve
    from preflab.train.data import load_jsonl, split_by_prompt
    from preflab.train.reward import RewardConfig

    rm_cfg = resolve(RewardConfig, tmp / "rm.toml", "rm", {})
    train, val = split_by_prompt(load_jsonl(data), val_fraction=rm_cfg.val_fraction, seed=rm_cfg.seed)
    logs = []
    reused = learning_curve(CurveConfig(sizes=[1.0]), rm_cfg, start_from=policy, train=train, val=val,
                            run_dir=tmp / "reused", full_model=rt / "model", show_progress=False, log=logs.append)
    assert not (tmp / "reused" / f"n_{n_train:06d}" / "model").exists() and "the model in" in logs[0]
    assert reused["points"][0]["accuracy"] == full["accuracy"]
    assert json.loads((tmp / "reused" / f"n_{n_train:06d}" / "hits.json").read_text())["hits"] == json.loads(
        (out / f"n_{n_train:06d}" / "hits.json").read_text())["hits"]
    # a re-run trains nothing and writes the same curve
    before = (out / "curve.json").read_text()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and r.output.count(": done (") == 2, r.output
    assert (out / "curve.json").read_text() == before
    # other data in the same dir: a named error, nothing changed
    other = tmp / "other.jsonl"
    other.write_text("".join(data.read_text().splitlines(keepends=True)[:60]))
    r = runner.invoke(app, [*args[:2], "--data", str(other), *args[4:]])
    assert r.exit_code == 2 and "other training pairs" in r.output.replace("\n", " ")
    assert (out / "curve.json").read_text() == before


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "0.5,abc"], "--sizes: expected comma-separated numbers"),
    (["--sizes", "0.5,100000"], "the training split has"),
    (["--sizes", "1,0.5"], "strictly ascending"),
])
def test_rm_curve_bad_input_is_named_and_writes_nothing(setup, extra, message):
    from typer.testing import CliRunner

    from preflab.cli import app

    tmp, policy, data = setup
    out = tmp / f"bad-{abs(hash(tuple(extra)))}"
    r = CliRunner().invoke(app, ["rm", "curve", "--data", str(data), "--policy", str(policy), "--out", str(out),
                                 "--config", str(tmp / "rm.toml"), *extra])
    assert r.exit_code == 2 and message in r.output.replace("\n", " "), r.output
    assert not out.exists()


def test_summary_without_a_ceiling_has_gains_but_no_gap():
    s = curve_summary([{"pairs": 10, "hits": [1, 0]}, {"pairs": 20, "hits": [1, 1]}])
    assert not math.isnan(s["gains"][0]["diff"]) and s["ceiling"] is None and s["gap_to_ceiling"] is None


def test_cli_shows_our_progress_not_one_bar_per_model_load(setup):
    """In a fresh process (as users run it) transformers' per-load bars are off; an explicit setting wins."""
    import os
    import subprocess
    import sys

    tmp, policy, data = setup
    cmd = [sys.executable, "-m", "preflab.cli", "rm", "curve", "--data", str(data), "--policy", str(policy),
           "--config", str(tmp / "rm.toml"), "--sizes", "1"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    quiet = subprocess.run([*cmd, "--out", str(tmp / "sub1")], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stdout + quiet.stderr and "rm train" in quiet.stdout
    loud = subprocess.run([*cmd, "--out", str(tmp / "sub2")], capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HUB_DISABLE_PROGRESS_BARS": "0"})
    assert loud.returncode == 0 and "Loading weights" in loud.stdout + loud.stderr
