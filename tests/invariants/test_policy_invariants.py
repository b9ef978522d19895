"""Policy trainers: a run killed with SIGKILL and resumed equals the uninterrupted run (same seed);
2-process DDP on CPU gives the loss curve of one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import os, signal, sys, json, torch
    torch.set_num_threads(1)
    from preflab.models.hf import load_policy
    from preflab.sandbox.domain import format_prompt, generate_queries
    algo, model_dir, run_dir, mode = sys.argv[1:5]
    kill_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    policy, tok = load_policy(model_dir)
    ref, _ = load_policy(model_dir)
    if algo == "ppo":
        from preflab.train.ppo import PPOConfig, train_ppo
        calls = [0]
        def reward(prompts, texts):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.tensor([len(t) / 40.0 for t in texts])
        # ddp: one minibatch per epoch and per-sample seeds, so 1 and 2 processes see the same global batch
        # mb: two minibatches per process and one sampler per process (no per-sample seeds)
        ddp, mb = mode == "ddp", mode.startswith("mb")
        cfg = PPOConfig(steps=4, prompts_per_step=4, samples_per_prompt=2,
                        max_new_tokens=8, minibatch_size=8 if ddp else (2 if mb else 4), per_sample_seeds=ddp,
                        ppo_epochs=2, lr=1e-3, checkpoint_every=2, progress=False, kl_controller="adaptive",
                        kl_target=0.5, seed=3, cpu=True)
        prompts = [format_prompt(q.text) for q in generate_queries(10, seed=1)]
        train_ppo(cfg, policy=policy, ref=ref, tokenizer=tok, reward_fn=reward, prompts=prompts,
                  run_dir=run_dir, resume=mode.endswith("resume"))
    else:
        from preflab.sandbox.domain import Style, compose
        from preflab.train.data import PreferenceExample
        from preflab.train.dpo import DPOConfig, train_dpo
        import preflab.train.dpo as dpo_mod
        pairs = [PreferenceExample(str(i), q.text, compose(q, Style(tone="warm")), compose(q, Style(tone="dismissive")))
                 for i, q in enumerate(generate_queries(24, seed=2))]
        if kill_at > 0:
            real = dpo_mod.preference_loss
            n = [0]
            def killing(*a, **k):
                n[0] += 1
                if n[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            dpo_mod.preference_loss = killing
        cfg = DPOConfig(batch_size=4, lr=1e-3, epochs=1, checkpoint_every=2, progress=False, seed=3, cpu=True,
                        max_length=512, rpo_alpha=0.5)
        train_dpo(cfg, policy=policy, ref=ref, tokenizer=tok, train=pairs, run_dir=run_dir, resume=mode == "resume")
    from accelerate import PartialState
    state = PartialState()
    if state.is_main_process:  # the tests check that the launch really ran this many processes
        backend = state.backend if state.num_processes > 1 else "none"
        open(os.path.join(run_dir, "world.txt"), "w").write(f"{state.num_processes} {backend}")
''')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
    from preflab.sandbox.domain import sandbox_texts

    out = tmp_path_factory.mktemp("tiny_policy")
    tok = train_tokenizer(sandbox_texts(n=200), 320)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=512,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tiny_gpt2(cfg, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "run.py").write_text(SCRIPT)
    return out


def _launch(model_dir, algo, run_dir, nproc, mode="fresh", kill_at=-1):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` picks accelerate's torchrun launcher; the trainers' cpu=True makes it DDP over gloo
    # (`--cpu` with several processes expects mpirun and would silently start just one)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *(["--multi_gpu"] if nproc > 1 else ["--cpu"]),
           str(model_dir / "run.py"), algo, str(model_dir), str(run_dir), mode, str(kill_at)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 0:
        assert (Path(run_dir) / "world.txt").read_text() == (f"{nproc} gloo" if nproc > 1 else "1 none")
    return done


def _run(model_dir, algo, run_dir, mode, kill_at=-1):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(model_dir / "run.py"), algo, str(model_dir), str(run_dir), mode,
                           str(kill_at)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "policy" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algo, kill_at", [("ppo", 3), ("dpo", 4)])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, model_dir, algo, kill_at):
    # kill_at: PPO dies scoring step 3, DPO in step 4's loss; both after the step-2 checkpoint
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = _run(model_dir, algo, full, "fresh")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = _run(model_dir, algo, cut, "fresh", kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (cut / "ckpt" / "step_000002").exists() and not (cut / "policy").exists()
    resumed = _run(model_dir, algo, cut, "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _metrics(cut) == _metrics(full)
    wf, wc = _weights(full), _weights(cut)
    assert wf.keys() == wc.keys() and all(torch.equal(wf[k], wc[k]) for k in wf)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, model_dir):
    # DPO: the data order and the global batch are deterministic, so the curves must agree
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _launch(model_dir, "dpo", one, 1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launch(model_dir, "dpo", two, 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, 7))
    for a, b in zip(m1, m2, strict=True):
        for key in ("dpo/loss", "train/loss", "dpo/reward_margin", "dpo/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    w1, w2 = _weights(one), _weights(two)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


@pytest.mark.slow
def test_two_process_ppo_matches_one_process_with_the_same_global_batch(tmp_path, model_dir):
    # each rank samples its half of the global batch with per-sample seeds; advantages are
    # whitened and losses averaged over the global batch, so the two runs must agree
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _launch(model_dir, "ppo", one, 1, "ddp")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launch(model_dir, "ppo", two, 2, "ddp")
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, 5))
    for a, b in zip(m1, m2, strict=True):
        for key in ("objective/scores", "objective/kl", "objective/beta", "objective/response_len",
                    "ppo/loss/policy", "ppo/loss/value", "val/explained_variance"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key, a[key], b[key])
    assert m1[-1]["objective/scores"] != m1[0]["objective/scores"]  # it trained
    w1, w2 = _weights(one), _weights(two)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


@pytest.mark.slow
def test_the_documented_launch_of_rm_train_runs_ddp_on_a_cpu_with_ties_and_an_uneven_batch(tmp_path, model_dir):
    """`accelerate launch --multi_gpu --num_processes 2 preflab rm train` with no `cpu` in the config: on a
    machine without a GPU it used to run two independent copies into one directory (every row twice, exit 0),
    and with the CPU forced it crashed gathering unequal shares (ties, a batch of 5). Now: one run, the
    1-process curve, exit 0."""
    from preflab.sandbox.domain import Style, compose, generate_queries

    rows = []
    for i, q in enumerate(generate_queries(30, seed=5)):
        rows.append({"prompt": q.text, "chosen": compose(q, Style(tone="warm")),
                     "rejected": compose(q, Style(tone="dismissive")), **({"is_tie": True} if i % 5 == 0 else {})})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rm.toml").write_text("[rm]\nbatch_size = 5\nepochs = 1\nlr = 1e-3\neval_every = 0\n"
                                      "checkpoint_every = 0\nmax_length = 256\n")
    preflab = str(Path(sys.executable).parent / "preflab")
    args = ["rm", "train", "--data", str(data), "--policy", str(model_dir), "--config", str(tmp_path / "rm.toml"),
            "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([preflab, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", preflab, *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained ") == 1  # one summary, from the first process
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, len(m1) + 1))
    for a, b in zip(m1, m2, strict=True):
        for key in ("train/loss", "train/accuracy", "train/reward_gap"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_a_two_process_ppo_resume_continues_each_process_from_its_own_generators(tmp_path, model_dir):
    """Each process samples and shuffles with its own generators; the checkpoint keeps every process's
    (it kept the first one's, so a resumed 2-process run drifted from step 3: scores 0.29 vs 0.32)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = _launch(model_dir, "ppo", full, 2, "mb")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch(model_dir, "ppo", cut, 2, "mb", kill_at=3)  # both processes die scoring step 3
    assert r.returncode != 0
    assert (cut / "ckpt" / "step_000002" / "sampler_r1.gen.pt").is_file() and not (cut / "policy").exists()
    r = _launch(model_dir, "ppo", cut, 2, "mb_resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(cut) == _metrics(full)
    wf, wc = _weights(full), _weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
