"""train_ppo on tiny models: metrics, checkpoints, eval hook, controllers; reward hacking and the alarm."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from preflab.config import ConfigError, from_dict
from preflab.sandbox.domain import (
    OPENERS,
    STILTED_PREFIX,
    format_prompt,
    generate_queries,
    sandbox_texts,
)
from preflab.train.ppo import PPOConfig, RunningMoments, make_kl_controller, prompt_order, train_ppo

from .policy_fixtures import cached_sft, queries


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="PPOConfig.clip_range"):
        PPOConfig(clip_range=1.5)
    with pytest.raises(ConfigError, match="PPOConfig.kl_controller"):
        from_dict(PPOConfig, {"kl_controller": "magic"})
    with pytest.raises(ValueError, match="alarm_thresholds"):
        make_kl_controller(PPOConfig(), detector=lambda t: {})
    for field, bad in (("alarm_window", 0), ("entropy_coef", -0.1)):
        with pytest.raises(ConfigError, match=f"PPOConfig.{field}"):
            PPOConfig(**{field: bad})
    with pytest.raises(ConfigError, match="PPOConfig.kl_estimator"):
        from_dict(PPOConfig, {"kl_estimator": "k2"})


def test_adaptive_horizon_is_scaled_to_the_run():
    c = make_kl_controller(PPOConfig(kl_controller="adaptive", steps=50, prompts_per_step=8, samples_per_prompt=2),
                           None)
    assert c.horizon == 50 * 16 // 10
    assert make_kl_controller(PPOConfig(kl_controller="adaptive", kl_horizon=10000), None).horizon == 10000


def test_prompt_order_covers_every_prompt_each_epoch():
    seen = [i for step in range(5) for i in prompt_order(10, step, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert prompt_order(10, 2, 4, seed=3) == prompt_order(10, 2, 4, seed=3)


def test_running_moments_match_numpy():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 8)]
    m = RunningMoments()
    for c in chunks:
        m.update(c)
    allx = torch.cat(chunks).numpy()
    assert m.mean == pytest.approx(allx.mean(), rel=1e-5) and m.var == pytest.approx(allx.var(), rel=1e-5)


@pytest.fixture(scope="module")
def random_policy():
    from preflab.models.tiny import tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(sandbox_texts(n=200), 320)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=256,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok, cfg


def _tiny_run(random_policy, run_dir, cfg, *, resume, eval_hook=None):
    """``train_ppo`` of a fresh tiny policy on 8 sandbox prompts with a constant reward."""
    from preflab.models.tiny import tiny_gpt2

    tok, mcfg = random_policy
    prompts = [format_prompt(q.text) for q in generate_queries(8, seed=0)]
    return train_ppo(cfg, policy=tiny_gpt2(mcfg, seed=0), ref=tiny_gpt2(mcfg, seed=0), tokenizer=tok,
                     reward_fn=lambda ps, ts: torch.zeros(len(ts)), prompts=prompts, run_dir=run_dir,
                     resume=resume, eval_hook=eval_hook)


def test_resume_refuses_a_changed_config(tmp_path, random_policy):
    cfg = PPOConfig(steps=2, prompts_per_step=4, max_new_tokens=6, minibatch_size=4, ppo_epochs=1,
                    checkpoint_every=1, progress=False, cpu=True)

    def run(c, resume):
        return _tiny_run(random_policy, tmp_path, c, resume=resume)

    run(cfg, False)
    config = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"PPOConfig\.lr: 0\.001 differs from 1e-05 in"):
        run(PPOConfig(**{**cfg.__dict__, "lr": 1e-3}), True)
    assert (tmp_path / "config.json").read_text() == config  # nothing written
    assert run(PPOConfig(**{**cfg.__dict__, "checkpoint_every": 5}), True).steps == 2


def test_a_stop_during_a_checkpoint_evaluation_loses_no_evaluation(tmp_path, random_policy):
    """The evaluation is written before its checkpoint: stopped in between, the run resumes from the
    previous checkpoint and evaluates the step again (the other order left that step unevaluated)."""
    cfg = PPOConfig(steps=3, prompts_per_step=4, max_new_tokens=6, minibatch_size=4, ppo_epochs=1,
                    checkpoint_every=1, progress=False, cpu=True)

    def run(hook, resume):
        return _tiny_run(random_policy, tmp_path, cfg, resume=resume, eval_hook=hook)

    def stop_at_2(step, model):
        if step == 2:
            raise KeyboardInterrupt
        return {"eval/x": float(step)}

    with pytest.raises(KeyboardInterrupt):
        run(stop_at_2, False)
    assert not (tmp_path / "ckpt" / "step_000002").exists()  # stopped before step 2's checkpoint
    res = run(lambda step, model: {"eval/x": float(step)}, True)
    assert res.resumed_from == 1
    assert sorted(f.name for f in (tmp_path / "eval").glob("step_*.json")) == [
        "step_000001.json", "step_000002.json", "step_000003.json"]


def test_ppo_writes_metrics_checkpoints_and_eval(tmp_path, random_policy):
    from preflab.models.tiny import tiny_gpt2

    tok, mcfg = random_policy
    policy, ref = tiny_gpt2(mcfg, seed=0), tiny_gpt2(mcfg, seed=0)
    prompts = [format_prompt(q.text) for q in generate_queries(12, seed=0)]
    calls = []

    def reward(ps, texts):
        assert len(ps) == len(texts)
        return torch.tensor([len(t) / 50.0 for t in texts])

    def hook(step, pol):
        calls.append(step)
        return {"eval/dummy": float(step)}

    cfg = PPOConfig(steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8, minibatch_size=4,
                    ppo_epochs=2, lr=1e-3, checkpoint_every=2, progress=False, kl_controller="adaptive",
                    kl_target=0.5, missing_eos_penalty=2.0)
    res = train_ppo(cfg, policy=policy, ref=ref, tokenizer=tok, reward_fn=reward, prompts=prompts,
                    run_dir=tmp_path, eval_hook=hook)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows == res.metrics
    for key in ("objective/kl", "objective/rlhf_reward", "objective/beta", "objective/scores", "ppo/clipfrac",
                "ppo/approx_kl", "ppo/loss/policy", "ppo/loss/value", "val/explained_variance",
                "time/rollout_s", "time/update_s", "objective/entropy"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert rows[0]["objective/beta"] == 0.02 and rows[1]["objective/beta"] != 0.02  # the adaptive controller moved
    assert calls == [2, 4] and json.loads((tmp_path / "eval" / "step_000004.json").read_text())["eval/dummy"] == 4.0
    assert (tmp_path / "ckpt" / "step_000004" / "state.json").exists()
    assert (tmp_path / "policy" / "config.json").exists() and (tmp_path / "config.json").exists()
    assert len(res.events) == 4 and all(e["cause"].startswith("adaptive") for e in res.events)


def test_checkpoints_lists_each_step_and_exports_one_as_a_model_dir(tmp_path, random_policy):
    from typer.testing import CliRunner

    from preflab.cli import app
    from preflab.models.hf import load_policy
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config

    tok, mcfg = random_policy
    run = tmp_path / "run"
    prompts = [format_prompt(q.text) for q in generate_queries(8, seed=0)]
    cfg = PPOConfig(steps=3, prompts_per_step=4, max_new_tokens=6, minibatch_size=4, ppo_epochs=1, lr=1e-3,
                    checkpoint_every=1, keep_last=2, progress=False, cpu=True)
    train_ppo(cfg, policy=tiny_gpt2(mcfg, seed=0), ref=tiny_gpt2(mcfg, seed=0), tokenizer=tok,
              reward_fn=lambda ps, ts: torch.tensor([len(t) / 20.0 for t in ts]), prompts=prompts, run_dir=run,
              eval_hook=lambda step, m: {"eval/reward": 10.0 + step})

    def cli(*args):
        r = CliRunner().invoke(app, ["checkpoints", str(run), *map(str, args)])
        return r.exit_code, " ".join(r.output.split())

    code, out = cli("--keys", "objective/kl,eval/reward")
    assert code == 0, out
    for step, on_disk in ((1, "no"), (2, "yes"), (3, "yes")):  # keep_last 2: step 1's weights are gone
        assert re.search(rf"│ {step} │ {on_disk} │ \S+ │ {10 + step} │", out), out
    code, out = cli("--export", 3, "--out", tmp_path / "s3")
    assert code == 0 and "a model directory" in out, out
    s3, final = (load_policy(d)[0].state_dict() for d in (tmp_path / "s3", run / "policy"))
    assert s3.keys() == final.keys() and all(torch.equal(s3[k], final[k]) for k in s3)  # the last step = policy/
    assert json.loads((tmp_path / "s3" / "exported_from.json").read_text())["step"] == 3
    code, out = cli("--export", 2, "--out", tmp_path / "s2")
    s2 = load_policy(tmp_path / "s2")[0].state_dict()
    assert code == 0 and any(not torch.equal(s2[k], s3[k]) for k in s2)  # an earlier policy

    other = tmp_path / "other"  # a different width: not this run's architecture
    tiny_gpt2(tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, n_positions=256,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(other)
    tok.save_pretrained(other)
    for args, message in [((1, "--out", tmp_path / "x"), "no checkpoint of step 1 on disk"),
                          ((2,), "--out: --export needs the new model directory"),
                          ((2, "--out", tmp_path / "s3"), "exists and is not empty"),
                          ((2, "--out", tmp_path / "x", "--like", other), "not the architecture of")]:
        code, out = cli("--export", *args)
        assert code == 2 and message in out, (args, out)
        assert not (tmp_path / "x").exists()


# ---- reward hacking on the sandbox --------------------------------------------------------


def _biased_reward(prompts, texts):
    """A biased reward model: it likes stilted formality and a curt (dismissive) tone."""
    return torch.tensor([float(STILTED_PREFIX.strip() in t) + float(OPENERS["dismissive"] in t) for t in texts])


def _drift(texts):
    n = max(len(texts), 1)
    return {"stilted": sum(STILTED_PREFIX.strip() in t for t in texts) / n,
            "dismissive": sum(OPENERS["dismissive"] in t for t in texts) / n}


def _gold_and_proxy(model, tok, qs):
    from preflab.models.sampling import sample
    from preflab.sandbox.gold import gold_utility

    s = sample(model, tok, [format_prompt(q.text) for q in qs], max_new_tokens=80,
               generator=torch.Generator().manual_seed(1))
    return (float(np.mean([gold_utility(q, t) for q, t in zip(qs, s.texts, strict=True)])),
            float(_biased_reward(None, s.texts).mean()))


@pytest.mark.slow
def test_beta_zero_hacks_a_biased_reward_and_the_alarm_stops_it(tmp_path, request):
    from preflab.models.hf import load_policy

    sft_dir = cached_sft(request)
    eval_qs = queries(128, seed=5, split="heldout")
    prompts = [format_prompt(q.text) for q in queries(64, seed=7)]
    sft, tok = load_policy(sft_dir)
    gold_sft, proxy_sft = _gold_and_proxy(sft, tok, eval_qs)
    results = {}
    for alarm in (False, True):
        policy, tok = load_policy(sft_dir)
        ref, _ = load_policy(sft_dir)
        cfg = PPOConfig(steps=8, prompts_per_step=16, samples_per_prompt=2, max_new_tokens=80, minibatch_size=16,
                        ppo_epochs=2, lr=5e-4, kl_beta=0.0, progress=False, checkpoint_every=1000,
                        alarm_thresholds={"stilted": 0.5, "dismissive": 0.5}, alarm_floor=1.0)
        res = train_ppo(cfg, policy=policy, ref=ref, tokenizer=tok, reward_fn=_biased_reward, prompts=prompts,
                        run_dir=tmp_path / str(alarm), detectors=_drift if alarm else None)
        results[alarm] = (*_gold_and_proxy(policy, tok, eval_qs), res)
    gold0, proxy0, res0 = results[False]
    gold1, proxy1, res1 = results[True]
    # beta = 0: the proxy climbs while the gold utility falls (reward hacking)
    assert proxy0 > proxy_sft + 0.5 and gold0 < gold_sft - 1.0, (proxy_sft, proxy0, gold_sft, gold0)
    assert res0.events == [] and all(r["objective/beta"] == 0.0 for r in res0.metrics)
    # the alarm raised beta, each raise logged with its cause, and gold did not fall
    assert res1.events and all(e["cause"].startswith("alarm:") for e in res1.events)
    assert res1.metrics[-1]["objective/beta"] >= 1.0
    # (the first alarm needs a drifted batch to fire, so gold may dip by the eval noise, ~0.3)
    assert gold1 > gold0 + 1.0 and gold1 > gold_sft - 0.75, (gold_sft, gold0, gold1)
    events = [json.loads(line) for line in (tmp_path / "True" / "events.jsonl").read_text().splitlines()]
    assert events == res1.events


@pytest.mark.slow
def test_adaptive_controller_holds_kl_near_its_target(tmp_path, request):
    """Closed loop on the sandbox SFT policy with a reward that pays for drifting away from it: KL
    climbs, beta rises from 0.02 (never below it), and after warm-up the KL stays within +-30% of
    the target (10-step means over the second half of the run). The horizon is one step's samples
    (beta moves up to 20% a step): with twice that, beta caught up late and one window
    overshot by 44%."""
    from preflab.models.hf import load_policy

    sft_dir = cached_sft(request)
    policy, tok = load_policy(sft_dir)
    ref, _ = load_policy(sft_dir)
    target = 2.0
    cfg = PPOConfig(steps=80, prompts_per_step=16, samples_per_prompt=2, max_new_tokens=80, minibatch_size=16,
                    ppo_epochs=2, lr=1e-4, kl_beta=0.02, kl_controller="adaptive", kl_target=target,
                    kl_horizon=32, kl_beta_min=0.02, progress=False, checkpoint_every=1000)
    res = train_ppo(cfg, policy=policy, ref=ref, tokenizer=tok, reward_fn=_biased_reward,
                    prompts=[format_prompt(q.text) for q in queries(64, seed=7)], run_dir=tmp_path)
    kl = np.array([r["objective/kl"] for r in res.metrics])
    beta = np.array([r["objective/beta"] for r in res.metrics])
    means = kl[40:].reshape(4, 10).mean(1)
    assert kl[:10].mean() < 0.5 * target < kl[30:40].mean()  # it had to climb to the target
    assert np.all(np.abs(means / target - 1) <= 0.3), means
    assert beta.min() >= 0.02 and beta.max() > 5 * 0.02  # the leash tightened to hold it there
    assert res.events and all(e["cause"].startswith("adaptive") for e in res.events)


def test_ppo_with_a_separate_value_model(tmp_path, random_policy):
    from preflab.models.heads import ValueHead
    from preflab.models.tiny import tiny_gpt2

    tok, mcfg = random_policy

    class Critic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_gpt2(mcfg, seed=5).transformer
            self.head = ValueHead(mcfg.n_embd)

        def forward(self, input_ids, attention_mask, position_ids):
            h = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
            return self.head(h)

    critic = Critic()
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    policy = tiny_gpt2(mcfg, seed=0)
    cfg = PPOConfig(steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, minibatch_size=4,
                    ppo_epochs=1, value_lr=1e-2, progress=False, checkpoint_every=2)
    res = train_ppo(cfg, policy=policy, ref=tiny_gpt2(mcfg, seed=0), tokenizer=tok,
                    reward_fn=lambda p, t: torch.tensor([len(x) / 10.0 for x in t]), prompts=["User: hi\nAssistant:"] * 3,
                    run_dir=tmp_path, value_model=critic)
    assert len(res.metrics) == 2 and np.isfinite(res.metrics[-1]["ppo/loss/value"])
    assert any(not torch.equal(before[k], v) for k, v in critic.state_dict().items())  # the critic was trained


@pytest.mark.parametrize("kl_estimator", ["k1", "full"])
def test_fused_single_update_equals_the_separate_rollout_forward(tmp_path, random_policy, kl_estimator):
    """One epoch of one minibatch (the RLOO-like shape): taking the old log-probs and values from the
    update's own forward gives the same run as the separate rollout forward, one forward fewer."""
    from preflab.models.tiny import tiny_gpt2

    tok, mcfg = random_policy
    prompts = [format_prompt(q.text) for q in generate_queries(8, seed=1)]

    def run(fuse: bool):
        torch.manual_seed(0)
        policy = tiny_gpt2(mcfg, seed=0)
        cfg = PPOConfig(steps=3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8, minibatch_size=8,
                        ppo_epochs=1, lr=1e-3, progress=False, checkpoint_every=3, fuse_single_update=fuse,
                        kl_estimator=kl_estimator, kl_beta=0.2)
        res = train_ppo(cfg, policy=policy, ref=tiny_gpt2(mcfg, seed=1), tokenizer=tok,
                        reward_fn=lambda p, t: torch.tensor([len(x) / 20.0 for x in t]), prompts=prompts,
                        run_dir=tmp_path / f"fuse{fuse}")
        return res.metrics, {k: v.clone() for k, v in policy.state_dict().items()}

    (m_fused, w_fused), (m_sep, w_sep) = run(True), run(False)
    extra = ("objective/kl_full", "ppo/loss/kl") if kl_estimator == "full" else ()
    for a, b in zip(m_fused, m_sep, strict=True):
        for key in ("objective/kl", "objective/scores", "objective/entropy", "ppo/loss/policy", "ppo/loss/value",
                    "ppo/approx_kl", "val/explained_variance", *extra):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for k in w_fused:
        torch.testing.assert_close(w_fused[k], w_sep[k], atol=1e-5, rtol=1e-4)


def test_ref_floor_costs_the_token_below_it_not_the_whole_response():
    from preflab.train.ppo import rewards_and_advantages

    # one response of 4 tokens; the reference gives token 1 a log-prob of -5 (below a floor of -3)
    ref = torch.tensor([[-0.1, -5.0, -0.2, -0.3]])
    rmask = torch.ones(1, 4)
    hits = (ref < -3.0) & (rmask > 0)
    kw = dict(ref_logprobs=ref, rmask=rmask, scores=torch.tensor([1.0]), beta=0.0, kl_fn=lambda a, b: a - b,
              gamma=1.0, lam=1.0, whiten=False)
    _, _, adv, ret, _ = rewards_and_advantages(ref.clone(), torch.zeros(1, 4), token_rewards=-2.0 * hits.float(), **kw)
    # rewards [0, -2, 0, +1]: with gamma = lambda = 1 and zero values, the returns are the rewards-to-go
    assert ret.tolist() == [[-1.0, -1.0, 1.0, 1.0]] and adv.tolist() == ret.tolist()
    _, _, _, plain, _ = rewards_and_advantages(ref.clone(), torch.zeros(1, 4), **kw)
    assert plain.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # without it, only the score


def test_entropy_bonus_raises_the_policy_entropy(tmp_path, random_policy):
    from preflab.models.tiny import tiny_gpt2

    tok, mcfg = random_policy
    prompts = [format_prompt(q.text) for q in generate_queries(8, seed=2)]

    def entropy_after(coef: float | None) -> float:  # None: untrained
        policy = tiny_gpt2(mcfg, seed=3)
        with torch.no_grad():  # sharpen its next-token distributions (a fresh tiny model's are near uniform)
            policy.transformer.ln_f.weight.mul_(40.0)
        if coef is not None:
            cfg = PPOConfig(steps=3, prompts_per_step=8, max_new_tokens=8, minibatch_size=8, ppo_epochs=2, lr=1e-2,
                            kl_beta=0.0, entropy_coef=coef, progress=False, checkpoint_every=3)
            train_ppo(cfg, policy=policy, ref=copy.deepcopy(policy), tokenizer=tok,
                      reward_fn=lambda p, t: torch.zeros(len(t)), prompts=prompts, run_dir=tmp_path / str(coef))
        ids = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = policy(**ids).logits[:, -1].float()
        return float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean())

    before, plain, bonus = entropy_after(None), entropy_after(0.0), entropy_after(1.0)
    assert bonus > plain + 0.1 and bonus > before + 0.1, (before, plain, bonus)


def _two_step_problem(seed: int = 0, V: int = 3):
    """A tabular policy over two tokens (no EOS): first-token logits (V,), second-token logits per first
    token (V, V), and a reference of the same shape; every one of the V^2 responses enumerated."""
    g = torch.Generator().manual_seed(seed)
    th0, th1 = torch.randn(V, generator=g).requires_grad_(), torch.randn(V, V, generator=g).requires_grad_()
    r0, r1 = torch.randn(V, generator=g).log_softmax(-1), torch.randn(V, V, generator=g).log_softmax(-1)
    a0, a1 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)  # (V^2,) each
    return th0, th1, r0, r1, a0, a1


def _kl_gradient_samples(kl_estimator: str):
    """Per-response gradient of the PPO loss's KL part (beta 1, score 0, gamma = lambda = 1, no values,
    no whitening) and each response's probability, on ``_two_step_problem``; plus the exact gradient
    of the sequence KL(pi || ref), from enumerating every response."""
    from preflab.losses.kl import KL_ESTIMATORS, kl_full
    from preflab.train.ppo import rewards_and_advantages

    th0, th1, r0, r1, a0, a1 = _two_step_problem()
    lp0, lp1 = th0.log_softmax(-1), th1.log_softmax(-1)
    logprobs = torch.stack([lp0[a0], lp1[a0, a1]], -1)  # (N, 2)
    ref_logprobs = torch.stack([r0[a0], r1[a0, a1]], -1)
    exact = (logprobs.sum(-1).exp() * (logprobs - ref_logprobs).sum(-1)).sum()  # sequence KL, a function of theta
    prob = logprobs.sum(-1).exp().detach()
    exact_grad = torch.cat([x.flatten() for x in torch.autograd.grad(exact, [th0, th1], retain_graph=True)])

    n = len(a0)
    state_kl = torch.stack([kl_full(th0, r0).expand(n), kl_full(th1, r1)[a0]], -1)  # (N, 2), differentiable
    _, _, adv, _, scale = rewards_and_advantages(
        logprobs.detach(), torch.zeros(n, 2), ref_logprobs=ref_logprobs, rmask=torch.ones(n, 2),
        scores=torch.zeros(n), beta=1.0, kl_fn=KL_ESTIMATORS.get(kl_estimator), gamma=1.0, lam=1.0, whiten=False,
        state_kl=state_kl.detach() if kl_estimator == "full" else None)
    assert scale.item() == 1.0
    grads = []
    for i in range(n):  # one response's loss: the policy gradient, plus the exact per-state KL in "full"
        loss = -(adv[i] * logprobs[i]).sum() + (state_kl[i].sum() if kl_estimator == "full" else 0.0)
        grads.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, [th0, th1], retain_graph=True)]))
    return torch.stack(grads), prob, exact_grad


@pytest.mark.parametrize("kl_estimator", ["k1", "full"])
def test_kl_penalty_gradient_is_the_exact_gradient_of_the_sequence_kl(kl_estimator):
    grads, prob, exact_grad = _kl_gradient_samples(kl_estimator)
    torch.testing.assert_close((prob[:, None] * grads).sum(0), exact_grad, atol=1e-5, rtol=1e-4)


def test_full_kl_gradient_has_less_variance_than_k1():
    # "full" is k1's gradient averaged over the token at each visited state (Rao-Blackwell): same mean, less spread
    def spread(kl_estimator):
        grads, prob, _ = _kl_gradient_samples(kl_estimator)
        mean = (prob[:, None] * grads).sum(0)
        return (prob * ((grads - mean) ** 2).sum(-1)).sum().item()

    k1, full = spread("k1"), spread("full")
    assert full < 0.5 * k1, (full, k1)


def test_ref_floor_metric_counts_responses_below_it(tmp_path, random_policy):
    from preflab.models.tiny import tiny_gpt2

    tok, mcfg = random_policy
    prompts = [format_prompt(q.text) for q in generate_queries(8, seed=0)]

    def run(name, **kw):
        cfg = PPOConfig(steps=2, prompts_per_step=4, max_new_tokens=6, minibatch_size=4, ppo_epochs=1,
                        progress=False, cpu=True, **kw)
        res = train_ppo(cfg, policy=tiny_gpt2(mcfg, seed=0), ref=tiny_gpt2(mcfg, seed=0), tokenizer=tok,
                        reward_fn=lambda ps, ts: torch.zeros(len(ts)), prompts=prompts, run_dir=tmp_path / name)
        return {r["objective/below_ref_floor"] for r in res.metrics}

    assert run("always", ref_floor=-1e-9) == {1.0}  # every sampled token has p < 1
    assert run("never", ref_floor=-1e6) == {0.0} and run("off") == {0.0}
    with pytest.raises(ConfigError, match="PPOConfig.ref_floor: must be a log-prob < 0"):
        PPOConfig(ref_floor=0.5)
