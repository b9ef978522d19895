"""Resuming a demo run directory: which settings may change (or be missing, from an older preflab)
and which stages run again. The whole story runs in tests/e2e/test_demo.py."""

from __future__ import annotations

import ast
import inspect
import json
from dataclasses import fields

import pytest
from rich.console import Console

import preflab.demo as demo
from preflab.config import ConfigError, to_dict
from preflab.demo import FIRST_READ, STAGES, DemoConfig, resume_changes, run_demo
from preflab.pipeline import StageRunner


def _stage_reads() -> dict[str, set[str]]:
    """The settings each stage of ``run_demo`` reads: ``cfg.X`` in its ``st.run`` lambda and in every
    demo.py function it calls, transitively; what ``run_demo`` reads outside the lambdas counts
    for the first stage."""
    tree = ast.parse(inspect.getsource(demo))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def reads(node: ast.AST, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "cfg":
                out.add(n.attr)
            elif isinstance(n, ast.Name) and n.id in funcs and n.id not in seen and n.id != "run_demo":
                out |= reads(funcs[n.id], seen | {n.id})
        return out

    by_stage: dict[str, set[str]] = {}
    lambdas = set()
    for n in ast.walk(funcs["run_demo"]):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "run"
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "st"):
            by_stage[n.args[0].value] = reads(n.args[1])
            lambdas.add(id(n.args[1]))
    outside = set()
    for n in ast.walk(funcs["run_demo"]):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "cfg":
            outside.add(n.attr)
    inside = set().union(*by_stage.values())
    # attributes read only outside the lambdas (threads, out) are the run's, before any stage
    by_stage[STAGES[0]] |= {a for a in outside - inside if a != "out"}
    return by_stage


def test_first_read_names_the_earliest_stage_that_reads_each_setting():
    by_stage = _stage_reads()
    assert tuple(by_stage) == STAGES  # STAGES is run_demo's order
    names = {f.name for f in fields(DemoConfig)}
    assert set(FIRST_READ) == names
    for name in sorted(names - {"out"}):
        readers = [s for s in STAGES if name in by_stage[s]]
        assert readers, f"demo.{name} is read by no stage"
        assert FIRST_READ[name] == readers[0], f"demo.{name}: first read by {readers[0]}, not {FIRST_READ[name]}"
    assert FIRST_READ["out"] is None


def _saved(cfg: DemoConfig, **changes) -> dict:
    d = json.loads(json.dumps(to_dict(cfg)))
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d


def test_an_older_run_missing_a_later_stage_setting_resumes(tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    finished = [s for s in STAGES if s != "rm_curve"]  # made before rm_curve existed, summaries included
    notes = resume_changes(_saved(cfg, rm_curve_sizes=None), cfg, finished, tmp_path / "demo_config.json")
    assert notes == ["demo.rm_curve_sizes: [0.125, 0.25, 0.5, 1.0] (new setting); first read by rm_curve, "
                     "which has not run yet"]


def test_a_setting_changes_while_its_first_reader_has_not_finished(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), ppo_lr=2e-4)
    assert resume_changes(_saved(cfg, ppo_lr=1e-4), cfg, STAGES[:6], tmp_path / "x.json") == [
        "demo.ppo_lr: 0.0002 (was 0.0001); first read by ppo_v1, which has not run yet"]
    assert resume_changes(_saved(cfg), cfg, STAGES, tmp_path / "x.json") == []
    # a run directory may move: out is read by no stage
    assert resume_changes(_saved(cfg, out="elsewhere"), cfg, STAGES, tmp_path / "x.json") == [
        f"demo.out: {str(tmp_path)!r} (was 'elsewhere')"]


@pytest.mark.parametrize(("changes", "finished", "message"), [
    ({"ppo_lr": 1e-4}, STAGES[:7],
     r"demo\.ppo_lr: 0\.0002 here, but was 0\.0001 in .*x\.json, and the finished stage 'ppo_v1' depends on it"),
    ({"detector_samples": None}, STAGES[:8],
     r"demo\.detector_samples: 4 here, but is not recorded there \(written by an older preflab\) in .*x\.json, "
     r"and the finished stage 'gates_v1'"),
    # finished stages need not be a prefix (a stage added to an older run): any finished one from the reader on
    ({"seed": 1}, ["production"], r"demo\.seed: 0 here, but was 1 .* the finished stage 'production'"),
    ({"gone_setting": 3}, [], r"x\.json: records the setting 'gone_setting', which this preflab no longer has"),
])
def test_a_setting_a_finished_stage_used_is_refused_by_name(tmp_path, changes, finished, message):
    cfg = DemoConfig(out=str(tmp_path), ppo_lr=2e-4)
    with pytest.raises(ConfigError, match=message):
        resume_changes(_saved(cfg, **changes), cfg, finished, tmp_path / "x.json")


def test_only_a_finished_summary_does_not_block_a_change(tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    assert resume_changes(_saved(cfg, rm_curve_sizes=[0.5, 1.0]), cfg, ["summaries"], tmp_path / "x.json")
    with pytest.raises(ConfigError, match="the finished stage 'rm_curve'"):
        resume_changes(_saved(cfg, rm_curve_sizes=[0.5, 1.0]), cfg, ["rm_curve", "summaries"], tmp_path / "x.json")


def test_run_demo_refuses_before_writing_anything(tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    saved = _saved(cfg.quick(), detector_samples=None)
    (tmp_path / "demo_config.json").write_text(json.dumps(saved))
    (tmp_path / "stages.json").write_text(json.dumps({s: {"seconds": 1.0, "out": {}} for s in STAGES[:8]}))
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=r"demo\.detector_samples: 2 here, but is not recorded there"):
        run_demo(cfg, quick=True, console=Console(quiet=True))
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    (tmp_path / "demo_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"demo_config\.json: must be a JSON object of the demo's settings"):
        run_demo(cfg, quick=True, console=Console(quiet=True))


def test_a_refreshed_stage_runs_again_after_an_earlier_stage_ran(tmp_path):
    calls = []

    def stage(name):
        return lambda: calls.append(name) or {"n": len(calls)}

    first = StageRunner(tmp_path, Console(quiet=True), refresh=["summary"])
    for name in ("a", "summary"):
        first.run(name, stage(name))
    again = StageRunner(tmp_path, Console(quiet=True), refresh=["summary"])
    for name in ("a", "summary"):  # nothing new ran: the summary is skipped too
        again.run(name, stage(name))
    assert calls == ["a", "summary"]
    later = StageRunner(tmp_path, Console(quiet=True), refresh=["summary"])
    seen = {}
    later.run("a", stage("a"))
    later.run("b", stage("b"))  # a stage added before the summary
    later.run("summary", lambda: seen.update(stages=sorted(later.seconds())) or {"n": 4})
    assert calls == ["a", "summary", "b"] and later.ran == ["b", "summary"]
    assert seen["stages"] == ["a", "b"]  # while it runs again, the summary's old entry does not count
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert list(stages) == ["a", "b", "summary"] and stages["summary"]["out"] == {"n": 4}
