"""The Countdown game: problems, an exact solver, prompts, and demonstrations for the warm-up.

Countdown: given 3-4 numbers and a target, write an arithmetic expression with + - * / and parentheses that
uses every number exactly once and equals the target, e.g. [3, 5, 7] -> 22: (3*5)+7.

What is here, top to bottom:
1. Problem, with TinyZero's JSON field names {"nums": [...], "target": N}; JSONL load/save.
2. solve(nums, target): exhaustive search with exact rational arithmetic (true division is allowed, as in
   the reward), so 8/(3-8/3) = 24 is found.
3. The problem generator: numbers and target drawn uniformly from the difficulty knobs, kept only if
   solve() finds a solution, deterministic from a seed. Train and test are kept apart by the problem
   itself: a SHA-256 hash of (sorted numbers, target) puts every problem in one of 1,000 buckets and the
   first TEST_BUCKETS of them belong to the held-out test set, whatever the seed or difficulty.
   The anchors use the HF dataset Jiayi-Pan/Countdown-Tasks-3to4 (3-4 numbers, undocumented ranges);
   we generate locally like Stream-of-Search (numbers 1-99, targets up to 100, verified solvable).
4. Prompts: TinyZero's base-model template, the chat (instruct) messages with the assistant prefill, and a
   compact template for the small byte-level model trained from scratch.
5. Demonstrations for the next-token-prediction warm-up: a short form (the answer alone) and a long form
   (a systematic search written out step by step), mixed with a knob p_long, after Tsilivis et al.,
   "How Reinforcement Learning After Next-Token Prediction Facilitates Learning" (arXiv 2510.11495).
6. The task plug: the names train.py and eval.py call (--task=countdown, the default; parity.py is the other).
"""
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from itertools import combinations
from math import gcd

import rewards

# -----------------------------------------------------------------------------
# 1. Problems


@dataclass(frozen=True)
class Problem:
    nums: tuple  # tuple[int, ...], in the order shown to the model
    target: int

    def to_dict(self):
        return {"nums": list(self.nums), "target": self.target}

    @classmethod
    def from_dict(cls, row):
        """Build a Problem from {"nums": [...], "target": N}; ValueError says what is wrong."""
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object with 'nums' and 'target', got {type(row).__name__}")
        for key in ("nums", "target"):
            if key not in row:
                raise ValueError(f"missing key {key!r} (a problem looks like {{\"nums\": [3, 5, 7], \"target\": 22}})")
        nums, target = row["nums"], row["target"]
        if not isinstance(nums, list) or len(nums) < 2:
            raise ValueError(f"'nums' must be a list of at least 2 integers, got {nums!r}")
        if not all(_is_int(n) and n >= 0 for n in nums):
            raise ValueError(f"'nums' must hold non-negative integers, got {nums!r}")
        if not _is_int(target):
            raise ValueError(f"'target' must be an integer, got {target!r}")
        return cls(tuple(nums), target)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def save_problems(path, problems):
    """Write problems as JSONL, one {"nums": [...], "target": N} per line."""
    with open(path, "w") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_dict()) + "\n")


def load_problems(path):
    """Read a JSONL file of problems (blank lines skipped; extra keys ignored)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no problem file at {path!r}; write one with countdown.save_problems")
    problems = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                problems.append(Problem.from_dict(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{path}, line {line_number}: {e}") from None
    return problems


# -----------------------------------------------------------------------------
# 2. Exact solver
#
# Exact rationals, kept canonical so that equal values are equal Python objects (and hash alike): an int
# when integral, else a reduced (numerator, denominator) tuple with denominator > 1. Same exactness as
# fractions.Fraction, but most arithmetic stays on plain ints and nothing pays for Fraction's slow
# constructor and __hash__ (which dominated the profile).
#
# Search: small sub-multisets (<= ENUMERATE_UP_TO numbers) get the full set of reachable values. A set S
# reaches target t if some split S = A + B, A the smaller side, has a value a of A such that the value b
# the last operation needs (b = t - a for a + b, b = a - t for a - b, ...) is reachable from B, recursively.
# Working backwards from the target avoids building the huge value sets of 4- to 6-number sets.
# Value sets and answers are memoised per sub-multiset (sorted tuple), so repeated numbers and the two
# orders of a commutative split are searched once. Expression strings are built only on success.

ENUMERATE_UP_TO = 3


def _make(numerator, denominator):
    """The canonical value of numerator/denominator: an int, or a reduced (n, d) tuple with d > 1."""
    if denominator < 0:
        numerator, denominator = -numerator, -denominator
    g = gcd(numerator, denominator)
    if g == denominator:
        return numerator // g
    return (numerator // g, denominator // g)


def _parts(x):
    return (x, 1) if type(x) is int else x


def _add(a, b):
    if type(a) is int and type(b) is int:
        return a + b
    (an, ad), (bn, bd) = _parts(a), _parts(b)
    return _make(an * bd + bn * ad, ad * bd)


def _sub(a, b):
    if type(a) is int and type(b) is int:
        return a - b
    (an, ad), (bn, bd) = _parts(a), _parts(b)
    return _make(an * bd - bn * ad, ad * bd)


def _mul(a, b):
    if type(a) is int and type(b) is int:
        return a * b
    (an, ad), (bn, bd) = _parts(a), _parts(b)
    return _make(an * bn, ad * bd)


def _div(a, b):
    """a / b for b != 0."""
    if type(a) is int and type(b) is int:
        return a // b if a % b == 0 else _make(a, b)
    (an, ad), (bn, bd) = _parts(a), _parts(b)
    return _make(an * bd, ad * bn)


@lru_cache(maxsize=1 << 16)
def _splits(key):
    """All unordered splits of a sorted tuple into two non-empty sorted tuples (A, B), len(A) <= len(B),
    each distinct split once."""
    n, seen, out = len(key), set(), []
    for mask in range(1, 1 << (n - 1)):  # the last element always goes to B: each unordered split once
        a = tuple(key[i] for i in range(n) if mask >> i & 1)
        b = tuple(key[i] for i in range(n) if not mask >> i & 1)
        if len(a) > len(b):
            a, b = b, a
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


class _Solver:
    def __init__(self, integer_steps):
        # integer_steps=True: every intermediate value must be a non-negative integer (Stream-of-Search's
        # rules: a - b only when a >= b, a / b only when exact). The long demonstrations search this space.
        self.integer_steps = integer_steps
        self.tables = {}  # sorted tuple -> set of reachable values
        self.answers = {}  # (sorted tuple, target) -> expression or None

    def values(self, key):
        """The set of every value reachable from the (small) multiset `key`; values only, no expressions,
        because building strings for every value would cost more than the arithmetic."""
        if key in self.tables:
            return self.tables[key]
        if len(key) == 1:
            result = {key[0]}
        else:
            result = set()
            for a_key, b_key in _splits(key):
                b_values = self.values(b_key)
                for a in self.values(a_key):
                    for b in b_values:
                        result.update(self.combine(a, b))
        self.tables[key] = result
        return result

    def combine(self, a, b):
        """The values of a op b and b op a for the four operations."""
        if self.integer_steps:  # a, b are non-negative ints here
            out = [a + b, a * b, a - b if a >= b else b - a]
            if b and a % b == 0:
                out.append(a // b)
            if a and b % a == 0:
                out.append(b // a)
            return out
        if type(a) is int and type(b) is int:
            out = [a + b, a * b, a - b, b - a]
            if b != 0:
                out.append(a // b if a % b == 0 else _make(a, b))
            if a != 0:
                out.append(b // a if b % a == 0 else _make(b, a))
            return out
        out = [_add(a, b), _mul(a, b), _sub(a, b), _sub(b, a)]
        if b != 0:
            out.append(_div(a, b))
        if a != 0:
            out.append(_div(b, a))
        return out

    def reach(self, key, target):
        """An expression over the multiset `key` equal to target, or None."""
        if len(key) == 1:
            return str(key[0]) if key[0] == target else None
        if len(key) <= ENUMERATE_UP_TO and target not in self.values(key):
            return None  # the cheap common case: a set lookup; expressions are built only on success
        memo_key = (key, target)
        if memo_key not in self.answers:
            self.answers[memo_key] = self.search(key, target)
        return self.answers[memo_key]

    def search(self, key, t):
        """Backward step: a value a of the smaller side A and the value b the last operation needs from B."""
        for a_key, b_key in _splits(key):
            for a in self.values(a_key):
                needs = [(_sub(t, a), "a+b"), (_sub(a, t), "a-b"), (_add(t, a), "b-a")]
                if a != 0:
                    needs.append((_div(t, a), "a*b"))  # a * b = t
                    needs.append((_mul(t, a), "b/a"))  # b / a = t
                    if t != 0:
                        needs.append((_div(a, t), "a/b"))  # a / b = t
                for need, op in needs:
                    if self.integer_steps and (type(need) is not int or need < 0):
                        continue
                    eb = self.reach(b_key, need)
                    if eb is not None:
                        ea = self.reach(a_key, a)
                        return "(" + op.replace("a", ea, 1).replace("b", eb, 1) + ")"
                # a == 0 leaves two cases where b is free: 0 * b = 0 (any b) and 0 / b = 0 (any b != 0).
                # The sum of B's numbers is such a b: the numbers are non-negative, so the sum is 0 only if
                # all of them are 0 (and then 0 * 0 works).
                if a == 0 and t == 0:
                    ea = self.reach(a_key, a)
                    eb = "(" + "+".join(str(x) for x in b_key) + ")"
                    return f"({ea}/{eb})" if sum(b_key) != 0 else f"({ea}*{eb})"
        return None


def solve(nums, target, integer_steps=False):
    """One expression using every number in nums exactly once that equals target, or None.

    Exact rational arithmetic (intermediate fractions allowed, like the reward). With integer_steps=True
    only expressions whose every intermediate value is a non-negative integer count.
    """
    if not nums or not all(_is_int(n) and n >= 0 for n in nums):
        raise ValueError(f"nums must be a non-empty sequence of non-negative ints, got {nums!r}")
    if not _is_int(target):
        raise ValueError(f"target must be an int, got {target!r}")
    found = _Solver(integer_steps).reach(tuple(sorted(nums)), target)
    if found and found.startswith("("):
        found = found[1:-1]  # every operation is parenthesised; the outermost pair is not needed
    return found



def count_solutions(nums, target):
    """How many of the expressions a guesser could write equal target: every order of the numbers, every
    bracketing and every operator at each node, each written once (3 numbers: 6 orders x 2 bracketings x 4^2
    operators = 192 expressions). A model-free difficulty: a problem few of them solve is hard to hit for a
    guesser that tries expressions at random. Exact fractions; a division by zero is not an expression."""
    leaves = [Fraction(n) for n in nums]

    @lru_cache(maxsize=None)
    def values(mask):  # the numbers in the bit mask -> Counter {value: expressions with that value}
        if mask & (mask - 1) == 0:
            return Counter({leaves[mask.bit_length() - 1]: 1})
        out = Counter()
        left = (mask - 1) & mask
        while left:  # every ordered split into a left and a right operand (non-empty)
            for a, na in values(left).items():
                for b, nb in values(mask ^ left).items():
                    for v in (a + b, a - b, a * b, a / b if b else None):
                        if v is not None:
                            out[v] += na * nb
            left = (left - 1) & mask
        return out
    return values((1 << len(leaves)) - 1)[Fraction(target)]

# -----------------------------------------------------------------------------
# 3. Problem generator with a held-out split by hash

N_BUCKETS = 1000
TEST_BUCKETS = 50  # buckets [0, 50) = 5% of all problems are test-only; the training stream skips them


def problem_bucket(nums, target):
    """Stable bucket in [0, N_BUCKETS) of a problem, independent of the order of its numbers.

    SHA-256, not Python's hash(), which is salted per process."""
    text = ",".join(str(n) for n in sorted(nums)) + "->" + str(target)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % N_BUCKETS


def _check_knobs(n_nums, num_range, target_range, split):
    n_nums = (n_nums, n_nums) if _is_int(n_nums) else tuple(n_nums)
    if len(n_nums) != 2 or not 2 <= n_nums[0] <= n_nums[1] <= 6:
        raise ValueError(f"n_nums must be an int or a (min, max) pair within 2..6, got {n_nums!r}")
    if len(num_range) != 2 or not 0 <= num_range[0] <= num_range[1]:
        raise ValueError(f"num_range must be (low, high) with 0 <= low <= high, got {num_range!r}")
    if len(target_range) != 2 or not target_range[0] <= target_range[1]:
        raise ValueError(f"target_range must be (low, high) with low <= high, got {target_range!r}")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return n_nums


@lru_cache(maxsize=1 << 18)  # shared by every stream: train.py opens a new one per step on a small space
def _in_split_and_solvable(sorted_nums, target, split, integer_steps):
    in_split = split == "all" or (problem_bucket(sorted_nums, target) < TEST_BUCKETS) == (split == "test")
    return in_split and solve(sorted_nums, target, integer_steps) is not None


def train_stream(seed, n_nums=(3, 4), num_range=(1, 99), target_range=(1, 100), split="train",
                 integer_steps=False, max_tries=100_000):
    """Endless iterator of solvable problems (repeats possible), deterministic from seed.

    Rejection sampling: draw the count of numbers, the numbers and the target uniformly from the knobs
    (all ranges inclusive); keep the draw only if it lies in the split's hash buckets and solve() finds a
    solution (with integer_steps=True: a solution with non-negative integer intermediate values, the
    space the long demonstrations search). split="test" gives the held-out stream instead, "all" both.
    """
    n_nums = _check_knobs(n_nums, num_range, target_range, split)
    rng = random.Random(seed)
    misses = 0
    while True:
        nums = tuple(rng.randint(*num_range) for _ in range(rng.randint(*n_nums)))
        target = rng.randint(*target_range)
        if _in_split_and_solvable(tuple(sorted(nums)), target, split, integer_steps):
            misses = 0
            yield Problem(nums, target)
        else:
            misses += 1
            if misses >= max_tries:
                raise ValueError(f"{max_tries} draws in a row gave no solvable {split} problem with "
                                 f"n_nums={n_nums}, num_range={num_range}, target_range={target_range}; "
                                 f"widen the ranges")


def generate_problems(n, seed, n_nums=(3, 4), num_range=(1, 99), target_range=(1, 100), split="train",
                      integer_steps=False):
    """The first n problems of train_stream(seed, ...) (see there)."""
    stream = train_stream(seed, n_nums, num_range, target_range, split, integer_steps)
    return [next(stream) for _ in range(n)]


def test_set(n=1000, seed=1234, n_nums=(3, 4), num_range=(1, 99), target_range=(1, 100), integer_steps=False,
             max_solutions=0, every_bucket=False):
    """The fixed held-out set: n distinct problems (distinct as multisets + target) from the test buckets,
    which the training stream never produces. max_solutions > 0 keeps only the problems that at most that
    many expressions solve (count_solutions), in the same order: the hard part of the same set.
    every_bucket=True draws from every bucket: for knobs no training run used (e.g. targets past its range),
    where every problem is unseen and the held-out 5% alone would be a small set."""
    split = "all" if every_bucket else "test"
    share = 1 if every_bucket else TEST_BUCKETS / N_BUCKETS
    low, high = _check_knobs(n_nums, num_range, target_range, split)
    # distinct problems: multisets of k of the R numbers, C(R + k - 1, k), times the targets; `share` in the split
    R, n_targets = num_range[1] - num_range[0] + 1, target_range[1] - target_range[0] + 1
    space = sum(math.comb(R + k - 1, k) for k in range(low, high + 1)) * n_targets
    if n > space * share * 1.1 + 100:
        raise ValueError(f"{n} held-out problems asked, but at this difficulty only ~{int(space * share)} exist "
                         f"({share:g} of {space} problems, solvable or not): ask for fewer (--eval_size) or widen the "
                         f"ranges")
    stream = train_stream(seed, n_nums, num_range, target_range, split, integer_steps)
    seen, problems, repeats = set(), [], 0
    while repeats < max(1000, 2 * n):  # this many repeats in a row: the held-out space is used up
        problem = next(stream)
        key = (tuple(sorted(problem.nums)), problem.target)
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        repeats = 0
        if max_solutions and count_solutions(problem.nums, problem.target) > max_solutions:
            continue
        problems.append(problem)
        if len(problems) == n:
            return problems
    which = f" with at most {max_solutions} solutions" if max_solutions else ""
    space = "" if every_bucket else f"; the held-out space is {TEST_BUCKETS}/{N_BUCKETS} of all problems"
    raise ValueError(f"could not find {n} distinct test problems at this difficulty (only {len(problems)}{which}"
                     f"{space}): widen the ranges or ask for fewer")


# -----------------------------------------------------------------------------
# 4. Prompts

USER_TEMPLATE = (  # TinyZero's user text (examples/data_preprocess/countdown.py), numbers as a Python list
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
ASSISTANT_PREFILL = "Let me solve this step by step.\n<think>"
BASE_TEMPLATE = (  # TinyZero's "base" template for pretrained (non-chat) models
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer.\nUser: " + USER_TEMPLATE + "\nAssistant: " + ASSISTANT_PREFILL
)
SYSTEM_MESSAGE = (  # GRPO-Zero's system message (TinyZero's says "thinks ... provides", a typo)
    "You are a helpful assistant. You first think about the reasoning process in your mind and then provide "
    "the user with the answer."
)


def base_prompt(problem):
    """TinyZero's base-model prompt, ending in the prefill "Assistant: Let me solve this step by step.\\n<think>"."""
    return BASE_TEMPLATE.format(numbers=list(problem.nums), target=problem.target)


def chat_messages(problem):
    """System + user turns for instruct models. Render with tokenizer.chat_template(messages) and append
    ASSISTANT_PREFILL (GRPO-Zero / nano-aha-moment pre-fill the assistant turn the same way)."""
    return [{"role": "system", "content": SYSTEM_MESSAGE},
            {"role": "user", "content": USER_TEMPLATE.format(numbers=list(problem.nums), target=problem.target)}]


def compact_prompt(problem):
    """Short prompt for the byte-level model trained from scratch (every character is a token): "3 5 7 -> 22\\n"."""
    return " ".join(str(n) for n in problem.nums) + f" -> {problem.target}\n"


def render_prompt(problem, template, tokenizer=None):
    """The prompt text for one problem under one of the templates above (train.py and eval.py both use this).
    compact: "3 5 7 -> 22\n" for the byte model; base: TinyZero's plain-text prompt ending in "<think>";
    chat: the instruct model's ChatML turns (rendered by tokenizer.chat_template) plus the assistant prefill."""
    if template == "compact":
        return compact_prompt(problem)
    if template == "base":
        return base_prompt(problem)
    if template == "chat":
        return tokenizer.chat_template(chat_messages(problem)) + ASSISTANT_PREFILL
    raise ValueError(f"unknown prompt template {template!r}; use compact, base or chat")


def prompt_setup(tokenizer, template, from_scratch):
    """-> (template, stop ids), the one rule train.py and eval.py share. template "auto": compact for a model
    trained from scratch, else chat for an instruct tokenizer and base otherwise. Sampling stops at the
    tokenizer's EOS ids, and a chat turn also at <|im_end|>."""
    if template == "auto":
        template = "compact" if from_scratch else "chat" if tokenizer.is_instruct else "base"
    stop_ids = list(tokenizer.stop_ids)
    if template == "chat" and "<|im_end|>" in tokenizer.special_tokens:
        stop_ids.append(tokenizer.special_tokens["<|im_end|>"])
    return template, list(dict.fromkeys(stop_ids))


def is_long_form(response):
    """True for a reply that thinks before it answers (it closes a <think> block): the long form, whose share
    RL should raise. Logged as long_frac (sampled) and eval_long_frac (greedy, held out)."""
    return "</think>" in response


# -----------------------------------------------------------------------------
# 5. Demonstrations for the next-token-prediction warm-up


def short_demonstration(problem):
    """The answer alone: "<answer>(3*5)+7</answer>". A small model cannot compute this in one go."""
    found = long_form_search(problem.nums, problem.target)
    expression = found[1] if found else solve(problem.nums, problem.target)
    if expression is None:
        raise ValueError(f"{problem} has no solution")
    return f"<answer>{expression}</answer>"


# ============================== THE LONG FORM ==============================
# This block (down to the closing ===== line) decides what a long demonstration looks like; revise it here
# and only here. long_demonstration() is its entry point.
#
# Example, [3, 5, 7] -> 22 (86 characters):
#     <think>
#     22-7=15:5+3=8,15 5*3=15,15 ok
#     (5*3)+7=15+7=22
#     </think><answer>(5*3)+7</answer>
#
# Why it looks like this. The model that must learn to EXECUTE it is a ~1-3M parameter byte-level
# transformer trained for minutes, so the trace is built for locality and nothing to guess:
# - Meet in the middle for three numbers: choose the number c used LAST (largest c first); for each value
#   the other two numbers would NEED for the last step to hit the target (t-c, t+c, c-t, t/c, t*c, c/t, only
#   the non-negative integer ones) write one line: the need ("22-7=15:"), then the pair's values in a fixed
#   order (a+b, a*b, a-b, a/b when exact; larger number first, so no negatives) up to the first one equal to
#   the need, which ends the search ("ok"), or "no" after the last. A non-matching line from the same
#   search: "22+7=29:5+3=8,29 5*3=15,29 5-3=2,29 no". This checks all ~100 expressions over three numbers.
# - Every pair value is followed by a copy of the line's need (",15"), so each verdict compares the two
#   numbers right before it. Copying is easy for a transformer (an induction head, supervised on every
#   digit); comparing a value with a need written a dozen characters back is not, and a model that cannot
#   do it guesses "ok" from how close the two numbers are and where it is on the line (README: what the
#   copies changed, measured). They make the trace ~20% longer.
# - Two passes over c: first every need but t*c, then the t*c lines. t*c is the only need that is a big
#   product ("82*11=902", copied after every pair value), it is on the answer's path only when the answer
#   ends "/c", and it was the most common arithmetic slip; last, most demonstrations never write it (the
#   trace gets ~12% shorter, so more warm-up steps fit the same minutes).
# - Every fact is one operation on two numbers printed right before it: computable locally, no memory of
#   earlier lines needed.
# - The order is a fixed rule (last number from the largest down; fixed op order), so the only thing to
#   learn is to follow it and compute; a short answer, by contrast, must do the whole search implicitly.
# - More than three numbers: the same rule one level up, forward. "a op b=r:r c d" replaces two numbers
#   (pairs in order, ops + * - /) by their result, then the three-number block runs on the new set.
# - The search space is "every intermediate value a non-negative integer" (Stream-of-Search's rules). It
#   is complete for that space: if solve(..., integer_steps=True) finds a solution, so does this search.
#   Generate warm-up problems with integer_steps=True so every problem has a long demonstration.
# - It ends by verifying the answer: the chosen expression is re-evaluated from the facts above, then the
#   answer tag repeats it (the short form's answer is the same expression).
# - A wrong fact off the solution path is mostly harmless (its line still ends "no"); only the facts on the
#   path and the verification decide the reward. The hardest facts are products (a*b, t*c).
# - Lengths: at train.py's default difficulty almost every long demonstration fits its completion budget
#   (tests/test_countdown.py measures); the warm-up skips the few that do not.
# ===========================================================================

def _pair_facts(a, b):
    """Values of a op b for a >= b in the fixed op order: [(expression, value)], non-negative ints only."""
    facts = [(f"{a}+{b}", a + b), (f"{a}*{b}", a * b), (f"{a}-{b}", a - b)]
    if b > 1 and a % b == 0:
        facts.append((f"{a}/{b}", a // b))
    return facts


def _need_facts(t, c):
    """Values r with (r op c) or (c op r) == t, in a fixed order: [(fact, r, answer template)]."""
    needs = []
    if t >= c:
        needs.append((f"{t}-{c}", t - c, "({})+" + str(c)))  # r + c = t
    needs.append((f"{t}+{c}", t + c, "({})-" + str(c)))  # r - c = t
    if c > t:
        needs.append((f"{c}-{t}", c - t, str(c) + "-({})"))  # c - r = t
    if c > 0 and t % c == 0:
        needs.append((f"{t}/{c}", t // c, "({})*" + str(c)))  # r * c = t
    if c > 1:
        needs.append((f"{t}*{c}", t * c, "({})/" + str(c)))  # r / c = t
    if t > 0 and c > t and c % t == 0:
        needs.append((f"{c}/{t}", c // t, str(c) + "/({})"))  # c / r = t
    return needs


def _three(nums, t):
    """Lines of the three-number (or two-number) block and the (expression, check) found, or None."""
    lines = []
    if len(nums) == 2:
        a, b = sorted(nums, reverse=True)
        line = []
        for expression, value in _pair_facts(a, b):
            line.append(f"{expression}={value},{t}")
            if value == t:
                lines.append(" ".join(line) + " ok")
                return lines, (expression, f"{expression}={t}")
        lines.append(" ".join(line) + " no")
        return lines, None
    lasts = list(dict.fromkeys(sorted(nums, reverse=True)))  # the last number c: largest first, each value once
    tries = [(c, need) for c in lasts for need in _need_facts(t, c)]
    # two passes over c: a stable sort moves the t*c lines (a big product, rarely on the answer's path) last
    tries.sort(key=lambda try_: try_[1][0] == f"{t}*{try_[0]}")
    for c, (fact, need, template) in tries:
        rest = list(nums)
        rest.remove(c)
        a, b = sorted(rest, reverse=True)
        line = []  # the pair's values, each with a copy of the need, up to the first one equal to the need
        for expression, value in _pair_facts(a, b):
            line.append(f"{expression}={value},{need}")
            if value == need:
                lines.append(f"{fact}={need}:" + " ".join(line) + " ok")
                answer = template.format(expression)
                # Verification: substitute the pair's value, then the last operation.
                check = f"{answer}={template.format(need).replace('(', '').replace(')', '')}={t}"
                return lines, (answer, check)
        lines.append(f"{fact}={need}:" + " ".join(line) + " no")
    return lines, None


def long_form_search(nums, target):
    """The long form's systematic search: (lines, answer expression, verification line) or None."""
    nums = list(nums)
    if len(nums) <= 3:
        lines, found = _three(nums, target)
        return (lines, found[0], found[1]) if found else None
    lines = []
    for i, j in combinations(range(len(nums)), 2):
        a, b = sorted((nums[i], nums[j]), reverse=True)
        rest = [nums[k] for k in range(len(nums)) if k not in (i, j)]
        for expression, value in _pair_facts(a, b):
            reduced = [value] + rest
            lines.append(f"{expression}={value}:" + " ".join(str(x) for x in reduced))
            found = long_form_search(reduced, target)
            if found:
                sub_lines, sub_answer, sub_check = found
                # Put the pair's expression back in place of its value (its first occurrence, at the front
                # of the reduced list, which is the one the sub-search used when it names the value first).
                answer = _substitute(sub_answer, value, f"({expression})")
                return lines + sub_lines, answer, f"{answer}={sub_check}"  # e.g. ((9+5)*7)-3=(14*7)-3=98-3=95
            lines.append("no")
    return None


def _substitute(expression, value, replacement):
    """Replace the first standalone literal `value` in expression by replacement."""
    text, literal, i = expression, str(value), 0
    while True:
        i = text.find(literal, i)
        if i < 0:
            raise AssertionError(f"{literal} not in {expression}")
        before = text[i - 1] if i > 0 else ""
        after = text[i + len(literal)] if i + len(literal) < len(text) else ""
        if not before.isdigit() and not after.isdigit():
            return text[:i] + replacement + text[i + len(literal):]
        i += 1


def long_demonstration(problem):
    """The chain-of-thought demonstration (see THE LONG FORM above); ValueError if its search (non-negative
    integer steps) finds nothing; generate such problems with integer_steps=True."""
    found = long_form_search(problem.nums, problem.target)
    if found is None:
        raise ValueError(f"{problem} has no solution with non-negative integer steps, so no long "
                         f"demonstration; generate warm-up problems with integer_steps=True")
    lines, answer, check = found
    return "<think>\n" + "\n".join(lines) + "\n" + check + "\n</think><answer>" + answer + "</answer>"


# ===========================================================================


def sample_demonstration(problem, p_long, rng, **knobs):
    """A long demonstration with probability p_long, else a short one (the paper's mixture D(p_cot)).
    rng: a random.Random (or anything with .random()). knobs: the difficulty knobs (unused: the problem is given)."""
    if not 0.0 <= p_long <= 1.0:
        raise ValueError(f"p_long must be a probability in [0, 1], got {p_long}")
    return long_demonstration(problem) if rng.random() < p_long else short_demonstration(problem)


# -----------------------------------------------------------------------------
# 6. The task plug (train.py and eval.py: --task=countdown). The other names they call are above:
# test_set, sample_demonstration, prompt_setup, render_prompt, is_long_form, and Problem.to_dict.

KNOBS = ("n_nums", "num_range", "target_range")  # train.Config fields passed as keywords to problem_stream,
# test_set and sample_demonstration
RUN_DEFAULTS = {}  # the Config defaults are Countdown's


def problem_stream(seed, phase, n_nums=(3, 4), num_range=(1, 99), target_range=(1, 100)):
    """train_stream for a phase: the warm-up draws problems with a long demonstration (integer_steps=True),
    RL any solvable problem."""
    return train_stream(seed, n_nums, num_range, target_range, integer_steps=phase == "warmup")


reward = rewards.reward  # (reward, reason): TinyZero's 1.0 / 0.1 / 0.0
