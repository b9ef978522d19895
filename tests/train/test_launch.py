"""The trainers' Accelerator: launch mistakes that would train silently wrong are named."""

from __future__ import annotations

import warnings

import pytest
import torch

from preflab.config import ConfigError
from preflab.train.dpo import DPOConfig
from preflab.train.launch import launched_processes, make_accelerator
from preflab.train.reward import RewardConfig


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast works on a GPU")
def test_fp16_on_a_cpu_is_refused_naming_the_field():
    # accelerate would run float32 without a word and the run's config.json would say fp16
    with pytest.raises(ConfigError, match=r"RewardConfig.mixed_precision: fp16 needs a GPU"):
        make_accelerator(RewardConfig(mixed_precision="fp16"), "RewardConfig")


def test_a_launcher_precision_the_config_overrides_is_pointed_out(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        acc = make_accelerator(DPOConfig(cpu=True), "DPOConfig")
    assert acc.num_processes == 1
    assert any("DPOConfig.mixed_precision: the run uses 'no' from its config, not the launcher's" in str(x.message)
               for x in w)


def test_launched_processes_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert launched_processes() == 1
