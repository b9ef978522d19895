"""Gates on evidence built from composed sandbox texts: a good candidate passes, planted failures trip."""

from __future__ import annotations

import random

import pytest

from preflab.config import ConfigError, from_dict, load_toml
from preflab.evaluate.ab import ab_result
from preflab.evaluate.detectors import DetectorResult, run_detectors, run_detectors_by_topic
from preflab.evaluate.factual import SuiteRun, compare_runs, item_from_dict
from preflab.evaluate.gates import Evidence, GateReport, GatesConfig, evaluate_gates, render_table
from preflab.sandbox import domain
from preflab.sandbox.factual_suite import build_suite

ITEMS = [item_from_dict(d, "suite") for d in build_suite(150)]
QUERIES = {q.text: q for q in domain.all_queries()}


def policy_run(style_of, seed: int, n_samples: int = 2, kl: float = 0.0) -> SuiteRun:
    """Responses composed in the style ``style_of(item, rng)`` picks; a constant per-response KL."""
    rng = random.Random(seed)
    texts = [[domain.compose(QUERIES[it.query], style_of(it, rng)) for _ in range(n_samples)] for it in ITEMS]
    return SuiteRun(ITEMS, texts, [[kl] * n_samples for _ in ITEMS])


def sft_style(it, rng):
    return domain.sample_style(rng)


def good_style(it, rng):  # what a well-aimed PPO pass learns: current facts, warm, direct, plain
    s = domain.sample_style(rng)
    return domain.Style(tone="warm", directness="direct", factuality="current" if rng.random() < 0.8 else s.factuality,
                        formality=s.formality, confidence=s.confidence, padding="none")


def rubric_v1_style(it, rng):  # raters rewarded confidence and could not check prices
    s = good_style(it, rng)
    if it.topic == "pricing":
        return domain.Style(tone="warm", factuality="stale", confidence="confident", formality=s.formality)
    return domain.Style(tone="warm", factuality=s.factuality, confidence="confident", formality=s.formality)


def stilted_style(it, rng):
    s = good_style(it, rng)
    return domain.Style(tone=s.tone, factuality=s.factuality, formality="stilted")


def evidence(style_of, *, win=0.68, kl=2.0, candidate="candidate") -> Evidence:
    base = policy_run(sft_style, 1)
    cand = policy_run(style_of, 2, kl=kl)
    rng = random.Random(0)
    outcomes = [1.0 if rng.random() < win else 0.0 for _ in range(200)]
    ab = ab_result(outcomes, topics=["pricing"] * 200, candidate_texts=["a b"] * 200, baseline_texts=["a b"] * 200,
                   candidate=candidate)
    g_base = SuiteRun(ITEMS, [row[:1] for row in base.texts])
    g_cand = SuiteRun(ITEMS, [row[:1] for row in cand.texts])
    return Evidence(ab=ab, factual=compare_runs(g_base, g_cand),
                    detectors=run_detectors(cand.responses(), base.responses()),
                    detectors_by_topic=run_detectors_by_topic(cand.responses(), base.responses()))


def test_a_good_candidate_passes_every_gate(tmp_path):
    rep = evaluate_gates(GatesConfig(), evidence(good_style), subject="ppo2")
    assert rep.passed, rep.to_dict()
    names = [g.name for g in rep.gates]
    assert names[:2] == ["win_rate", "factual"] and "factual[pricing]" in names and names[-2:] == ["formality", "kl"]
    back = GateReport.from_dict(rep.to_dict())
    assert back.passed and back.gates == rep.gates
    rep.save(tmp_path / "gate.json")


def test_rubric_v1_candidate_wins_ab_but_fails_factual_and_confident_wrong():
    rep = evaluate_gates(GatesConfig(), evidence(rubric_v1_style))
    by = {g.name: g for g in rep.gates}
    assert by["win_rate"].passed
    assert not by["factual[pricing]"].passed and not by["confident_wrong"].passed
    assert by["factual[billing]"].passed
    assert not rep.passed and "confident_wrong" in rep.failed and "confident_wrong[pricing]" in rep.failed
    assert by["confident_wrong"].numbers["shift"] > 0.1


def test_factual_topic_gate_is_one_sided_and_reads_old_evidence():
    """16 pricing items lost, 4 gained (the demo's seed-1 first pass): two-sided McNemar p 0.012
    would pass the per-topic gate at 0.05 / 5; the one-sided question ("worse?") gives 0.006."""
    import dataclasses

    from preflab.evaluate.factual import FactualComparison

    def topic(b, c):
        return {"n": 40, "accuracy_baseline": 0.5, "accuracy_candidate": 0.5 + (c - b) / 40, "only_baseline": b,
                "only_candidate": c, "p_value": 0.0, "regression": False}  # the gate recomputes from b, c

    by_topic = {"pricing": topic(16, 4), "billing": topic(2, 13), "account": topic(0, 16),
                "cancellation": topic(1, 12), "technical": topic(4, 7)}
    f = FactualComparison(n=200, accuracy_baseline=0.4, accuracy_candidate=0.58, only_baseline=23,
                          only_candidate=52, p_value=0.001, regression=False, by_topic=by_topic)
    ev = dataclasses.replace(evidence(good_style), factual=f)
    rep = evaluate_gates(GatesConfig(), ev)
    by = {g.name: g for g in rep.gates}
    assert rep.failed == ["factual[pricing]"]
    assert by["factual[pricing]"].value == pytest.approx(6196 / 2**20) and by["factual[pricing]"].threshold == 0.01
    assert by["factual"].passed and by["factual[billing]"].passed  # improvements are never regressions
    with pytest.raises(ConfigError, match="gates.factual_alpha"):
        from_dict(GatesConfig, {"factual_alpha": 0.5})


def test_confident_wrong_per_topic_gate_and_older_evidence():
    """The demo's seed-1 first pass at KL 3: confident-wrong 0.29 -> 0.30 overall (passes),
    pricing 0.29 -> 0.54 with the Bonferroni CI's lower bound 0.048 (fails)."""
    import dataclasses

    def cw(base, cand, lo, n=84):
        return {"confident_wrong": DetectorResult("confident_wrong", cand, n, base, n, cand - base, lo, lo + 0.4)}

    ev = evidence(good_style)
    ev = dataclasses.replace(ev, detectors={**ev.detectors, "confident_wrong": DetectorResult(
        "confident_wrong", 0.30, 300, 0.29, 300, 0.01, -0.06, 0.08)},
        detectors_by_topic={"pricing": cw(0.29, 0.54, 0.048), "billing": cw(0.25, 0.13, -0.317)})
    rep = evaluate_gates(GatesConfig(), ev)
    by = {g.name: g for g in rep.gates}
    assert rep.failed == ["confident_wrong[pricing]"] and by["confident_wrong"].passed
    assert by["confident_wrong[pricing]"].value == 0.048 and by["confident_wrong[billing]"].passed
    assert evaluate_gates(GatesConfig(confident_wrong_per_topic=False), ev).passed
    older = dataclasses.replace(ev, detectors_by_topic=None)  # evidence written before per-topic gates
    assert evaluate_gates(GatesConfig(), older).passed
    assert not any(g.name.startswith("confident_wrong[") for g in evaluate_gates(GatesConfig(), older).gates)


def test_planted_stilted_policy_trips_the_formality_gate():
    rep = evaluate_gates(GatesConfig(), evidence(stilted_style))
    assert rep.failed == ["formality"]
    g = next(g for g in rep.gates if g.name == "formality")
    assert g.value > 0.5 and g.threshold == 0.1


def test_win_rate_and_kl_bounds():
    rep = evaluate_gates(GatesConfig(), evidence(good_style, win=0.52, kl=25.0))
    assert set(rep.failed) == {"win_rate", "kl"}


def test_win_rate_gate_needs_enough_judgements_of_a_finished_round():
    """5 wins of 5 have a Wilson lower bound of 0.57 > 0.5 while the exact sign test gives p 0.0625: the gate
    decides on at least win_rate_min_n judgements, and never on a round still open with pairs unjudged."""
    import dataclasses

    from preflab.evaluate.ab import sign_test_p, top_rater_share

    few = ab_result([1.0] * 5, topics=["t"] * 5, candidate_texts=["a"] * 5, baseline_texts=["b"] * 5)
    assert few.overall.ci_low > 0.5 and sign_test_p(5, 0) == pytest.approx(0.0625)
    g = evaluate_gates(GatesConfig(gates=["win_rate"]), Evidence(ab=few)).gates[0]
    assert not g.passed and g.numbers["reason"] == "too few judgements: 5 < win_rate_min_n 30"
    assert evaluate_gates(GatesConfig(gates=["win_rate"], win_rate_min_n=5), Evidence(ab=few)).passed

    ev = evidence(good_style)
    ok = evaluate_gates(GatesConfig(gates=["win_rate"]), ev)
    assert ok.passed and ok.gates[0].numbers["n"] == 200
    rnd = {"id": 7, "name": "week 3", "status": "open", "pairs_judged": 120, "n_pairs": 200,
           "judgements_by_rater": {"ann": 150, "bob": 50}}
    ev.ab = dataclasses.replace(ev.ab, round=rnd)
    g = evaluate_gates(GatesConfig(gates=["win_rate"]), ev).gates[0]
    assert not g.passed and g.numbers["reason"].startswith("the A/B round 'week 3' is open with 120 of 200 pairs")
    assert (g.numbers["top_rater"], g.numbers["top_rater_share"]) == ("ann", 0.75) == top_rater_share(ev.ab)
    for done in ({**rnd, "status": "closed"}, {**rnd, "pairs_judged": 200}):  # closed, or open but complete
        ev.ab = dataclasses.replace(ev.ab, round=done)
        assert evaluate_gates(GatesConfig(gates=["win_rate"]), ev).passed
    with pytest.raises(ConfigError, match="gates.win_rate_min_n"):
        GatesConfig(win_rate_min_n=0).validate()


def test_missing_evidence_fails_and_extra_detector_bounds():
    rep = evaluate_gates(GatesConfig(), Evidence())
    assert not rep.passed and all(g.numbers == {"reason": "no evidence"} for g in rep.gates)
    assert not GateReport([]).passed
    cfg = GatesConfig(gates=["formality"], detector_max_shift={"hedging": -0.9})
    rep = evaluate_gates(cfg, evidence(good_style))
    assert [g.name for g in rep.gates] == ["formality", "hedging"] and rep.failed == ["hedging"]


def test_evidence_roundtrip_and_table(tmp_path):
    ev = evidence(rubric_v1_style)
    ev.save(tmp_path / "eval")
    back = Evidence.load(tmp_path / "eval")
    assert evaluate_gates(GatesConfig(), back).to_dict() == evaluate_gates(GatesConfig(), ev).to_dict()
    (tmp_path / "eval" / "ab.json").write_text("{oops")
    with pytest.raises(ValueError, match="ab.json: bad JSON"):
        Evidence.load(tmp_path / "eval")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(evaluate_gates(GatesConfig(), ev, subject="ckpt")))
    out = console.export_text()
    assert "FAIL" in out and "confident_wrong" in out and "pass" in out


def test_gates_config_from_toml_names_bad_fields(tmp_path):
    p = tmp_path / "project.toml"
    p.write_text("[gates]\nwin_rate_lower_min = 0.55\nformality_max_shift = 0.05\n")
    cfg = load_toml(GatesConfig, p, "gates")
    assert cfg.win_rate_lower_min == 0.55 and cfg.gates == list(GatesConfig().gates)
    with pytest.raises(ConfigError, match=r"gates.gates\[0\]"):
        from_dict(GatesConfig, {"gates": ["vibes"]})
    with pytest.raises(ConfigError, match="gates.detector_max_shift.nope"):
        from_dict(GatesConfig, {"detector_max_shift": {"nope": 0.1}})


def _save_tiny(path, seed, tok):
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config

    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tiny_gpt2(cfg, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_factual_run_compare_and_gates_collect(tmp_path):
    import json

    import torch
    from typer.testing import CliRunner

    from preflab.cli import app
    from preflab.models.tiny import train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    sft, cand = _save_tiny(tmp_path / "sft", 0, tok), _save_tiny(tmp_path / "cand", 1, tok)
    runner = CliRunner()
    suite = tmp_path / "suite.jsonl"
    assert runner.invoke(app, ["factual", "sandbox-suite", str(suite), "--n", "8"]).exit_code == 0
    for ck in (sft, cand):
        res = runner.invoke(app, ["factual", "run", str(ck), "--suite", str(suite), "--max-new-tokens", "6"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["factual", "compare", str(sft / "eval" / "factual.json"),
                              str(cand / "eval" / "factual.json")])
    assert res.exit_code == 0 and "McNemar" in res.output, res.output
    res = runner.invoke(app, ["gates", str(cand), "--baseline", str(sft), "--suite", str(suite),
                              "--reference", str(sft), "--max-new-tokens", "6", "--detector-samples", "3"])
    assert res.exit_code == 1, res.output  # no A/B evidence yet: the win-rate gate fails
    gate = json.loads((cand / "eval" / "gate.json").read_text())
    by = {g["name"]: g for g in gate["gates"]}
    assert by["win_rate"]["numbers"] == {"reason": "no evidence"}
    det = json.loads((cand / "eval" / "detectors.json").read_text())
    assert by["kl"]["value"] == det["kl"]["value"] and abs(det["kl"]["baseline"]) < 1e-4  # the SFT model vs itself
    assert (cand / "eval" / "detectors.json").exists() and (cand / "eval" / "samples_candidate.json").exists()
    assert det["formality"]["n"] == det["formality"]["n_baseline"] == 3 * 8  # --detector-samples per item
    res = runner.invoke(app, ["gates", str(cand), "--baseline", str(sft)])
    assert res.exit_code == 2 and "together" in res.output
    prov = json.loads((cand / "eval" / "provenance.json").read_text())  # what the evidence was collected on
    assert prov["baseline"] == str(sft.resolve()) and prov["items"] == 8 and prov["candidate_weights"]
    for args, words in ((["--baseline", str(cand), "--suite", str(suite)], "--baseline: "),
                        (["--reference", str(sft)], "--reference: only used when collecting evidence")):
        res = runner.invoke(app, ["gates", str(cand), *args], terminal_width=200)
        assert res.exit_code == 2 and words in res.output, res.output
    res = runner.invoke(app, ["gates", str(tmp_path / "nope")], terminal_width=200)
    assert res.exit_code == 2 and "CHECKPOINT: no such model directory" in res.output
    assert not (tmp_path / "nope").exists()


def test_checkpoint_hook_for_the_trainers(tmp_path):
    import torch

    from preflab.evaluate.gates import EvidenceConfig, checkpoint_hook
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sft = tiny_gpt2(cfg, seed=0)
    hook = checkpoint_hook(tok, ITEMS[:6], baseline=(sft, tok), reference=(sft, tok),
                           cfg=EvidenceConfig(max_new_tokens=5))
    out = hook(500, sft)  # the baseline judged against itself: no shift, nothing fails but nothing regresses
    assert out["eval/factual_accuracy"] == out["eval/factual_accuracy_baseline"]
    assert abs(out["eval/kl"]) < 1e-4 and out["eval/formality_shift"] == 0
    assert "win_rate" not in out["gates/failed"] and out["gates/passed"] is True


def test_cli_ab_create_refuses_a_copy_of_the_candidate_before_sampling_and_ab_result_an_empty_round(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from preflab.cli import app
    from preflab.models.tiny import train_tokenizer
    from preflab.store import db, ops

    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    cand = _save_tiny(tmp_path / "cand", 1, tok)
    shutil.copytree(cand, tmp_path / "copy")
    url = f"sqlite:///{tmp_path / 's.db'}"
    runner = CliRunner()
    eng = db.make_engine(url)
    db.upgrade(eng)
    with db.session_scope(eng) as s:
        ops.ensure_project(s, name="default")
    eng.dispose()
    r = runner.invoke(app, ["ab", "create", "--candidate", str(cand), "--baseline", str(tmp_path / "copy"),
                            "--name", "blind 1", "--n", "4", "--db", url], terminal_width=200)
    assert r.exit_code == 2 and "--baseline:" in r.output and "same weights as --candidate" in r.output, r.output
    eng = db.make_engine(url)
    with db.session_scope(eng) as s:
        pid = ops.require_project(s, name="default")
        assert ops.list_rounds(s, project_id=pid) == []  # nothing stored
        from preflab.evaluate.ab import ABQuery, store_ab_round

        rid = store_ab_round(s, project_id=pid, name="blind 2", queries=[ABQuery("q1", "How much is Team?")],
                             candidate_source=str(cand), baseline_source="runs/sft", candidate_texts=["$30."],
                             baseline_texts=["$25."])
    eng.dispose()
    r = runner.invoke(app, ["ab", "result", str(rid), "--db", url, "--out", str(tmp_path / "ab.json")])
    assert r.exit_code == 2 and "no judgements yet" in r.output and not (tmp_path / "ab.json").exists()
