"""Reward-model training invariants: gradient accumulation 1x8 == 8x1; SIGKILL + resume == uninterrupted."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preflab.config import ConfigError
from preflab.train.reward import RewardConfig, train_reward
from tests.train.rm_fixtures import sandbox_pairs, tiny_reward_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    tok = tiny_tokenizer()
    # ties on some pairs: excluded ties must not change the mean over the step
    pairs = [dataclasses.replace(p, is_tie=i in (1, 2, 9)) for i, p in enumerate(sandbox_pairs(16, seed=2))]
    out = {}
    for accum in (1, 8):
        # float64: Adam's first step is ~lr * sign(g), so fp32 rounding noise on near-zero gradient
        # entries would show up as lr-sized differences; in fp64 the two paths agree to ~1e-12
        model = tiny_reward_model(tok, seed=0).double()
        cfg = RewardConfig(lr=1e-2, batch_size=8, grad_accum=accum, epochs=1, eval_every=0, checkpoint_every=0,
                           margin="llama2_large", seed=3)
        train_reward(cfg, model=model, tokenizer=tok, train=pairs, val=[], run_dir=tmp_path / str(accum),
                     show_progress=False)
        out[accum] = _weights(model)
    before = _weights(tiny_reward_model(tok, seed=0).double())
    moved = max((out[1][k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3  # the two steps really changed the weights
    _assert_close(out[1], out[8], atol=1e-9)


CHILD = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from preflab.train.reward import RewardConfig, train_reward
from tests.train.rm_fixtures import sandbox_pairs, tiny_reward_model, tiny_tokenizer
tok = tiny_tokenizer()
pairs = sandbox_pairs(48, seed=1)
def on_step(step, row):
    if step == 3:  # past the step-2 checkpoint: announce, then hang until killed
        open({marker!r}, "w").write("3")
        time.sleep(120)
train_reward(RewardConfig(**{cfg!r}), model=tiny_reward_model(tok, seed=0), tokenizer=tok, train=pairs,
             val=pairs[:8], run_dir={run_dir!r}, on_step=on_step, show_progress=False)
"""


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    cfg = dict(lr=5e-3, batch_size=8, epochs=1, eval_every=2, checkpoint_every=2, seed=4, margin="llama2_small")
    tok = tiny_tokenizer()
    pairs = sandbox_pairs(48, seed=1)

    ref_model = tiny_reward_model(tok, seed=0)
    ref = train_reward(RewardConfig(**cfg), model=ref_model, tokenizer=tok, train=pairs, val=pairs[:8],
                       run_dir=tmp_path / "ref", show_progress=False)
    assert ref.steps == 6

    run_dir, marker = tmp_path / "killed", tmp_path / "marker"
    code = CHILD.format(root=str(ROOT), marker=str(marker), cfg=cfg, run_dir=str(run_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "child never reached step 3"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["step_000002"]
    assert not (run_dir / "model").exists()

    model = tiny_reward_model(tok, seed=99)  # different init: the checkpoint must restore everything
    res = train_reward(RewardConfig(**cfg), model=model, tokenizer=tok, train=pairs, val=pairs[:8], run_dir=run_dir,
                       resume=True, show_progress=False)
    _assert_close(_weights(model), _weights(ref_model), atol=1e-6)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the row of step 3 logged before the kill is not duplicated
    assert res.metrics["eval/accuracy"] == ref.metrics["eval/accuracy"]
    # resuming with a config that would change the result is refused, naming the field
    with pytest.raises(ConfigError, match="RewardConfig.lr"):
        train_reward(RewardConfig(**{**cfg, "lr": 1e-3}), model=model, tokenizer=tok, train=pairs, val=[],
                     run_dir=run_dir, resume=True, show_progress=False)
