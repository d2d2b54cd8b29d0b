"""Tests for countdown.py: generator, held-out split, JSONL, solver, prompts, demonstrations.

The solver and the generator are checked against an independent brute force written here: repeatedly
pick two numbers, replace them by the result of one operation, with fractions.Fraction (a different
algorithm and a different number type from countdown.py's split search over int/tuple rationals).
"""
import ast
import hashlib
import itertools
import json
import math
import random
import re
import time
from collections import Counter
from fractions import Fraction
from functools import lru_cache

import pytest

import countdown
from countdown import Problem
from rewards import countdown_reward_details


def countdown_reward(response, nums, target):  # the reward value alone
    return countdown_reward_details(response, nums, target)[0]


def is_test_problem(problem):
    return countdown.problem_bucket(problem.nums, problem.target) < countdown.TEST_BUCKETS


# -----------------------------------------------------------------------------
# Independent brute force


@lru_cache(maxsize=None)
def _all_values(values, integer_steps=False):
    """Every value of an expression using all of `values` (a sorted tuple of Fractions) exactly once."""
    if len(values) == 1:
        return frozenset(values)
    out = set()
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            a, b = values[i], values[j]
            rest = values[:i] + values[i + 1:j] + values[j + 1:]
            results = [a + b, a * b, a - b, b - a]
            if b != 0:
                results.append(a / b)
            if a != 0:
                results.append(b / a)
            if integer_steps:  # every intermediate value a non-negative integer
                results = [r for r in results if r >= 0 and r.denominator == 1]
            for r in set(results):
                out |= _all_values(tuple(sorted(rest + (r,))), integer_steps)
    return frozenset(out)


def brute_solvable(nums, target, integer_steps=False):
    return Fraction(target) in _all_values(tuple(sorted(Fraction(n) for n in nums)), integer_steps)


def _eval_arithmetic(text):
    """Evaluate + - * / and parentheses on integers with Fractions, via the ast module (no eval)."""
    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            ops = {ast.Add: lambda: left + right, ast.Sub: lambda: left - right,
                   ast.Mult: lambda: left * right, ast.Div: lambda: left / right}
            return ops[type(node.op)]()
        raise AssertionError(f"unexpected syntax in {text!r}")
    return walk(ast.parse(text, mode="eval").body)


def test_brute_force_itself():
    # Hand-worked: 8/(3-8/3) = 24 needs a fractional intermediate; [1, 1, 1] cannot make 7.
    assert brute_solvable([8, 3, 8, 3], 24)
    assert not brute_solvable([8, 3, 8, 3], 24, integer_steps=True)
    assert not brute_solvable([1, 1, 1], 7)
    assert brute_solvable([3, 5, 7], 22) and brute_solvable([2, 2], 1)
    assert _all_values((Fraction(2), Fraction(3))) == {5, 6, -1, 1, Fraction(2, 3), Fraction(3, 2)}


# -----------------------------------------------------------------------------
# Solver


def test_solver_agrees_with_brute_force_on_random_problems():
    rng = random.Random(0)
    checked = solvable = 0
    for trial in range(250):
        n = 3 if trial % 2 else 4
        nums = [rng.randint(0 if trial % 10 == 0 else 1, 13) for _ in range(n)]  # some zeros and repeats
        values = _all_values(tuple(sorted(Fraction(x) for x in nums)))
        integer_values = sorted(v for v in values if v.denominator == 1)
        # targets that are reachable, unreachable, and random
        targets = rng.sample(integer_values, min(2, len(integer_values))) + [rng.randint(0, 150) for _ in range(3)]
        for target in targets:
            target = int(target)
            expression = countdown.solve(nums, target)
            assert (expression is not None) == (Fraction(target) in values), (nums, target, expression)
            if expression is not None:
                solvable += 1
                assert countdown_reward(f"<answer>{expression}</answer>", nums, target) == 1.0
                assert _eval_arithmetic(expression) == target
            checked += 1
    assert solvable > 300 and checked - solvable > 300  # both outcomes well covered


def test_solver_integer_steps_agrees_with_brute_force():
    rng = random.Random(1)
    for _ in range(150):
        nums = [rng.randint(1, 12) for _ in range(rng.choice((3, 4)))]
        for target in [rng.randint(1, 60) for _ in range(3)]:
            expression = countdown.solve(nums, target, integer_steps=True)
            assert (expression is not None) == brute_solvable(nums, target, integer_steps=True), (nums, target)
            if expression is not None:
                assert countdown_reward(f"<answer>{expression}</answer>", nums, target) == 1.0


def test_solver_hand_cases():
    assert countdown.solve([8, 3, 8, 3], 24) is not None  # only 8/(3-8/3)
    assert countdown.solve([8, 3, 8, 3], 24, integer_steps=True) is None
    assert countdown.solve([1, 1, 1], 7) is None
    assert countdown.solve([5], 5) == "5" and countdown.solve([5], 6) is None
    assert countdown.solve([0, 0, 0], 0) is not None  # 0*0*... : the "any b" branch with all zeros
    assert countdown.solve([0, 4, 9], 0) is not None
    with pytest.raises(ValueError, match="non-negative"):
        countdown.solve([3, -5], 2)
    with pytest.raises(ValueError, match="target"):
        countdown.solve([3, 5], 2.5)


def test_solver_six_numbers_is_fast_and_right():
    # Unsolvable 6-number problems make the search exhaustive; it must still answer in about a second.
    start = time.perf_counter()
    assert countdown.solve([97, 89, 83, 79, 73, 71], 100003) is None
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, elapsed  # ~0.1 s unloaded; generous for a shared 2-core machine
    expression = countdown.solve([25, 50, 75, 100, 3, 6], 952)
    assert countdown_reward(f"<answer>{expression}</answer>", [25, 50, 75, 100, 3, 6], 952) == 1.0


# -----------------------------------------------------------------------------
# Generator and held-out split


def test_generated_problems_are_solvable_and_in_range():
    problems = countdown.generate_problems(1500, seed=3, n_nums=3, num_range=(1, 20), target_range=(1, 100))
    problems += countdown.generate_problems(60, seed=4)  # default difficulty: 3-4 numbers, 1-99
    for p in problems:
        assert brute_solvable(p.nums, p.target), p
    assert all(1 <= x <= 20 for p in problems[:1500] for x in p.nums)
    assert {len(p.nums) for p in problems[1500:]} == {3, 4}
    assert all(1 <= x <= 99 for p in problems[1500:] for x in p.nums)
    assert all(1 <= p.target <= 100 for p in problems)
    assert len({(p.nums, p.target) for p in problems}) > 1200  # not stuck on a few problems


def test_generator_is_deterministic_by_seed():
    a = countdown.generate_problems(50, seed=7)
    assert a == countdown.generate_problems(50, seed=7)
    assert a != countdown.generate_problems(50, seed=8)
    assert countdown.test_set(30, seed=1) == countdown.test_set(30, seed=1)


def test_hash_split_is_stable_and_order_independent():
    # Recompute the bucket independently of countdown.py's code path.
    expected = int.from_bytes(hashlib.sha256(b"3,5,7->22").digest()[:8], "big") % countdown.N_BUCKETS
    assert countdown.problem_bucket((7, 3, 5), 22) == expected
    assert countdown.problem_bucket((3, 5, 7), 22) == countdown.problem_bucket((5, 7, 3), 22)
    buckets = [countdown.problem_bucket((a, b), t) for a in range(1, 30) for b in range(1, 30) for t in range(30)]
    share = sum(b < countdown.TEST_BUCKETS for b in buckets) / len(buckets)
    assert abs(share - countdown.TEST_BUCKETS / countdown.N_BUCKETS) < 0.01


def test_test_set_is_disjoint_from_training_stream():
    # A small space (3,523 solvable problems, 162 of them held out) that 20,000 training draws cover many
    # times over, so a leak would show.
    knobs = dict(n_nums=3, num_range=(1, 12), target_range=(1, 40))
    held_out = countdown.test_set(100, seed=0, **knobs)
    assert len(held_out) == 100
    assert len({(tuple(sorted(p.nums)), p.target) for p in held_out}) == 100  # distinct problems
    assert all(is_test_problem(p) for p in held_out)
    train = countdown.generate_problems(20_000, seed=0, **knobs)
    assert not any(is_test_problem(p) for p in train)
    held_out_keys = {(tuple(sorted(p.nums)), p.target) for p in held_out}
    assert not any((tuple(sorted(p.nums)), p.target) in held_out_keys for p in train)
    # The default test set is drawn from the same held-out buckets.
    default = countdown.test_set(50)
    assert all(is_test_problem(p) for p in default)


def test_impossible_knobs_give_clear_errors():
    with pytest.raises(ValueError, match="n_nums"):
        countdown.generate_problems(1, seed=0, n_nums=7)
    with pytest.raises(ValueError, match="num_range"):
        countdown.generate_problems(1, seed=0, num_range=(5, 1))
    with pytest.raises(ValueError, match="split"):
        countdown.generate_problems(1, seed=0, split="val")
    with pytest.raises(ValueError, match="gave no solvable train problem.*widen the ranges"):
        next(countdown.train_stream(0, n_nums=2, num_range=(1, 3), target_range=(50, 60), max_tries=1000))
    with pytest.raises(ValueError, match="distinct test problems"):
        countdown.test_set(200, n_nums=3, num_range=(1, 10), target_range=(1, 30))  # only 87 exist


# -----------------------------------------------------------------------------
# JSONL


def test_jsonl_round_trip(tmp_path):
    problems = countdown.generate_problems(20, seed=0)
    path = tmp_path / "problems.jsonl"
    countdown.save_problems(path, problems)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"nums", "target"}  # TinyZero's field names
    assert countdown.load_problems(path) == problems
    assert Problem.from_dict({"nums": [3, 5, 7], "target": 22}) == Problem((3, 5, 7), 22)


@pytest.mark.parametrize("bad_row, message", [
    ('{"nums": [3, 5, 7]}', "missing key 'target'"),
    ('{"nums": "357", "target": 22}', "'nums' must be a list"),
    ('{"nums": [3, 5.5], "target": 22}', "non-negative integers"),
    ('{"nums": [3, 5], "target": "22"}', "'target' must be an integer"),
    ('[3, 5, 7]', "JSON object"),
    ('{"nums": [3, 5, 7], "target": 22', "Expecting"),  # broken JSON
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"nums": [1, 2], "target": 3}\n\n' + bad_row + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3") + ".*" + re.escape(message)):
        countdown.load_problems(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="save_problems"):
        countdown.load_problems("/nonexistent/problems.jsonl")


# -----------------------------------------------------------------------------
# Prompts


def test_prompts():
    problem = Problem((19, 36, 55, 7), 65)
    base = countdown.base_prompt(problem)
    assert base.startswith("A conversation between User and Assistant.")
    assert "Using the numbers [19, 36, 55, 7], create an equation that equals 65." in base
    assert base.endswith("</answer>.\nAssistant: Let me solve this step by step.\n<think>")
    messages = countdown.chat_messages(problem)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] in base
    assert countdown.ASSISTANT_PREFILL == "Let me solve this step by step.\n<think>"
    assert countdown.compact_prompt(problem) == "19 36 55 7 -> 65\n"


# -----------------------------------------------------------------------------
# Demonstrations

FACT = re.compile(r"(?<![\d)])(\d+)([-+*/])(\d+)=(\d+)")


def _check_long_form(problem):
    text = countdown.long_demonstration(problem)
    assert text.startswith("<think>\n") and text.count("</think><answer>") == 1 and text.endswith("</answer>")
    assert countdown_reward(text, problem.nums, problem.target) == 1.0
    think = text[len("<think>\n"):text.index("</think>")]
    lines = think.strip().split("\n")
    # Every "x op y=z" fact in the trace is true arithmetic on non-negative integers.
    facts = FACT.findall(think)
    assert facts
    for x, op, y, z in facts:
        assert _eval_arithmetic(f"{x}{op}{y}") == int(z), (x, op, y, z, text)
    # The last think line verifies the answer: every "="-separated part evaluates to the target.
    parts = lines[-1].split("=")
    assert int(parts[-1]) == problem.target
    for part in parts[:-1]:
        assert _eval_arithmetic(part) == problem.target, (part, text)
    answer = text[text.index("<answer>") + len("<answer>"):-len("</answer>")]
    assert parts[0] == answer
    return text


def test_long_and_short_demonstrations_are_correct():
    problems = countdown.generate_problems(400, seed=11, n_nums=3, num_range=(1, 20), integer_steps=True)
    problems += countdown.generate_problems(100, seed=12, integer_steps=True)  # 3-4 numbers 1-99
    problems += countdown.generate_problems(20, seed=13, n_nums=5, num_range=(1, 20), integer_steps=True)
    problems += [Problem((3, 5, 7), 22), Problem((2, 2), 4), Problem((1, 1, 1), 1)]
    for problem in problems:
        long_text = _check_long_form(problem)
        short_text = countdown.short_demonstration(problem)
        assert countdown_reward(short_text, problem.nums, problem.target) == 1.0
        assert long_text.endswith(short_text)  # same answer in both forms


def test_long_form_verdicts_are_true():
    # A three-number line is "<need fact>:<pair facts> ok|no". Written out independently: with c the last
    # number and a >= b the other two, the need fact is t-c, t+c, c-t, t/c, t*c or c/t; the pair facts are
    # a+b, a*b, a-b, a/b (when exact, b > 1) in that order, each followed by ",<need>", cut right after the
    # first one equal to the need. "ok" exactly when the last pair value equals the need; every fact's
    # arithmetic is right. Line order: a first pass over c from the largest down without the t*c needs, then
    # a second pass with only them.
    problems = countdown.generate_problems(300, seed=21, n_nums=3, num_range=(1, 20), integer_steps=True)
    n_ok = n_no = n_product_lines = 0
    for problem in problems:
        t = problem.target
        think = countdown.long_demonstration(problem).split("</think>")[0]
        order = []  # (is a t*c line, -c) per line: must never decrease
        for line in think.split("\n"):
            match = re.match(r"^(\d+)([-+*/])(\d+)=(\d+):(.*) (ok|no)$", line)
            if not match:
                continue
            x, op, y, need = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
            c = y if x == t else x
            assert (x, y) in [(t, c), (c, t)] and c in problem.nums, line
            order.append((op == "*", -c))
            n_product_lines += op == "*"
            assert need == {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op] and (op != "/" or x % y == 0)
            rest = list(problem.nums)
            rest.remove(c)
            a, b = max(rest), min(rest)
            expected = [("+", a + b), ("*", a * b), ("-", a - b)]
            if b > 1 and a % b == 0:
                expected.append(("/", a // b))
            entries = match.group(5).split(" ")
            facts = [re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+),(\d+)", entry) for entry in entries]
            assert all(facts), line
            facts = [(int(p), o, int(q), int(v), int(copy)) for p, o, q, v, copy in (f.groups() for f in facts)]
            assert all((p, q) == (a, b) and copy == need for p, _, q, _, copy in facts), line
            assert [(o, v) for _, o, _, v, _ in facts] == expected[:len(facts)], line
            if match.group(6) == "ok":
                n_ok += 1
                assert facts[-1][3] == need and all(f[3] != need for f in facts[:-1]), line
            else:
                n_no += 1
                assert len(facts) == len(expected) and all(f[3] != need for f in facts), line
        assert order == sorted(order), think
    assert n_ok == len(problems) and n_no > len(problems)  # one "ok" per demonstration, many "no" lines
    assert n_product_lines > 0  # the second pass happens


def test_long_form_by_hand():
    # Worked out by hand: [3, 5, 7] -> 22. Last number 7 (the largest); 22-7=15 is the first need; the pair
    # (5, 3) gives 5+3=8, then 5*3=15, which matches. Two numbers: 6+2=8 is the first pair value.
    assert countdown.long_demonstration(Problem((3, 5, 7), 22)) == (
        "<think>\n22-7=15:5+3=8,15 5*3=15,15 ok\n(5*3)+7=15+7=22\n</think><answer>(5*3)+7</answer>")
    assert countdown.long_demonstration(Problem((2, 6), 12)) == (
        "<think>\n6+2=8,12 6*2=12,12 ok\n6*2=12\n</think><answer>6*2</answer>")


def test_long_form_is_complete_for_integer_step_problems():
    # Every 3-number problem with numbers 1-12 and a target 1-40 that has an integer-step solution (per
    # the brute force) gets a long demonstration; the others raise a clear ValueError.
    rng = random.Random(5)
    for _ in range(300):
        problem = Problem(tuple(rng.randint(1, 12) for _ in range(3)), rng.randint(1, 40))
        if brute_solvable(problem.nums, problem.target, integer_steps=True):
            assert countdown.long_form_search(problem.nums, problem.target) is not None, problem
        else:
            with pytest.raises(ValueError, match="integer_steps=True"):
                countdown.long_demonstration(problem)


def test_long_form_length_budget_and_mixture():
    # train.py's default difficulty: nearly every long demonstration (with its prompt and end-of-text token)
    # fits warmup_seq_len = 480 tokens; the few that don't are skipped by the warm-up.
    problems = countdown.generate_problems(500, seed=31, n_nums=3, num_range=(1, 12), integer_steps=True)
    lengths = {"short": [len(countdown.short_demonstration(p)) for p in problems],
               "long": [len(countdown.long_demonstration(p)) for p in problems]}
    assert sum(lengths["long"]) / len(problems) < 200
    # train.py keeps a row when prompt + demonstration + end-of-text <= warmup_seq_len + 1 tokens
    too_long = [p for p, n in zip(problems, lengths["long"]) if len(countdown.compact_prompt(p)) + n + 1 > 481]
    assert len(too_long) <= 0.03 * len(problems)
    assert max(lengths["short"]) < 40
    rng = random.Random(0)
    texts = [countdown.sample_demonstration(problems[0], 0.25, rng) for _ in range(2000)]
    share_long = sum(t.startswith("<think>") for t in texts) / len(texts)
    assert abs(share_long - 0.25) < 0.04
    assert {t for t in texts if not t.startswith("<think>")} == {countdown.short_demonstration(problems[0])}
    with pytest.raises(ValueError, match="p_long"):
        countdown.sample_demonstration(problems[0], 1.5, rng)


def _every_expression(nums):
    """Brute force for count_solutions: each order of the numbers, each bracketing, each operator, as a string."""
    def trees(items):
        if len(items) == 1:
            yield f"Fraction({items[0]})"
        for cut in range(1, len(items)):
            for left in trees(items[:cut]):
                for right in trees(items[cut:]):
                    for op in "+-*/":
                        yield f"({left}{op}{right})"
    for order in itertools.permutations(range(len(nums))):
        yield from trees([nums[i] for i in order])


def _value(expression):
    try:
        return eval(expression, {"Fraction": Fraction})
    except ZeroDivisionError:
        return None


def test_count_solutions_by_hand_and_against_every_expression_and_the_solver():
    assert countdown.count_solutions([3, 5], 8) == 2     # 3+5, 5+3
    assert countdown.count_solutions([3, 5], -2) == 1    # 3-5
    assert countdown.count_solutions([2, 2], 4) == 4     # 2+2 and 2*2, each with the two 2s either way round
    assert countdown.count_solutions([4, 2], 2) == 2     # 4-2, 4/2
    rng = random.Random(5)
    for n in (3, 3, 3, 4):
        nums = [rng.randint(0, 9) for _ in range(n)]
        values = Counter(_value(e) for e in _every_expression(nums))
        assert sum(values.values()) == math.factorial(n) * (1, 1, 2, 5)[n - 1] * 4 ** (n - 1)
        for target in range(-5, 40):
            assert countdown.count_solutions(nums, target) == values[Fraction(target)], (nums, target)
            assert (countdown.count_solutions(nums, target) > 0) == (countdown.solve(nums, target) is not None)


def test_the_hard_held_out_set_is_the_hard_part_of_the_same_set_in_order():
    knobs = dict(n_nums=(3, 3), num_range=(1, 12))
    every, hard = countdown.test_set(200, **knobs), countdown.test_set(60, **knobs, max_solutions=4)
    assert hard == [p for p in every if countdown.count_solutions(p.nums, p.target) <= 4][:60]
    with pytest.raises(ValueError, match="only 127 with at most 4 solutions"):
        countdown.test_set(200, **knobs, max_solutions=4)  # 127 of the 224 held-out problems at this difficulty


def test_every_bucket_draws_past_the_held_out_share_for_unseen_knobs():
    knobs = dict(n_nums=(3, 3), num_range=(1, 12), target_range=(101, 200))  # targets no default run trains on
    every = countdown.test_set(400, **knobs, every_bucket=True)
    assert len({(tuple(sorted(p.nums)), p.target) for p in every}) == 400
    assert all(101 <= p.target <= 200 and countdown.solve(p.nums, p.target) for p in every)
    held_out = [p for p in every if countdown.problem_bucket(p.nums, p.target) < countdown.TEST_BUCKETS]
    assert 0 < len(held_out) < 40  # ~5% of them; the held-out split alone has only 28 such problems
    with pytest.raises(ValueError, match="only 28;"):
        countdown.test_set(40, **knobs)
