"""eval.py: pass@k against exact binomials, the math answer grader on hand-written answers, the JSONL loaders'
errors, and end-to-end --compare runs of tiny models whose results are recomputed from the generations file."""
import itertools
import json
import math
import os
import re
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

import benchmarks
import eval as ev

# -----------------------------------------------------------------------------
# pass@k


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # Chen et al. 2021 eq. 1 with exact integers


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 64, 100, 128, 257, 1024])
def test_pass_at_k_matches_exact_binomials(n):
    # every (c, k) for small n; for large n a spread including the extremes
    every = range(n + 1) if n <= 64 else {0, 1, 2, 3, n // 7, n // 3, n // 2, n - 2, n - 1, n}
    cs = sorted(every)
    ks = sorted(k for k in every if 1 <= k <= n)
    for c in cs:
        for k in ks:
            value = ev.pass_at_k(n, c, k)
            assert isinstance(value, float) and math.isfinite(value)
            assert value == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_errors():
    assert ev.pass_at_k(1024, 0, 1024) == 0.0
    assert ev.pass_at_k(1024, 1, 1024) == 1.0
    assert ev.pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    # C(1024, 512) overflows a float (~1e306 is near the limit): the product form must not
    assert ev.pass_at_k(1024, 500, 512) == pytest.approx(float(exact_pass_at_k(1024, 500, 512)), abs=1e-12)
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)
    assert ev.ks_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert ev.ks_for(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert ev.ks_for(1) == [1]

# -----------------------------------------------------------------------------
# Math answers


def write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_aha_phrases():
    assert ev.aha_phrases("Wait, let me double-check: 3*5=15. Hmm, let's verify.") == \
        ["wait", "hmm", "verify", "double-check"]
    assert ev.aha_phrases("await the waiter") == []


def test_cli_parsing():
    cfg = ev.parse_args(["--compare", "a", "b", "--n_samples=8", "--plot", "--ckpt", "c", "--top-p=0.5"])
    assert cfg.compare == ("a", "b") and cfg.n_samples == 8 and cfg.plot is True and cfg.ckpt == "c"
    assert cfg.top_p == 0.5
    assert ev.parse_args(["--compare=a,b", "--plot=false"]).compare == ("a", "b")
    for bad in (["--nope=1"], ["--n_samples=x"], ["--compare", "a"], ["--n_samples=0"], ["--plot=maybe"]):
        with pytest.raises(SystemExit):
            ev.parse_args(bad)

# -----------------------------------------------------------------------------
# End to end: two tiny byte-level models, --compare, results recomputed from generations.jsonl


def save_model(directory, model, run_config):
    from hf_io import save_hf
    from tokenizer import byte_tokenizer
    save_hf(model, directory)
    byte_tokenizer().save(directory)
    with open(os.path.join(directory, "run_config.json"), "w") as f:
        json.dump(run_config, f)
    return str(directory)


def bigram_model(transitions):
    """A transformer that is a bigram Markov chain: attention and MLP outputs are zeroed, so the last position's
    hidden state is RMSNorm(one-hot of its own token) = sqrt(dim) * e_j, and lm_head column j holds
    log P(next | token j) / sqrt(dim). transitions: {char: {next char or "EOS": probability}}."""
    import torch
    from model import ModelConfig, Transformer
    config = ModelConfig(vocab_size=259, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                         tie_embeddings=False, max_seq_len=128)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.norm, model.layers[0].input_layernorm, model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        model.lm_head.weight.fill_(-1e4)
        for j, (ch, nexts) in enumerate(transitions.items()):
            model.embed_tokens.weight[ord(ch), j] = 1.0
            for nxt, p in nexts.items():
                model.lm_head.weight[256 if nxt == "EOS" else ord(nxt), j] = math.log(p) / math.sqrt(config.dim)
    return model


def random_model():
    import torch
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=259, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                   max_seq_len=128))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core machine can be 100x slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_against_generations(results, out_dir, n):
    """Recompute every model's pass@k, greedy accuracy and solved sets from the JSONL, independently."""
    counts, greedy = defaultdict(lambda: defaultdict(int)), defaultdict(dict)
    with open(os.path.join(out_dir, "generations.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        assert set(row) >= {"model", "problem", "prompt", "response", "reward", "reason", "length"}
        if row["kind"] == "greedy":
            greedy[row["model"]][row["problem_index"]] = row["correct"]
        else:
            counts[row["model"]][row["problem_index"]] += row["correct"]
    P = results["n_problems"]
    assert len(rows) == len(results["models"]) * P * (n + 1)
    problems = defaultdict(dict)  # every model saw the same problems
    for row in rows:
        problems[row["model"]][row["problem_index"]] = row["problem"]
    assert len({json.dumps(p, sort_keys=True) for p in problems.values()}) == 1
    for label, m in results["models"].items():
        c = [counts[label][i] for i in range(P)]
        assert m["correct_counts"] == c
        assert set(m["pass_at_k"]) == {str(k) for k in ev.ks_for(n)}
        values = [m["pass_at_k"][str(k)] for k in ev.ks_for(n)]
        assert values == sorted(values), "pass@k must be non-decreasing in k"
        for k in ev.ks_for(n):
            expected = sum(float(exact_pass_at_k(n, ci, k)) for ci in c) / P
            assert m["pass_at_k"][str(k)] == pytest.approx(expected, abs=1e-12)
        assert m["greedy_accuracy"] == pytest.approx(sum(greedy[label].values()) / P)
        assert m["solved"] == [i for i in range(P) if c[i] > 0]
        assert sum(m["reasons"].values()) == pytest.approx(1.0)
        samples = [r for r in rows if r["model"] == label and r["kind"] == "sample"]
        lengths = np.array([r["length"] for r in samples], dtype=float)
        correct = np.array([r["correct"] for r in samples], dtype=float)
        assert m["length"]["mean"] == pytest.approx(lengths.mean())
        if 0 < correct.sum() < len(correct) and lengths.std() > 0:  # point-biserial r = Pearson r with a 0/1 variable
            assert m["length"]["point_biserial_r"] == pytest.approx(np.corrcoef(lengths, correct)[0, 1])
            assert m["length"]["mean_correct"] == pytest.approx(lengths[correct == 1].mean())
        assert m["aha"]["fraction_with"] == pytest.approx(np.mean([bool(r["aha"]) for r in samples]))
    return rows


def test_compare_end_to_end(tmp_path, one_thread, capsys):
    pytest.importorskip("model")
    from countdown import Problem, save_problems
    # The compact prompt ends in "\n"; from there the chain writes "<answer>2+3</answer>" with probability ~0.4 at
    # T=0.6 (it must choose "a" after the first "<", "/" after the second, "2" after the first ">"), else strays
    # into "</answer>2+3<" loops (no_answer). So "2 3 -> 5" and "3 2 -> 5" are solved sometimes, "2 3 -> 6" gives
    # wrong_value and "4 5 -> 9" wrong_numbers; the random model solves nothing.
    follows = {"\n": "<", "a": "n", "n": "s", "s": "w", "w": "e", "e": "r", "r": ">", "2": "+", "+": "3", "3": "<",
               "/": "a"}
    chain = {ch: {nxt: 1.0} for ch, nxt in follows.items()}
    chain.update({"<": {"a": 0.5, "/": 0.5}, ">": {"2": 0.8, "EOS": 0.2}})
    knobs = {"template": "compact", "max_new_tokens": 40}
    a = save_model(tmp_path / "a", bigram_model(chain), knobs)
    b = save_model(tmp_path / "b", random_model(), knobs)
    save_problems(tmp_path / "p.jsonl", [Problem((2, 3), 5), Problem((3, 2), 5), Problem((2, 3), 6),
                                         Problem((4, 5), 9)])
    out = tmp_path / "eval"
    results = ev.main(["--compare", a, b, f"--problems_file={tmp_path / 'p.jsonl'}", "--n_samples=8",
                       "--batch_size=8", f"--out_dir={out}", "--plot"])
    assert set(results) >= {"task", "protocol", "models", "overlap", "grader"}
    assert results["task"] == "countdown" and len(results["models"]) == 2
    check_against_generations(results, out, n=8)
    ma, mb = results["models"].values()
    assert 0 < ma["correct_counts"][0] < 8 and 0 < ma["correct_counts"][1] < 8, ma["correct_counts"]
    assert ma["solved"] == [0, 1] and mb["solved"] == []
    assert 0 < ma["pass_at_k"]["1"] < ma["pass_at_k"]["8"] == 0.5
    assert set(ma["reasons"]) == {"correct", "no_answer", "wrong_value", "wrong_numbers"}
    assert results["overlap"] == {"solved_a": 2, "solved_b": 0, "both": 0, "only_a": 2, "only_b": 0, "neither": 2}
    assert ma["length"]["mean_correct"] >= len("<answer>2+3</answer>")
    try:
        import matplotlib  # noqa: F401
        assert (out / "passk.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out


def test_default_countdown_set_and_math_end_to_end(tmp_path, one_thread):
    pytest.importorskip("model")
    # what train.py writes: template "auto" means compact for a from-scratch (init=scratch) model
    run_config = {"template": "auto", "init": "scratch", "max_new_tokens": 16, "n_nums": [3, 3],
                  "num_range": [1, 9], "target_range": [1, 20]}
    save_model(tmp_path / "run" / "final", random_model(), run_config)
    out = tmp_path / "eval"
    results = ev.main([f"--run_dir={tmp_path / 'run'}", "--n_problems=3", "--n_samples=4", f"--out_dir={out}"])
    check_against_generations(results, out, n=4)
    with open(out / "generations.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert all(len(r["problem"]["nums"]) == 3 and all(1 <= x <= 9 for x in r["problem"]["nums"]) for r in rows)
    assert all(r["prompt"] == " ".join(map(str, r["problem"]["nums"])) + f" -> {r['problem']['target']}\n"
               for r in rows)  # the compact template
    results = ev.main([f"--run_dir={tmp_path / 'run'}", "--n_problems=3", "--n_samples=1", "--max_solutions=2",
                       f"--out_dir={out}"])
    with open(out / "generations.jsonl") as f:
        hard = {tuple(json.loads(line)["problem"]["nums"]) + (json.loads(line)["problem"]["target"],) for line in f}
    assert results["n_problems"] == len(hard) == 3  # by brute force, each solved by at most 2 of 192 expressions
    assert all(sum(_equals(e, t) for e in _expressions(nums)) <= 2 for *nums, t in hard)
    results = ev.main([f"--run_dir={tmp_path / 'run'}", "--n_problems=40", "--n_samples=1", "--target_range=21,30",
                       f"--out_dir={out}"])  # past the run's 1-20: every problem is unseen, so all buckets count
    with open(out / "generations.jsonl") as f:
        targets = [json.loads(line)["problem"]["target"] for line in f]
    assert results["n_problems"] == 40 and all(21 <= t <= 30 for t in targets)
    with pytest.raises(SystemExit, match="target_range LOW,HIGH"):
        ev.main([f"--run_dir={tmp_path / 'run'}", "--target_range=a,b"])
    gsm = write(tmp_path / "gsm.jsonl", [json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"})
                                         for i in range(3)])
    results = ev.main([f"--ckpt={tmp_path / 'run'}", f"--math_file={gsm}", "--n_samples=2", f"--out_dir={out}"])
    assert results["task"] == "gsm8k" and "gsm8k_grade" in results["grader"]
    rows = check_against_generations(results, out, n=2)
    assert rows[0]["prompt"] == "Question: 0+1?\n" + benchmarks.MATH_INSTRUCTION + "\nAnswer:"
    assert list(results["models"]["final"]["by_group"]) == ["gsm8k"]


def _expressions(nums):
    """Every expression over three numbers: each order, both bracketings, each operator (192)."""
    for a, b, c in itertools.permutations(nums):
        for p, q in itertools.product("+-*/", repeat=2):
            yield f"(({a}{p}{b}){q}{c})"
            yield f"({a}{p}({b}{q}{c}))"


def _equals(expression, target):
    try:
        return eval(re.sub(r"(\d+)", r"Fraction(\1)", expression), {"Fraction": Fraction}) == target
    except ZeroDivisionError:
        return False


def test_math_chat_prompt():
    from tokenizer import byte_tokenizer
    prompt = benchmarks.prompt("gsm8k", {"question": "1+1?"}, "chat", byte_tokenizer())
    assert prompt == "<|im_start|>user\n1+1?\n" + benchmarks.MATH_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"


def test_bad_checkpoints_give_messages(tmp_path):
    with pytest.raises(SystemExit, match="run python train.py first or pass --ckpt"):
        ev.main([f"--run_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--ckpt", str(tmp_path / "nope")])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="could not load the checkpoint"):
        ev.main(["--ckpt", str(tmp_path / "broken"), "--n_problems=1", f"--out_dir={tmp_path}"])
    # no run_config.json: a plain HF directory gets TinyZero's base prompt, too long for a 128-token model
    path = save_model(tmp_path / "hf", random_model(), {})
    os.remove(os.path.join(path, "run_config.json"))
    with pytest.raises(SystemExit, match="max_seq_len 128"):
        ev.main(["--ckpt", path, "--n_problems=1", f"--out_dir={tmp_path}"])


# -----------------------------------------------------------------------------
# Confidence intervals (limit-of-RLVR's curves need them to say whether two models cross)


def test_bootstrap_interval_covers_the_true_pass_at_k_at_the_stated_rate():
    """Problems whose success probabilities p come from a known population (uniform on [0, 1]): the true mean
    pass@k is E[1 - (1 - p)^k] = k / (k + 1). 1,000 evaluations of 400 problems x 16 samples; the 95% interval
    must contain the truth in 93-97% of them, for every k. (With 100 problems the percentile interval is a little
    narrow at large k, where each problem's pass@k is nearly 0/1: 92% at k = n.)"""
    n, problems, ks = 16, 400, ev.ks_for(16)
    table = np.array([[ev.pass_at_k(n, c, k) for k in ks] for c in range(n + 1)])  # [c, K] estimator lookup
    truth = np.array([k / (k + 1) for k in ks])
    rng = np.random.default_rng(0)
    covered = np.zeros(len(ks))
    for rep in range(1000):
        counts = rng.binomial(n, rng.uniform(size=problems))
        lo, hi = ev.bootstrap_ci95(table[counts], seed=rep, resamples=400).T
        covered += (lo <= truth) & (truth <= hi)
    rate = covered / 1000
    assert ((0.93 <= rate) & (rate <= 0.97)).all(), dict(zip(ks, rate))


def test_paired_difference_of_pass_at_k():
    a = {"correct_counts": [0, 4, 8, 2]}
    same = ev.differences(a, a, 8)
    assert all(g["difference"] == 0 and g["ci95"] == [0.0, 0.0] for g in same.values())
    b = {"correct_counts": [8, 4, 8, 2]}  # one problem goes from never to always solved: +1/4 at every k
    gap = ev.differences(a, b, 8)
    assert all(g["difference"] == pytest.approx(0.25) and g["ci95"][0] <= 0.25 <= g["ci95"][1]
               for g in gap.values())


def test_compare_three_models_end_to_end(tmp_path, one_thread):
    run_config = {"template": "auto", "init": "scratch", "max_new_tokens": 8, "n_nums": [3, 3],
                  "num_range": [1, 9], "target_range": [1, 20]}
    paths = [save_model(tmp_path / name, bigram_model({"(": {"1": 0.5, "2": 0.5}, "1": {"EOS": 1.0}}) if name == "b"
                        else random_model(), run_config) for name in ("a", "b", "c")]
    out = tmp_path / "eval"
    results = ev.main(["--compare", *paths, "--n_problems=4", "--n_samples=4", f"--out_dir={out}"])
    check_against_generations(results, out, n=4)
    assert list(results["differences"]) == ["b", "c"] and list(results["overlaps"]) == ["b", "c"]
    models = results["models"]
    for label in ("b", "c"):
        for k, gap in results["differences"][label].items():
            assert gap["difference"] == pytest.approx(models[label]["pass_at_k"][k] - models["a"]["pass_at_k"][k])
            assert gap["ci95"][0] <= gap["difference"] <= gap["ci95"][1]
    for m in models.values():
        assert all(lo <= m["pass_at_k"][k] <= hi for k, (lo, hi) in m["ci95"].items())
