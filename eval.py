"""Evaluate checkpoints the way the seed papers measure them: greedy accuracy, pass@k curves, failure reasons,
response length, "aha" phrases, and which problems each model can solve at all.

    python eval.py                                   # latest of out/final, out/ckpt, out/warmup
    python eval.py --ckpt out/warmup --n_samples=256  # any of our model directories or a HF Qwen2 directory
    python eval.py --compare out/warmup out/final --plot
    python eval.py --ckpt Qwen2.5-3B --benchmark=bbh --data=BIG-Bench-Hard/bbh --shots=3
    python eval.py --grade=responses.jsonl --benchmark=gsm8k   # grade existing responses, no model
    python eval.py --analyze=out                    # per RL step: accuracy, format, length, aha phrases
    python eval.py --suite BASE RL --suite_files gsm8k=gsm8k.jsonl math=math500.jsonl bbh=bbh mmlu_pro=mmlu.jsonl
    python eval.py --help                            # every field of EvalConfig with its default
    torchrun --nproc_per_node=N eval.py [flags]      # the same results, the generate calls split among N ranks

Protocol (limit-of-RLVR, Yue et al. 2025, arXiv 2504.13837, Sec. 2 and App. A.2): zero-shot prompts, n samples
per problem at temperature 0.6 and top-p 0.95, pass@k for k = 1, 2, 4, ..., n from the unbiased estimator of
Chen et al. 2021 (Codex) averaged over problems, plus the "solvable set" (problems with at least one correct
sample) and its overlap between two models. Greedy accuracy (temperature 0) is reported separately.
- Countdown: the held-out set countdown.test_set with the difficulty knobs and prompt template of the
  checkpoint's run_config.json (TinyZero defaults, 3-4 numbers in 1..99, for a plain HF directory), scored by
  rewards.reward, whose failure reasons are counted. The same for the checkpoint's other train.py task (its
  run_config's "task", or --task; e.g. parity.py, with its knobs and reward): --benchmark=countdown means "the
  train.py task" (tasks.py). The share of replies in the task's long form is reported, greedy and sampled.
- GSM8K, MATH, BBH, MMLU-Pro (--benchmark=NAME --data=FILE, benchmarks.py): each from its published file,
  zero-shot (GSM8K and MATH with SimpleRL's "Please reason step by step, and put your final answer within
  \\boxed{}.", as limit-of-RLVR) or --shots=k, graded by rules checked against each benchmark's own grader on
  real graded outputs, with accuracy per BBH task / MMLU-Pro category. --grade=FILE grades existing responses.
Choices: --compare uses the same problems, n, seeds and max_new_tokens for both models (each with its own prompt
template); sampling prefills each prompt once and samples in chunks of at most batch_size rows, so memory is
bounded whatever n is. The default run (200 problems, n=16) takes minutes on a CPU; the paper uses n=128..1024.
Output in out_dir: results.json, generations.jsonl (every response with its reward and reason), passk.png.
"""
import contextlib
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

import benchmarks
import countdown
import distributed
import tasks
from checkpoint import read_run_config
from cli import opt, parse, pick_device, run_script
from hf_io import load_qwen
from model import generate
from rewards import is_correct
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Config: one dataclass of defaults; every field can be overridden with --key=value (cli.py)


@dataclass
class EvalConfig:
    ckpt: str = opt("", 'model directory; "" = latest of run_dir/final, run_dir/ckpt, run_dir/warmup')
    compare: tuple = opt((), "model directories evaluated side by side: --compare A B [C ...]; differences vs A")
    run_dir: str = opt("out", "train.py's out_dir, searched when ckpt is empty")
    n_problems: int = opt(200, "first n of the held-out set or math file; 0 = all (run_config's eval_size)")
    n_samples: int = opt(16, "n samples per problem for pass@k, k = 1, 2, 4, ..., n (paper: 128 to 1024)")
    temperature: float = opt(0.6, "limit-of-RLVR's sampling temperature")
    top_p: float = opt(0.95, "limit-of-RLVR's nucleus")
    max_new_tokens: int = opt(0, "0 = run_config.json's max_new_tokens, else 1024 (TinyZero's response length)")
    batch_size: int = opt(128, "most rows per generate call; lower it if you run out of memory")
    seed: int = opt(0, "sampling seed (the same per problem for every compared model)")
    template: str = opt("", 'base | chat | compact | auto; "" = run_config.json\'s; auto = train.py\'s rule')
    problems_file: str = opt("", "Countdown problems as JSONL (countdown.save_problems) instead of test_set")
    target_range: tuple = opt((), "Countdown: the targets of the problems instead of the run's range; past it (e.g. "
                                  "101,200 after 1,100) every problem is unseen, so every one is drawn, not only the "
                                  "held-out 5%")
    max_solutions: int = opt(0, "Countdown: only held-out problems that at most this many of the expressions over "
                                "their numbers solve (countdown.count_solutions: hard to hit by guessing); 0 = all")
    task: str = opt("", 'train.py task of --benchmark=countdown: "" = run_config.json\'s task (countdown if none) | '
                        'countdown | parity')
    benchmark: str = opt("countdown", "countdown | gsm8k | math | bbh | mmlu_pro (benchmarks.py); all but countdown "
                                      "read --data")
    data: str = opt("", "the benchmark's file in its published format (BBH: its directory of TASK.jsonl files)")
    shots: int = opt(0, "worked examples before each question: BBH's official 3, else the first k of --shots_file")
    shots_file: str = opt("", "GSM8K, MATH or MMLU-Pro exemplars, in the benchmark's own format")
    grade: str = opt("", "grade this JSONL of responses (the benchmark's fields + 'response') without a model")
    suite: tuple = opt((), "two model directories: the seed paper's table over every benchmark of --suite_files")
    suite_files: tuple = opt((), "NAME=FILE per benchmark for --suite, e.g. gsm8k=test.jsonl bbh=BBH_DIR countdown=")
    analyze: str = opt("", "a train.py run directory: per RL step, what its kept samples show (analysis.json/png)")
    math_file: str = opt("", "GSM8K or MATH JSONL: the same as --benchmark=gsm8k|math --data=FILE")
    math_format: str = opt("auto", "gsm8k | math | auto (from the first row's keys), with --math_file")
    out_dir: str = opt("eval_out", "where results.json, generations.jsonl and passk.png go")
    plot: bool = opt(False, "also draw the pass@k curves (needs matplotlib)")
    device: str = opt("auto", "auto = cuda, then mps, then cpu")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default (1 is faster on a busy machine)")
    dtype: str = opt("auto", "float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on CUDA)")
    decode: str = opt("eager", "pass@k sampling's decode loop (model.generate): eager | static | compiled")


def parse_args(argv):
    """The shared command line (cli.py), then the rules a valid EvalConfig must follow; SystemExit if not."""
    try:
        cfg = EvalConfig(**parse(argv, [EvalConfig], __doc__.strip().split("\n\n")[1]))
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}") from None
    wrong = [rule for rule, ok in [
        ("--compare takes two or more directories", len(cfg.compare) != 1), ("n_samples >= 1", cfg.n_samples >= 1),
        ("--suite takes two directories and --suite_files NAME=FILE ...", len(cfg.suite) in (0, 2)
         and all(f.partition("=")[0] in ("countdown", *benchmarks.BENCHMARK_NAMES) for f in cfg.suite_files)
         and (not cfg.suite or cfg.suite_files)),
        ("batch_size >= 1", cfg.batch_size >= 1), ("n_problems >= 0", cfg.n_problems >= 0),
        ("max_solutions >= 0", cfg.max_solutions >= 0),
        ("target_range LOW,HIGH (integers)", len(cfg.target_range) in (0, 2)
         and all(str(x).lstrip("-").isdigit() for x in cfg.target_range)),
        ("temperature >= 0", cfg.temperature >= 0), ("0 < top_p <= 1", 0 < cfg.top_p <= 1),
        ("max_new_tokens >= 0", cfg.max_new_tokens >= 0), ("math_format gsm8k|math|auto",
                                                           cfg.math_format in ("gsm8k", "math", "auto")),
        ("template base|chat|compact|auto", cfg.template in ("", "auto", "base", "chat", "compact")),
        ("dtype float32|bfloat16|float16|auto", cfg.dtype in ("auto", "float32", "bfloat16", "float16")),
        ("decode eager|static|compiled", cfg.decode in ("eager", "static", "compiled")),
        ("benchmark countdown|" + "|".join(benchmarks.BENCHMARK_NAMES),
         cfg.benchmark in ("countdown", *benchmarks.BENCHMARK_NAMES)), ("shots >= 0", cfg.shots >= 0)] if not ok]
    if wrong:
        raise SystemExit("invalid options, need: " + "; ".join(wrong))
    return replace(cfg, target_range=tuple(int(x) for x in cfg.target_range))

# -----------------------------------------------------------------------------
# pass@k


def pass_at_k(n, c, k):
    """Unbiased pass@k for one problem with c correct out of n samples (Chen et al. 2021, eq. 1)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i): no huge binomials, no overflow
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def bootstrap_ci95(per_problem, seed, resamples=2000):
    """per_problem [P, K] (each problem's pass@k for every k) -> [K, 2] the 95% percentile interval of its mean
    over problems, by resampling problems with replacement (Efron's bootstrap). A problem's estimate already holds
    its own sampling noise, so resampling problems covers both sources of variance."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(per_problem), size=(resamples, len(per_problem)))  # [B, P]
    means = per_problem[rows].mean(axis=1)                                        # [B, K]
    return np.percentile(means, [2.5, 97.5], axis=0).T


def ks_for(n):
    """k = 1, 2, 4, ... <= n, and n itself."""
    ks = [2 ** j for j in range(n.bit_length()) if 2 ** j <= n]
    return ks if ks[-1] == n else ks + [n]

# -----------------------------------------------------------------------------
# "Aha" and self-verification phrases (R1-Zero's "aha moment"), matched case-insensitively on word boundaries

AHA_PHRASES = {
    "wait": r"\bwait\b", "hmm": r"\bhm+\b", "aha": r"\baha\b", "mistake": r"\bmistake\b",
    "let me check": r"\blet(?: me|'s| us) (?:check|see)\b", "verify": r"\bverif(?:y|ies|ied|ying|ication)\b",
    "recheck": r"\bre-?check", "double-check": r"\bdouble[- ]check", "let me try": r"\blet(?: me|'s| us) try\b",
    "try again": r"\btry (?:again|another)\b", "reconsider": r"\bre-?(?:consider|evaluate)\b"}
AHA_REGEXES = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in AHA_PHRASES.items()}


def aha_phrases(text):
    return [name for name, regex in AHA_REGEXES.items() if regex.search(text)]

# -----------------------------------------------------------------------------
# Loading checkpoints


def resolve_ckpt(cfg):
    """--ckpt (a model directory, or a run directory), else the newest model of run_dir: final (after RL),
    ckpt (the latest save), warmup."""
    if cfg.ckpt and os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        return cfg.ckpt
    for name in ("final", "ckpt", "warmup"):
        if os.path.isfile(os.path.join(cfg.ckpt or cfg.run_dir, name, "config.json")):
            return os.path.join(cfg.ckpt or cfg.run_dir, name)
    if cfg.ckpt:
        return cfg.ckpt  # not a model directory: the loader says what is missing
    raise SystemExit(f"no checkpoint in {cfg.run_dir}/final, {cfg.run_dir}/ckpt or {cfg.run_dir}/warmup: "
                     f"run python train.py first or pass --ckpt")


def load_model(path, cfg):
    try:
        device = pick_device(cfg.device)
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}") from None
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
    try:
        return load_qwen(path, device=device, dtype=getattr(torch, dtype)), load_tokenizer(path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SystemExit(f"could not load the checkpoint {path!r}: {e}") from None

# -----------------------------------------------------------------------------
# Sampling and scoring


def sample_all(model, prompt_ids, n, temperature, cfg, max_new_tokens, stop_ids, vocab_limit, desc,
               world=distributed.SINGLE):
    """Yield (problem index, n completions) for every prompt. At most batch_size rows per generate call: one
    prompt's n samples in chunks when n >= batch_size, else several prompts per call. Each call's seed depends
    only on (seed, first problem, first sample), so compared models sample with the same seeds. Under torchrun
    a rank makes its share of these same calls (whole calls, the same prompts and seeds): its problems' samples
    are the ones a single process would draw."""
    per_call = max(1, cfg.batch_size // n)  # prompts per call (1 when n >= batch_size)
    chunk = min(n, cfg.batch_size)          # samples per prompt per call
    firsts = world.shard(range(0, len(prompt_ids), per_call))  # this rank's share of one process's calls
    with tqdm(total=len(prompt_ids[firsts[0]:firsts[-1] + per_call]) * n if firsts else 0, desc=desc, unit="sample",
              leave=False, disable=not world.main) as bar:
        for first in firsts:
            prompts = prompt_ids[first:first + per_call]
            rows = [[] for _ in prompts]
            for start in range(0, n, chunk):
                samples = min(chunk, n - start)
                out = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                               stop_ids=stop_ids, seed=cfg.seed * 1_000_003 + first * 4099 + start,
                               num_samples=samples, vocab_limit=vocab_limit, decode=cfg.decode)
                for j in range(len(prompts)):
                    rows[j].extend(out[j * samples:(j + 1) * samples])
                bar.update(len(out))
            yield from enumerate(rows, start=first)


def greedy(model, prompt_ids, max_new_tokens, stop_ids, vocab_limit, batch_size):
    """Greedy completions (temperature 0) of every prompt, batch_size prompts per generate call: the held-out
    evaluation of train.py and of this script."""
    completions = []
    for first in range(0, len(prompt_ids), batch_size):
        completions += generate(model, prompt_ids[first:first + batch_size], max_new_tokens, temperature=0.0,
                                stop_ids=stop_ids, vocab_limit=vocab_limit)
    return completions


def render_prompts(task, plug, items, template, tokenizer, cfg, data):
    """The train.py task's prompt (plug: its module, as in training) or the benchmark's, with its exemplars
    (built once per group)."""
    if task == "countdown":
        return [plug.render_prompt(item, template, tokenizer) for item in items]
    shots = {}
    for item in items:
        if item["group"] not in shots:
            shots[item["group"]] = benchmarks.exemplars(task, item, cfg.shots, data, cfg.shots_file)
    return [benchmarks.prompt(task, item, template, tokenizer, shots[item["group"]]) for item in items]


def evaluate_model(label, path, items, task, plug, cfg, max_new_tokens, jsonl, data, world=distributed.SINGLE):
    """Greedy + n samples per problem for one model; writes every generation to jsonl; returns its metrics.
    plug: the train.py task module (countdown's prompt setup also serves the benchmarks). Under torchrun each rank
    generates for its share of the generate calls, and rank 0 scores them all (the other ranks return None)."""
    model, tokenizer = load_model(path, cfg)
    run_config = read_run_config(path)
    prompt_setup = plug.prompt_setup if task == "countdown" else countdown.prompt_setup
    try:
        template, stop_ids = prompt_setup(tokenizer, cfg.template or run_config.get("template", "auto"),
                                          run_config.get("init") == "scratch")
    except ValueError as e:
        raise SystemExit(f"{label}: {e}") from None
    prompts = render_prompts(task, plug, items, template, tokenizer, cfg, data)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    room = model.config.max_seq_len - max(len(p) for p in prompt_ids)
    if room < 1:
        raise SystemExit(f"{label}: the longest prompt ({max(map(len, prompt_ids))} tokens) fills the model's "
                         f"max_seq_len {model.config.max_seq_len}; use a shorter --template")
    if max_new_tokens > room:
        print(f"{label}: max_new_tokens {max_new_tokens} -> {room} (max_seq_len {model.config.max_seq_len})")
        max_new_tokens = room
    stats = {"greedy": [0] * len(items), "correct": [0] * len(items), "samples": [], "reasons": Counter(),
             "greedy_reasons": Counter(), "aha": Counter(), "greedy_long": 0}

    def record(kind, i, j, tokens):
        stopped = bool(tokens) and tokens[-1] in stop_ids
        content = tokens[:-1] if stopped else tokens  # the stop token is not part of the text
        response = tokenizer.decode(content)
        item = items[i]
        if task == "countdown":
            reward_value, reason = plug.reward(response, item)
        else:
            right, _, reason = benchmarks.grade(task, response, item)
            reward_value = float(right)
        correct, phrases, long = is_correct(reason), aha_phrases(response), plug.is_long_form(response)
        jsonl.write(json.dumps({"model": label, "kind": kind, "problem_index": i, "sample": j,
                                "problem": item.to_dict() if task == "countdown" else item, "prompt": prompts[i],
                                "response": response, "reward": reward_value, "reason": reason, "correct": correct,
                                "length": len(content), "stopped": stopped, "aha": phrases}) + "\n")
        if kind == "greedy":
            stats["greedy"][i] = int(correct)
            stats["greedy_reasons"][reason] += 1
            stats["greedy_long"] += long
            return
        stats["correct"][i] += correct
        stats["samples"].append((correct, len(content), bool(phrases), long))
        stats["reasons"][reason] += 1
        stats["aha"].update(phrases)

    # greedy in the calls of one process (batch_size prompts each), split among ranks by call, then gathered
    firsts = world.shard(range(0, len(prompt_ids), cfg.batch_size))
    greedy_out = world.gather(greedy(model, prompt_ids[firsts[0]:firsts[-1] + cfg.batch_size], max_new_tokens,
                                     stop_ids, tokenizer.n_vocab, cfg.batch_size) if firsts else [])
    sampled = world.gather(sample_all(model, prompt_ids, cfg.n_samples, cfg.temperature, cfg, max_new_tokens,
                                      stop_ids, tokenizer.n_vocab, label, world))
    del model
    if not world.main:
        return None
    for i, tokens in enumerate(greedy_out):
        record("greedy", i, 0, tokens)
    for i, completions in sampled:
        for j, tokens in enumerate(completions):
            record("sample", i, j, tokens)
    groups = [item["group"] for item in items] if task != "countdown" else None
    return {"ckpt": path, "template": template, "max_new_tokens": max_new_tokens,
            **summarize(stats, cfg.n_samples, groups)}

# -----------------------------------------------------------------------------
# Metrics


def point_biserial(lengths, correct):
    """Pearson r between length and the 0/1 correctness, r = (M1 - M0) / s * sqrt(p (1 - p)); None if either is
    constant."""
    if not (0 < correct.sum() < len(correct) and lengths.std() > 0):
        return None
    p, gap = correct.mean(), lengths[correct].mean() - lengths[~correct].mean()
    return float(gap / lengths.std() * math.sqrt(p * (1 - p)))


def per_problem_pass_at_k(counts, n):
    """[P, K] each problem's unbiased pass@k for k in ks_for(n)."""
    return np.array([[pass_at_k(n, c, k) for k in ks_for(n)] for c in counts])


def differences(base, other, n):
    """pass@k of other minus base on the same problems, each with a paired bootstrap 95% interval (the same
    resampled problems for both models)."""
    gap = per_problem_pass_at_k(other["correct_counts"], n) - per_problem_pass_at_k(base["correct_counts"], n)
    return {str(k): {"difference": float(d), "ci95": [float(lo), float(hi)]}
            for k, d, (lo, hi) in zip(ks_for(n), gap.mean(axis=0), bootstrap_ci95(gap, seed=1))}


def summarize(stats, n, groups=None):
    """Greedy accuracy, pass@k, failure reasons, response lengths, aha phrases; all over the n samples. groups:
    each problem's BBH task or MMLU-Pro category, for a breakdown of greedy accuracy and pass@1."""
    counts, samples = stats["correct"], np.array(stats["samples"], dtype=np.float64)  # (P*n, 4)
    correct, lengths, aha, long = samples[:, 0] > 0, samples[:, 1], samples[:, 2] > 0, samples[:, 3] > 0
    total = len(samples)

    def mean(x):  # None for an empty selection (e.g. no correct responses)
        return float(x.mean()) if len(x) else None

    r_pb = point_biserial(lengths, correct)
    return {"n_problems": len(counts), "n_samples": n, "greedy_accuracy": sum(stats["greedy"]) / len(counts),
            # pass@k averaged over problems (limit-of-RLVR, App. A.2)
            "pass_at_k": {str(k): float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in ks_for(n)},
            "ci95": {str(k): [float(lo), float(hi)] for k, (lo, hi) in zip(ks_for(n), bootstrap_ci95(
                per_problem_pass_at_k(counts, n), seed=0))},
            "sample_accuracy": float(correct.mean()),
            "reasons": {reason: count / total for reason, count in sorted(stats["reasons"].items())},
            "greedy_reasons": dict(sorted(stats["greedy_reasons"].items())),
            "length": {"mean": mean(lengths), "mean_correct": mean(lengths[correct]),
                       "mean_incorrect": mean(lengths[~correct]), "point_biserial_r": r_pb},
            "long_form": {"greedy_fraction": stats["greedy_long"] / len(counts), "sampled_fraction": float(long.mean()),
                          "accuracy_long": mean(correct[long]), "accuracy_short": mean(correct[~long])},
            "aha": {"fraction_with": float(aha.mean()), "phrases": dict(stats["aha"].most_common()),
                    "accuracy_with": mean(correct[aha]), "accuracy_without": mean(correct[~aha])},
            "correct_counts": counts,
            "solved": [i for i, c in enumerate(counts) if c > 0],  # the "solvable set": correct at some k <= n
            "greedy_correct": stats["greedy"],
            "by_group": None if groups is None else {
                group: {"n": sum(g == group for g in groups),
                        "greedy_accuracy": float(np.mean([a for a, g in zip(stats["greedy"], groups) if g == group])),
                        "pass_at_1": float(np.mean([c / n for c, g in zip(counts, groups) if g == group]))}
                for group in sorted(set(groups))}}


def overlap(a, b):
    """Solvable-set overlap of two models (limit-of-RLVR Sec. 3: RL's set is nearly a subset of the base's)."""
    solved_a, solved_b = set(a["solved"]), set(b["solved"])
    return {"solved_a": len(solved_a), "solved_b": len(solved_b), "both": len(solved_a & solved_b),
            "only_a": len(solved_a - solved_b), "only_b": len(solved_b - solved_a),
            "neither": a["n_problems"] - len(solved_a | solved_b)}

# -----------------------------------------------------------------------------
# Output


def print_table(results):
    """Compared models as columns; pass@k, greedy accuracy, lengths, failure reasons and aha phrases as rows."""
    models, labels, protocol = list(results["models"].values()), list(results["models"]), results["protocol"]
    width = max(14, *map(len, labels)) + 2

    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [("greedy accuracy", lambda m: m["greedy_accuracy"])]
    rows += [row for k in models[0]["pass_at_k"] for row in (
        (f"pass@{k}", lambda m, k=k: m["pass_at_k"][k]),
        ("  95% CI", lambda m, k=k: f"[{m['ci95'][k][0]:.3f}, {m['ci95'][k][1]:.3f}]"))]
    rows += [("solved at some k <= n", lambda m: len(m["solved"])),
             ("length: all", lambda m: m["length"]["mean"]),
             ("length: correct/incorrect", lambda m: f"{fmt(m['length']['mean_correct'])}/"
                                                     f"{fmt(m['length']['mean_incorrect'])}"),
             ("corr(length, correct)", lambda m: m["length"]["point_biserial_r"]),
             ("long form: greedy/sampled", lambda m: f"{fmt(m['long_form']['greedy_fraction'])}/"
                                                     f"{fmt(m['long_form']['sampled_fraction'])}"),
             ("accuracy: long/short", lambda m: f"{fmt(m['long_form']['accuracy_long'])}/"
                                                f"{fmt(m['long_form']['accuracy_short'])}")]
    rows += [(f"reason: {r}", lambda m, r=r: m["reasons"].get(r, 0.0))
             for r in sorted({r for m in models for r in m["reasons"]})]
    rows += [(f"greedy, pass@1: {g}"[:26], lambda m, g=g: f"{fmt(m['by_group'][g]['greedy_accuracy'])}, "
                                                         f"{fmt(m['by_group'][g]['pass_at_1'])}")
             for g in (models[0]["by_group"] or {})]
    rows += [("aha phrase in response", lambda m: m["aha"]["fraction_with"]),
             ("accuracy: aha/no aha", lambda m: f"{fmt(m['aha']['accuracy_with'])}/"
                                                f"{fmt(m['aha']['accuracy_without'])}")]
    print(f"\n{results['task']}: {results['n_problems']} problems, n={protocol['n_samples']} samples at "
          f"T={protocol['temperature']}, top-p={protocol['top_p']}, max_new_tokens={protocol['max_new_tokens']}")
    print(f"{'':<26}" + "".join(f"{label:>{width}}" for label in labels))
    for name, value in rows:
        print(f"{name:<26}" + "".join(f"{fmt(value(m)):>{width}}" for m in models))
    for label, gaps in results["differences"].items():
        print(f"{label} - {labels[0]}: " + ", ".join(f"pass@{k} {g['difference']:+.3f} [{g['ci95'][0]:+.3f}, "
                                                    f"{g['ci95'][1]:+.3f}]" for k, g in gaps.items()))
        o = results["overlaps"][label]
        print(f"  solvable sets: both {o['both']}, only {labels[0]} {o['only_a']}, only {label} {o['only_b']}, "
              f"neither {o['neither']}")
    print(f"grader: {results['grader']}")


def pyplot(figure):
    """matplotlib.pyplot (optional, off-screen), or None with a line saying which figure is skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"matplotlib is not installed (pip install matplotlib): no {figure}")
        return None


def plot_pass_at_k(results, path):
    plt = pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in results["models"].items():
        ks = [int(k) for k in m["pass_at_k"]]
        line, = ax.plot(ks, list(m["pass_at_k"].values()), marker="o", label=label)
        ax.fill_between(ks, [m["ci95"][str(k)][0] for k in ks], [m["ci95"][str(k)][1] for k in ks],
                        color=line.get_color(), alpha=0.2)  # the 95% bootstrap interval over problems
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k", title=f"{results['task']} pass@k", ylim=(-0.02, 1.02))
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

# -----------------------------------------------------------------------------
# Main


def short_labels(paths):
    """out/warmup, out/final -> "warmup", "final": the shortest distinct path suffixes."""
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]  # the same directory twice


def main(argv=None):
    """Under torchrun (torchrun --nproc_per_node=N eval.py ...) the ranks split the generate calls of every model
    and rank 0 prints and writes the results, the same numbers as one process."""
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    world = distributed.from_env()
    distributed.only_main_prints(world)
    try:
        if world.size > 1:  # the process group, and this rank's device (cuda:LOCAL_RANK on CUDA)
            world, device = distributed.init(pick_device(cfg.device))
            cfg = replace(cfg, device=device)
        return run(cfg, world)
    except (FileNotFoundError, ValueError) as e:  # bad input files or knobs: a message, not a traceback
        raise SystemExit(f"eval.py: {e}") from None
    finally:
        distributed.close()


def benchmark_and_data(cfg):
    """(benchmark, its file) from --benchmark/--data, or from the older --math_file/--math_format."""
    if not cfg.math_file:
        if cfg.benchmark != "countdown" and not (cfg.data or cfg.grade):
            raise ValueError(f"--benchmark={cfg.benchmark} needs --data=FILE, the benchmark's file")
        return cfg.benchmark, cfg.data
    if cfg.math_format != "auto":
        return cfg.math_format, cfg.math_file
    return ("gsm8k" if "question" in benchmarks.read_jsonl(cfg.math_file)[0] else "math"), cfg.math_file


def grade_file(cfg):
    """--grade FILE: grade a JSONL of existing responses (each row the benchmark row's own fields plus "response")
    without a model -> accuracy overall and per task or category; every row with its verdict in graded.jsonl."""
    task, _ = benchmark_and_data(cfg)
    if task == "countdown":
        raise ValueError("--grade needs --benchmark=gsm8k|math|bbh|mmlu_pro")
    rows = benchmarks.load(task, cfg.grade)
    os.makedirs(cfg.out_dir, exist_ok=True)
    groups = {}
    with open(os.path.join(cfg.out_dir, "graded.jsonl"), "w", encoding="utf-8") as f:
        for number, row in enumerate(rows, start=1):
            if not isinstance(row.get("response"), str):
                raise ValueError(f"{cfg.grade}, row {number}: no 'response' text to grade")
            correct, extracted, reason = benchmarks.grade(task, row["response"], row)
            groups.setdefault(row["group"], []).append(correct)
            f.write(json.dumps({**row, "correct": correct, "extracted": extracted, "reason": reason}) + "\n")
    results = {"benchmark": task, "n": len(rows), "accuracy": sum(map(sum, groups.values())) / len(rows),
               "by_group": {g: {"n": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(groups.items())},
               "grader": benchmarks.GRADER_RULES[task]}
    print(f"{task}: {results['n']} responses, accuracy {100 * results['accuracy']:.2f}%")
    for group, r in results["by_group"].items() if len(groups) > 1 else ():
        print(f"  {group:<44} {r['n']:>6}  {100 * r['accuracy']:6.2f}%")
    print(f"grader: {results['grader']}\nwrote {cfg.out_dir}/graded.jsonl")
    with open(os.path.join(cfg.out_dir, "graded.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def run_suite(cfg, world=distributed.SINGLE):
    """--suite A B: both models on every benchmark of --suite_files (same problems, samples and seeds), each
    benchmark's results in out_dir/NAME/, and one table of greedy accuracy and pass@1 (suite.json)."""
    table = {}
    for name, _, path in (item.partition("=") for item in cfg.suite_files):
        sub = replace(cfg, suite=(), suite_files=(), compare=cfg.suite, benchmark=name, data=path,
                      out_dir=os.path.join(cfg.out_dir, name))
        results = run(sub, world)
        if not world.main:
            continue
        table[name] = {label: {"greedy_accuracy": m["greedy_accuracy"], "pass_at_1": m["pass_at_k"]["1"]}
                       for label, m in results["models"].items()}
    if not world.main:
        return None
    labels = list(next(iter(table.values())))
    print(f"\nsuite: {' vs '.join(cfg.suite)} (greedy accuracy / pass@1 over n={cfg.n_samples})")
    print(f"{'benchmark':<12}" + "".join(f"{label:>28}" for label in labels))
    for name, row in table.items():
        print(f"{name:<12}" + "".join(f"{row[label]['greedy_accuracy']:>14.3f}{row[label]['pass_at_1']:>14.3f}"
                                      for label in labels))
    with open(os.path.join(cfg.out_dir, "suite.json"), "w") as f:
        json.dump({"models": list(cfg.suite), "labels": labels, "table": table}, f, indent=1)
    print(f"wrote {cfg.out_dir}/suite.json")
    return table


def analyze_run(cfg):
    """--analyze RUN_DIR: from the rollouts train.py kept (samples.jsonl), per RL step: accuracy, failure reasons
    (format violations by kind), response length and its correlation with correctness, the share with an "aha"
    phrase and the accuracy with and without one, and the long-form share (the seed paper's training analyses);
    from metrics.jsonl, over all of the step's rollouts: the policy's mean token entropy and the long-form share."""
    saved = [read_run_config(os.path.join(cfg.analyze, d)) for d in ("final", "ckpt", "warmup")]
    plug = tasks.load(cfg.task or next((c["task"] for c in saved if "task" in c), "countdown"))  # its long form
    by_step = {}
    for row in benchmarks.read_jsonl(os.path.join(cfg.analyze, "samples.jsonl")):
        by_step.setdefault(row["step"], []).append(row)
    metrics_path = os.path.join(cfg.analyze, "metrics.jsonl")
    logged = {r["step"]: r for r in benchmarks.read_jsonl(metrics_path) if r.get("phase") == "rl"} \
        if os.path.isfile(metrics_path) else {}
    steps = []
    for step, rows in sorted(by_step.items()):
        correct = np.array([is_correct(r["reason"]) for r in rows])
        lengths = np.array([r["length"] for r in rows], dtype=np.float64)
        aha = np.array([bool(aha_phrases(r["response"])) for r in rows])
        steps.append({"step": step, "n": len(rows), "accuracy": float(correct.mean()),
                      "reasons": {k: v / len(rows) for k, v in sorted(Counter(r["reason"] for r in rows).items())},
                      "length": float(lengths.mean()), "length_correct_r": point_biserial(lengths, correct),
                      "aha_frac": float(aha.mean()),
                      "accuracy_aha": float(correct[aha].mean()) if aha.any() else None,
                      "accuracy_no_aha": float(correct[~aha].mean()) if (~aha).any() else None,
                      "long_frac": float(np.mean([plug.is_long_form(r["response"]) for r in rows])),
                      "entropy": logged.get(step, {}).get("entropy"),                 # all rollouts of the step
                      "long_frac_all": logged.get(step, {}).get("long_frac")})
    print(f"{'step':>5} {'n':>4} {'accuracy':>9} {'length':>8} {'r(len,ok)':>10} {'aha':>6} {'long':>6} "
          f"{'entropy':>8} {'long(all)':>9}  reasons")
    for s in steps:
        r = "-" if s["length_correct_r"] is None else f"{s['length_correct_r']:.2f}"
        entropy, long_all = (("-" if v is None else f"{v:.3f}") for v in (s["entropy"], s["long_frac_all"]))
        print(f"{s['step']:>5} {s['n']:>4} {s['accuracy']:>9.3f} {s['length']:>8.1f} {r:>10} {s['aha_frac']:>6.2f} "
              f"{s['long_frac']:>6.2f} {entropy:>8} {long_all:>9}  "
              + ", ".join(f"{k} {v:.2f}" for k, v in s["reasons"].items()))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "analysis.json"), "w") as f:
        json.dump({"run": cfg.analyze, "steps": steps}, f, indent=1)
    plt = pyplot("analysis.png")
    if plt is not None:
        keys = ("accuracy", "length", "aha_frac", "long_frac") + (("entropy",) if logged else ())
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
        for ax, key in zip(axes, keys):
            ax.plot([s["step"] for s in steps], [s[key] for s in steps])
            ax.set(xlabel="RL step", title=key)
        fig.savefig(os.path.join(cfg.out_dir, "analysis.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote {cfg.out_dir}/analysis.json")
    return steps


def run(cfg, world=distributed.SINGLE):
    if (cfg.analyze or cfg.grade) and not world.main:  # no model to run: rank 0 alone
        return None
    if cfg.analyze:
        return analyze_run(cfg)
    if cfg.grade:
        return grade_file(cfg)
    if cfg.suite:
        return run_suite(cfg, world)
    paths = list(cfg.compare) or [resolve_ckpt(cfg)]
    for path in paths:
        if not os.path.isdir(path):
            raise SystemExit(f"checkpoint directory {path!r} does not exist")
    print("eval config:", json.dumps(asdict(cfg)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_config = read_run_config(paths[0])  # difficulty knobs and test set of the first model's run
    task, data = benchmark_and_data(cfg)
    plug = tasks.load(cfg.task or run_config.get("task", "countdown"))  # the train.py task (tasks.py)
    if task != "countdown":
        items = benchmarks.load(task, data)[:cfg.n_problems or None]
    elif cfg.problems_file:
        if plug is not countdown:
            raise ValueError(f"--problems_file holds Countdown problems; this is a {plug.__name__} model")
        items = countdown.load_problems(cfg.problems_file)[:cfg.n_problems or None]
        if not items:
            raise SystemExit(f"no problems in {cfg.problems_file}")
    else:  # held-out set; TinyZero's difficulty (3-4 numbers in 1..99) when the run_config does not say
        n = cfg.n_problems or run_config.get("eval_size", 1000)
        if (cfg.max_solutions or cfg.target_range) and plug is not countdown:
            raise ValueError(f"--max_solutions and --target_range are Countdown's; this is a {plug.__name__} model")
        knobs, harder = tasks.knobs(plug, run_config), {}
        if cfg.max_solutions:
            harder["max_solutions"] = cfg.max_solutions
        if cfg.target_range:  # targets the run never trained on: every problem is unseen, not only held-out ones
            trained = knobs.get("target_range", (1, 100))
            harder["every_bucket"] = cfg.target_range[0] > trained[1] or cfg.target_range[1] < trained[0]
            knobs["target_range"] = tuple(cfg.target_range)
        items = plug.test_set(n, **knobs, **harder)
    max_new_tokens = cfg.max_new_tokens or run_config.get("max_new_tokens", 1024)
    labels = short_labels(paths)
    os.makedirs(cfg.out_dir, exist_ok=True)
    own_grader = "rewards.reward (exact arithmetic; TinyZero's 1.0 / 0.1 / 0.0)" if plug is countdown \
        else f"{plug.__name__}.reward"
    results = {"task": plug.__name__ if task == "countdown" else task, "n_problems": len(items),
               "grader": benchmarks.GRADER_RULES.get(task, own_grader),
               "protocol": {"n_samples": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                            "max_new_tokens": max_new_tokens, "seed": cfg.seed},
               "config": asdict(cfg), "models": {}, "overlap": None, "differences": {}, "overlaps": {}}
    generations = os.path.join(cfg.out_dir, "generations.jsonl")
    with open(generations, "w", encoding="utf-8") if world.main else contextlib.nullcontext() as jsonl:
        for label, path in zip(labels, paths):
            results["models"][label] = evaluate_model(label, path, items, task, plug, cfg, max_new_tokens, jsonl,
                                                      data, world)
    if not world.main:
        return None
    base = results["models"][labels[0]]
    for label in labels[1:]:  # every other model against the first (e.g. the base model, or RL step 0)
        results["differences"][label] = differences(base, results["models"][label], cfg.n_samples)
        results["overlaps"][label] = overlap(base, results["models"][label])
    if len(labels) == 2:
        results["overlap"] = results["overlaps"][labels[1]]
    print_table(results)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {cfg.out_dir}/results.json and {cfg.out_dir}/generations.jsonl")
    if cfg.plot and plot_pass_at_k(results, os.path.join(cfg.out_dir, "passk.png")):
        print(f"wrote {cfg.out_dir}/passk.png")
    return results


if __name__ == "__main__":
    run_script(main)
