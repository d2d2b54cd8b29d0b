"""parity.py on hand-worked examples and by brute force, and the task plug: tiny runs of --task=parity through
train.py's main and eval.py, its defaults, and bad input stopped with one line before any work."""
import json
import os
import random
from itertools import product

import pytest

import countdown
import eval as ev
import parity
import tasks
import train

# -----------------------------------------------------------------------------
# Demonstrations and reward, worked by hand


@pytest.mark.parametrize("bits, short, long, leap2, leap3", [
    # the long form is the mark ">" and the chain; 1011: prefix parities 1, 1^0=1, 1^0^1=0, 0^1=1; parity 1
    ((1, 0, 1, 1), "1", ">1101", ">11", ">01"),
    # 0110: 0, 1, 0, 0; parity 0
    ((0, 1, 1, 0), "0", ">0100", ">10", ">00"),
    # 11111: 1, 0, 1, 0, 1; parity 1; leap 2 writes the 2nd and 4th, then the 5th (the parity)
    ((1, 1, 1, 1, 1), "1", ">10101", ">001", ">11"),
])
def test_demonstrations_by_hand(bits, short, long, leap2, leap3):
    problem = parity.Problem(bits)
    assert parity.short_demonstration(problem) == short
    assert parity.long_demonstration(problem) == long
    assert parity.long_demonstration(problem, leap=2) == leap2
    assert parity.long_demonstration(problem, leap=3) == leap3
    assert parity.long_demonstration(problem, leap=len(bits)) == ">" + short  # leap d: the parity alone
    assert parity.render_prompt(problem, "compact") == "".join(map(str, bits)) + "\n"


def test_the_mixture_has_p_long_long_demonstrations():
    problem, rng = parity.Problem((1, 0, 1, 1)), random.Random(0)
    texts = [parity.sample_demonstration(problem, 0.3, rng) for _ in range(4000)]
    assert set(texts) == {"1", ">1101"}
    share = texts.count(">1101") / len(texts)
    assert abs(share - 0.3) < 0.03  # 4 standard deviations of a binomial share at n = 4000
    assert all(parity.is_long_form(t) == (t == ">1101") for t in set(texts))
    with pytest.raises(ValueError, match="p_long must be a probability"):
        parity.sample_demonstration(problem, 1.5, rng)


@pytest.mark.parametrize("response, expected", [
    (">1101", (1.0, "correct")),
    ("1", (1.0, "correct")),                     # the short form
    (">0001", (1.0, "correct")),                 # wrong intermediate values: the reward reads the answer only
    (">1101<|endoftext|>", (1.0, "correct")),    # train.py decodes the stop token with the reply
    ("0", (0.0, "wrong_parity")),
    (">1100", (0.0, "wrong_parity")),
    ("", (0.0, "no_answer")),
    (">", (0.0, "no_answer")),
    ("<|endoftext|>", (0.0, "no_answer")),
    (">1 1", (0.0, "invalid_format")),           # a space inside
    (">11011", (0.0, "invalid_format")),         # five values for four bits
    ("2", (0.0, "invalid_format")),
    ("1>1", (0.0, "invalid_format")),
])
def test_reward_by_hand(response, expected):
    assert parity.reward(response, parity.Problem((1, 0, 1, 1))) == expected


# -----------------------------------------------------------------------------
# The held-out split, by brute force over all 2^d strings


def test_held_out_split_is_disjoint_from_the_stream():
    d = 10
    every = set(product((0, 1), repeat=d))
    held_out = {bits for bits in every if parity.is_held_out(bits)}
    assert 0.07 < len(held_out) / len(every) < 0.13  # ~TEST_BUCKETS / N_BUCKETS = 10%
    test = parity.test_set(len(held_out), n_bits=d)
    assert {p.bits for p in test} == held_out and len(test) == len(held_out)  # all of them, each once
    for phase, seed in (("warmup", 0), ("rl", 1)):
        stream = parity.problem_stream(seed, phase, n_bits=d)
        drawn = {next(stream).bits for _ in range(20_000)}
        assert not drawn & held_out
        assert drawn == every - held_out  # 20,000 draws of ~920 strings reach every one of them
    with pytest.raises(ValueError, match=f"only {len(held_out)} of the 2\\^10 bit strings are held out"):
        parity.test_set(len(held_out) + 1, n_bits=d)


def test_large_d_test_set_is_distinct_held_out_and_fixed():
    test = parity.test_set(300, n_bits=24)
    assert len({p.bits for p in test}) == 300 and all(len(p.bits) == 24 for p in test)
    assert all(parity.is_held_out(p.bits) for p in test)
    assert test == parity.test_set(300, n_bits=24)


# -----------------------------------------------------------------------------
# The plug: train.py and eval.py on the parity task

TINY = ["--task=parity", "--n_bits=8", "--dim=64", "--eval_size=8", "--eval_batch_size=8", "--warmup_steps=20",
        "--warmup_batch_size=8", "--rl_steps=2", "--prompts_per_step=4", "--group_size=4", "--eval_every=1",
        "--threads=1", "--progress=false", "--save_every=100", "--p_long=0.5"]


def test_parity_defaults_apply_under_the_command_line():
    cfg, gcfg = train.resolve_config({"task": "parity"}, "cpu")
    assert (cfg.n_bits, cfg.p_long, cfg.leap, gcfg.max_new_tokens) == (16, 0.1, 1, 40)
    # the headline's model and warm-up (README: one layer of dim 256, 2,000 steps at lr 5e-4, weight decay 1.0)
    assert (cfg.dim, cfg.n_layers, cfg.warmup_steps, cfg.warmup_lr, cfg.weight_decay) == (256, 1, 2000, 5e-4, 1.0)
    # and its RL: 100 steps at lr 1e-4, cosine-decayed (README: constant 3e-4 broke runs)
    assert (cfg.rl_steps, cfg.lr, cfg.decay_lr) == (100, 1e-4, True)
    cfg, _ = train.resolve_config({"task": "parity", "p_long": 0.3, "n_bits": 12}, "cpu")
    assert (cfg.p_long, cfg.n_bits) == (0.3, 12)
    default, gdefault = train.resolve_config({}, "cpu")   # countdown: the Config defaults, untouched
    assert default == train.Config(task="countdown", run_preset="cpu") and gdefault == train.grpo.GRPOConfig()


def test_a_tiny_parity_run_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + [f"--out_dir={out}", "--lr_warmup_steps=1"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["phase"], r["step"]) for r in rows if r["phase"] != "warmup"] == \
        [("eval", 0), ("rl", 0), ("eval", 1), ("rl", 1), ("eval", 2)]
    # the parity default decays the RL lr: step 0 ends the 1-step warm-up at the peak, step 1 of 2 is half-way
    # down the cosine to 10%: 1e-4 * (0.1 + 0.9 * (1 + cos(pi / 2)) / 2) = 0.55e-4
    assert [r["lr"] for r in rows if r["phase"] == "rl"] == pytest.approx([1e-4, 0.55e-4], rel=1e-12)
    kept = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert kept and all(len(r["problem"]["bits"]) == 8 for r in kept)
    for r in kept:  # the reward, worked independently: the last value written must be the parity
        values = r["response"].replace("<|endoftext|>", "").strip().removeprefix(">")
        right = values[-1:] == str(sum(r["problem"]["bits"]) % 2) and set(values) <= {"0", "1"} and len(values) <= 8
        assert r["reward"] == float(right), r
    assert json.load(open(os.path.join(out, "final", "run_config.json")))["task"] == "parity"
    results = ev.main([f"--run_dir={out}", "--n_samples=2", "--n_problems=4", f"--out_dir={tmp_path / 'eval'}"])
    assert results["task"] == "parity" and results["n_problems"] == 4
    model = results["models"]["final"]
    held_out = parity.test_set(8, n_bits=8)[:4]  # eval.py reads the run's knobs: the same held-out problems
    generations = [json.loads(line) for line in open(tmp_path / "eval" / "generations.jsonl")]
    assert [g["problem"]["bits"] for g in generations if g["kind"] == "greedy"] == [list(p.bits) for p in held_out]
    assert 0 <= model["long_form"]["sampled_fraction"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--task=foo"], "error: --task=foo: there is no foo.py"),
    (["--task=model"], "error: --task=model: model.py is not a task module, it lacks KNOBS"),
    (["--task=parity", "--n_bits=0"], "error: --n_bits=0: the parity task needs 2 <= n_bits <= 64"),
    (["--task=parity", "--leap=0"], "error: --leap=0"),
    (["--task=parity", "--n_bits=6"], "error: only \\d+ of the 2\\^6 bit strings are held out, fewer than the 500"),
    (["--task=parity", "--n_bits=30", "--max_new_tokens=30"], "error: a long demonstration takes 32 tokens .* --max_new_tokens=30"),
    (["--task=parity", "--template=chat"], "error: the parity task runs on a model trained from scratch"),
])
def test_bad_task_input_stops_with_one_line_before_any_work(args, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        train.main(args + [f"--out_dir={out}", "--progress=false"])
    assert not out.exists()  # nothing was written


def test_both_tasks_provide_the_plug():
    for name in ("countdown", "parity"):
        module = tasks.load(name)
        assert all(hasattr(module, n) for n in tasks.NAMES)
    assert tasks.knobs(countdown, {"n_nums": [3, 4], "n_bits": 8}) == {"n_nums": (3, 4)}


def test_the_readme_example_task_runs_from_one_new_file(tmp_path, monkeypatch):
    """README, "Adding a task": its sorting.py, written to a fresh directory, runs through train.py unchanged."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("## Adding a task")[1]
    source = section.split("```python\n")[1].split("```")[0]
    (tmp_path / "sorting.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "run")
    train.main(["--task=sorting", "--dim=64", "--n_layers=1", "--warmup_steps=3", "--warmup_batch_size=4",
                "--rl_steps=1", "--prompts_per_step=2", "--group_size=2", "--eval_size=3", "--threads=1",
                "--progress=false", f"--out_dir={out}"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["phase"], r["step"]) for r in rows if r["phase"] != "warmup"] == [("eval", 0), ("rl", 0), ("eval", 1)]
    kept = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert kept and all(len(r["problem"]["digits"]) == 6 for r in kept)  # its RUN_DEFAULTS applied
