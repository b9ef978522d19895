"""Report plots: a panel for each quantity a run logged, none for what it did not."""

import io

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
