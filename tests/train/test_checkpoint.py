"""Checkpoints: save/load restores weights, optimizer, scheduler, RNG; atomic; latest wins."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from preflab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    refuse_to_overwrite,
    save_checkpoint,
)


class Tied(torch.nn.Module):
    """A module with tied weights, like GPT-2's wte / lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.out = torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randint(0, 7, (3,))
    loss = model.out(model.emb(x)).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_save_load_restores_everything(tmp_path):
    model, opt, sched = _setup()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        _step(model, opt, sched)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 3, modules={"policy": model}, optimizers={"policy": opt},
                           schedulers={"lr": sched}, state={"tokens": 42}, generators={"sampler": gen})
    assert path == tmp_path / "ckpt" / "step_000003"
    # what an uninterrupted run does next
    expect_rand = (random.random(), np.random.rand(), torch.rand(1).item(),
                   torch.rand(1, generator=gen).item())
    _step(model, opt, sched)
    expect_w = model.emb.weight.detach().clone()

    model2, opt2, sched2 = _setup(seed=99)
    gen2 = torch.Generator().manual_seed(0)
    state = load_checkpoint(path, modules={"policy": model2}, optimizers={"policy": opt2},
                            schedulers={"lr": sched2}, generators={"sampler": gen2})
    assert state == {"step": 3, "tokens": 42}
    assert model2.out.weight is model2.emb.weight  # tying survives
    got_rand = (random.random(), np.random.rand(), torch.rand(1).item(),
                torch.rand(1, generator=gen2).item())
    assert got_rand == expect_rand
    assert sched2.last_epoch == 3
    _step(model2, opt2, sched2)
    assert torch.equal(model2.emb.weight, expect_w)


def test_latest_ignores_incomplete_and_tmp(tmp_path):
    model, opt, _ = _setup()
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 5, modules={"m": model}, optimizers={"m": opt})
    save_checkpoint(tmp_path, 10, modules={"m": model}, optimizers={"m": opt})
    (tmp_path / "ckpt" / "step_000020").mkdir()  # a crashed, non-atomic writer
    (tmp_path / "ckpt" / ".tmp_step_000030_abcd").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000010"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005", "step_000010"]


def test_resave_same_step_and_keep_last(tmp_path):
    model, opt, _ = _setup()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, modules={"m": model}, optimizers={"m": opt}, keep_last=2)
    save_checkpoint(tmp_path, 3, modules={"m": model}, optimizers={"m": opt}, state={"again": True}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []
    assert load_checkpoint(latest_checkpoint(tmp_path), modules={}, optimizers={}, restore_rng=False)["again"]


def test_failed_save_leaves_no_partial_dir(tmp_path):
    model, opt, _ = _setup()
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, modules={"m": model}, optimizers={"m": opt}, state={"x": object()})

    class Boom:
        def state_dict(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 1, modules={"m": model}, optimizers={"m": opt}, schedulers={"s": Boom()})
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_load_errors_name_the_file(tmp_path):
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path, 1, modules={"m": model}, optimizers={"m": opt})
    with pytest.raises(FileNotFoundError, match="value.safetensors"):
        load_checkpoint(path, modules={"value": model}, optimizers={})
    with pytest.raises(RuntimeError, match="do not match"):
        load_checkpoint(path, modules={"m": torch.nn.Linear(4, 7)}, optimizers={})
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "ckpt", modules={}, optimizers={})


def test_a_new_run_into_a_directory_holding_one_is_refused(tmp_path):
    from preflab.config import ConfigError

    refuse_to_overwrite(tmp_path / "missing", resume=False)  # nothing there: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics\.jsonl\); continue it with --resume"):
        refuse_to_overwrite(tmp_path, resume=False)
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 7, modules={"m": model}, optimizers={"o": opt}, schedulers={"s": sched})
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint step 7\)"):
        refuse_to_overwrite(tmp_path, resume=False)
    refuse_to_overwrite(tmp_path, resume=True)


def test_inputs_of_a_run_are_recorded_and_a_resume_must_match(tmp_path):
    import json
    from dataclasses import dataclass

    from preflab.config import ConfigError
    from preflab.train.checkpoint import check_inputs, fingerprint

    @dataclass
    class Row:
        prompt: str
        chosen: str

    rows = [Row("q1", "a"), Row("q2", "b")]
    assert fingerprint(rows) == fingerprint([Row("q1", "a"), Row("q2", "b")])
    assert fingerprint(rows) != fingerprint(rows[::-1])  # order is part of the data (it sets the schedule)
    check_inputs(tmp_path, {"train_data": fingerprint(rows), "policy": "/m/sft"}, resuming=False)
    check_inputs(tmp_path, {"train_data": fingerprint(rows), "policy": "/m/sft", "new": 1}, resuming=True)
    with pytest.raises(ConfigError, match=r"policy: '/m/other' differs from '/m/sft', which .* started with"):
        check_inputs(tmp_path, {"train_data": fingerprint(rows), "policy": "/m/other"}, resuming=True)
    check_inputs(tmp_path, {"policy": "/m/other"}, resuming=False)  # a fresh start records anew
    assert json.loads((tmp_path / "inputs.json").read_text()) == {"policy": "/m/other"}
