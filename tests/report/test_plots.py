"""Report plots: a panel for each quantity a run logged, none for what it did not."""

import io

import pytest

from preflab.report.plots import plot_ppo


def _height(png: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size[1]


def test_ppo_plot_adds_the_kl_split_panels_only_when_logged():
    rows = [{"step": s, "objective/rlhf_reward": 0.1 * s, "objective/kl": 0.05 * s, "objective/beta": 0.02,
             "gold/utility": 0.08 * s} for s in range(0, 60, 10)]
    split = [{**r, "oracle/kl_needed": 0.03 * r["step"], "oracle/kl_excess": 0.02 * r["step"]} for r in rows]
    plain, with_split = _height(plot_ppo({"ppo_v1": rows})), _height(plot_ppo({"ppo_v1": split}))
    assert with_split > plain * 1.3  # a third row of panels (2 x 2 -> 3 x 2)
    assert _height(plot_ppo({"ppo_v1": rows, "ppo_v2": split})) == with_split  # one pass with the split is enough


def test_the_y_axis_reaches_down_to_every_value_and_ci():
    from preflab.report.plots import _bottom, plot_rm

    assert _bottom(0.4, [{"accuracy": 0.7, "ci": [0.6, 0.8]}]) == 0.4  # the usual zoom
    assert _bottom(0.4, [{"accuracy": 0.125, "ci": [0.02, 0.47]}, {"accuracy": None}]) == 0.0
    assert _bottom(0.45, [{"accuracy": 0.52, "ci": [0.38, 0.66]}]) == pytest.approx(0.3)
    assert _bottom(0.4, [{"consistency": 0.35}], "consistency") == pytest.approx(0.3)
    png = plot_rm({"rm2": {"accuracy": 0.7, "ci": [0.6, 0.8], "by_strength": [
        {"strength": 1, "accuracy": 0.125, "ci": [0.02, 0.47]}, {"strength": 2, "accuracy": 0.8, "ci": [0.7, 0.9]}]}})
    assert png.startswith(b"\x89PNG")
