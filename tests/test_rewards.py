"""Tests for rewards.py: every branch on hand-written cases, adversarial inputs under a time bound, and
the property that solver output scores 1.0 while any value-changing edit of it does not."""
import ast
import random
import re
import time
from fractions import Fraction

import pytest

import countdown
import rewards
from rewards import countdown_reward_details, format_reward


def countdown_reward(response, nums, target):  # the reward value alone
    return countdown_reward_details(response, nums, target)[0]


N357 = [3, 5, 7]  # target 22: (3*5)+7

# (answer text inside the tags, nums, target, expected reason). Each decision in the module docstring has
# a row here.
CASES = [
    # correct, with the optional "= target" suffix, spaces and newlines
    ("(3*5)+7", N357, 22, "correct"),
    ("3*5+7", N357, 22, "correct"),
    ("7+5*3", N357, 22, "correct"),
    ("(3*5)+7 = 22", N357, 22, "correct"),
    ("(3*5)+7=22", N357, 22, "correct"),
    (" ( 3 * 5 )\n+\t7 \r\n", N357, 22, "correct"),
    ("8/(3-8/3)", [8, 3, 8, 3], 24, "correct"),  # fractional intermediate, exact arithmetic
    ("(8/(3-(8/3)))", [3, 3, 8, 8], 24, "correct"),
    ("0+5", [5, 0], 5, "correct"),  # a lone "0" is a fine literal
    ("12-3*4+2", [12, 3, 4, 2], 2, "correct"),  # left associativity and precedence: (12-12)+2
    ("12-(3*4+2)", [12, 3, 4, 2], -2, "correct"),
    ("100/5/4", [100, 5, 4], 5, "correct"),  # left associative division: (100/5)/4
    # "= N" suffix decisions
    ("(3*5)+7 = 23", N357, 22, "wrong_value"),  # claims a value other than the target
    ("3+5+7 = 15", N357, 22, "wrong_value"),  # a true equation, but not the target
    ("(3*5)+7 = 22 = 22", N357, 22, "invalid_expression"),
    ("(3*5)+7 =", N357, 22, "invalid_expression"),
    ("= 22", N357, 22, "invalid_expression"),
    ("(3*5)+7 = 2*11", N357, 22, "invalid_expression"),
    ("22 = (3*5)+7", N357, 22, "invalid_expression"),
    # wrong numbers: missing, extra, reused, a number not given
    ("3*5", N357, 15, "wrong_numbers"),
    ("3*5+7+1", N357, 23, "wrong_numbers"),
    ("3*3+7+5", N357, 24, "wrong_numbers"),
    ("3*7+1", N357, 22, "wrong_numbers"),
    ("99999999999999999999+3+5+7", N357, 22, "wrong_numbers"),  # huge literal: parsed, then rejected
    # division by zero (checked after the numbers), wrong value
    ("7/(3-3)", [3, 3, 7], 1, "division_by_zero"),
    ("7/(5-5)+3", [5, 5, 7, 3], 3, "division_by_zero"),
    ("3+5+7", N357, 22, "wrong_value"),
    ("8/3-8/3", [8, 3, 8, 3], 24, "wrong_value"),
    # operators the prompt does not allow
    ("2**3*1", [2, 3, 1], 8, "invalid_expression"),
    ("7//2*1", [7, 2, 1], 3, "invalid_expression"),
    ("7%2+1", [7, 2, 1], 2, "invalid_expression"),
    ("2^3", [2, 3], 8, "invalid_expression"),
    # unary minus / plus
    ("-3+5*2", [3, 5, 2], 7, "invalid_expression"),
    ("5*(-3)+2", [3, 5, 2], -13, "invalid_expression"),
    ("+3+5", [3, 5], 8, "invalid_expression"),
    ("3--5", [3, 5], 8, "invalid_expression"),
    # leading zeros, decimals, digit look-alikes, other characters
    ("07+3", [7, 3], 10, "invalid_expression"),
    ("00+5", [0, 5], 5, "invalid_expression"),
    ("3.0*5+7", N357, 22, "invalid_expression"),
    ("\u0663*5+7", N357, 22, "invalid_expression"),  # Arabic-Indic three: str.isdigit() is True
    ("\uff13*5+7", N357, 22, "invalid_expression"),  # fullwidth three
    ("3\u00b2+5", [3, 5], 14, "invalid_expression"),  # superscript two
    ("3*5\u00a0+7", N357, 22, "invalid_expression"),  # non-breaking space
    ("(3*5)\x00+7", N357, 22, "invalid_expression"),  # NUL byte
    ("3\u00d75+7", N357, 22, "invalid_expression"),  # multiplication sign
    ("__import__('os').system('true')", N357, 22, "invalid_expression"),
    ("sum([3, 5, 7])", N357, 15, "invalid_expression"),
    # malformed structure
    ("", N357, 22, "invalid_expression"),
    ("   ", N357, 22, "invalid_expression"),
    ("3 5*7", N357, 38, "invalid_expression"),  # two numbers in a row
    ("3(5)+7", N357, 22, "invalid_expression"),  # implicit multiplication
    ("((3*5)+7", N357, 22, "invalid_expression"),
    ("(3*5))+7", N357, 22, "invalid_expression"),
    ("()+3*5+7", N357, 22, "invalid_expression"),
    ("3*5+7+", N357, 22, "invalid_expression"),
    ("1 " + "+ 1 " * 600, [1] * 601, 601, "invalid_expression"),  # longer than MAX_ANSWER_CHARS
]



@pytest.mark.parametrize("answer, nums, target, reason", CASES, ids=[f"{i}:{c[0][:24]!r}" for i, c in enumerate(CASES)])
def test_reward_table(answer, nums, target, reason):
    expected = 1.0 if reason == "correct" else 0.1
    assert countdown_reward_details(f"<think>x</think><answer>{answer}</answer>", nums, target) == (expected, reason)
    assert countdown_reward(f"<answer>{answer}</answer>", nums, target) == expected


@pytest.mark.parametrize("response, reason", [
    ("<think>15+7=22</think><answer>(3*5)+7</answer>", "correct"),
    ("<answer>3+5+7</answer> wait, no: <answer>(3*5)+7</answer>", "correct"),  # the LAST pair counts
    ("<answer>(3*5)+7</answer> hmm <answer>3+5+7</answer>", "wrong_value"),
    ("<answer>(3*5)+7</answer> then text after the answer", "correct"),
    ("<answer><answer>(3*5)+7</answer>", "correct"),  # nested opening tags: the inner pair
    ("<answer>(3*5)+7</answer></answer></answer>", "correct"),  # TinyZero's repeated-</answer> pattern
    ("<answer>1+2<answer>(3*5)+7</answer></answer>", "correct"),
    ("<answer>(3*5)+7</answer><answer>3+5+7", "correct"),  # an unclosed later tag does not count
    ("<answer>(3*5)+7", "no_answer"),  # no closing tag
    ("(3*5)+7</answer>", "no_answer"),  # no opening tag
    ("</answer>(3*5)+7<answer>", "no_answer"),  # wrong order
    ("<Answer>(3*5)+7</Answer>", "no_answer"),  # tags are case sensitive
    ("(3*5)+7", "no_answer"),
    ("", "no_answer"),
    ("<answer></answer>", "invalid_expression"),  # present but empty: format credit, like TinyZero
    ("<answer>\n(3*5)\n+ 7\n</answer>", "correct"),
])
def test_answer_extraction(response, reason):
    value = {"correct": 1.0, "no_answer": 0.0}.get(reason, 0.1)
    assert countdown_reward_details(response, N357, 22) == (value, reason)


def test_inputs_are_plain_python_or_numpy_numbers():
    import numpy as np
    assert countdown_reward("<answer>(3*5)+7</answer>", np.array([3, 5, 7]), np.int64(22)) == 1.0
    assert countdown_reward("<answer>(3*5)+7</answer>", (7, 5, 3), 22) == 1.0
    with pytest.raises(TypeError, match="response must be a str"):
        countdown_reward(b"<answer>(3*5)+7</answer>", N357, 22)


def test_no_eval_or_exec_in_rewards():
    tree = ast.parse(open(rewards.__file__).read())
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not called & {"eval", "exec", "compile", "__import__", "getattr"}
    assert imported <= {"Fraction"}  # nothing that could run code


def test_parser_has_no_recursion_limit():
    # The length bound keeps this out of countdown_reward, but the parser itself must not depend on it.
    deep = "(" * 10_000 + "1" + ")" * 10_000
    assert rewards._evaluate(rewards._to_postfix(rewards._tokenize(deep))) == 1
    # Nesting within the length bound is scored normally: 499 nested pairs around a correct answer.
    nested = "(" * 495 + "(3*5)+7" + ")" * 495
    assert len(nested) <= rewards.MAX_ANSWER_CHARS
    assert countdown_reward_details(f"<answer>{nested}</answer>", N357, 22) == (1.0, "correct")


def _adversarial_inputs():
    rng = random.Random(0)
    mb = 1_000_000
    junk = "".join(rng.choice("<>/answer()0123456789+-*= \n\u0663\x00") for _ in range(mb))
    return {
        "1 MB random junk": junk,
        "1 MB of <answer>": "<answer>" * (mb // 8),
        "1 MB of </answer>": "</answer>" * (mb // 9),
        "1 MB alternating tags": "<answer></answer>" * (mb // 17),
        "1 MB unclosed answer": "<answer>" + "1+" * (mb // 2),
        "1 MB answer": "<answer>" + "1+" * (mb // 2) + "1</answer>",
        "10,000 nested parentheses": "<answer>" + "(" * 10_000 + "3" + ")" * 10_000 + "</answer>",
        "499 nested parentheses": "<answer>" + "(" * 499 + "3*5+7" + ")" * 499 + "</answer>",
        "power tower": "<answer>99**99**99**99</answer>",
        "huge numbers": "<answer>" + "*".join(["99999999999999999999"] * 45) + "</answer>",
        "python code": "<answer>__import__('os').system('echo hacked')</answer>",
        "while loop": "<answer>[x for x in iter(int, 1)]</answer>",
        "NUL bytes": "<answer>" + "\x00" * 999 + "</answer>",
        "unicode digits": "<answer>" + "\u0663" * 999 + "</answer>",
        "many operators": "<answer>" + "+".join(["7"] * 499) + "</answer>",
        "many divisions": "<answer>" + "/".join(["7"] * 499) + "</answer>",
    }


def test_adversarial_inputs_are_fast_and_never_raise():
    slowest = 0.0
    for name, response in _adversarial_inputs().items():
        for nums, target in [(N357, 22), ([7] * 499, 1)]:
            start = time.perf_counter()
            reward, reason = countdown_reward_details(response, nums, target)
            elapsed = time.perf_counter() - start
            slowest = max(slowest, elapsed)
            assert reward in (0.0, 0.1, 1.0) and reason in (
                "correct", "no_answer", "invalid_expression", "wrong_numbers", "division_by_zero", "wrong_value")
            # 10 ms is the target; allow slack for a loaded shared CPU (typical is well under 2 ms)
            assert elapsed < 0.05, (name, elapsed)
    print(f"slowest adversarial reward call: {slowest * 1000:.2f} ms")


def test_solver_output_scores_one_and_edits_do_not():
    # Property: solve()'s expression scores 1.0; changing one number or one operator so that the value
    # changes (checked independently with Fractions) never scores 1.0.
    rng = random.Random(0)
    problems = countdown.generate_problems(150, seed=5, n_nums=(3, 4), num_range=(1, 30))
    for problem in problems:
        expression = countdown.solve(problem.nums, problem.target)
        assert countdown_reward(f"<answer>{expression}</answer>", problem.nums, problem.target) == 1.0
        tokens = re.findall(r"\d+|[-+*/()]", expression)
        for _ in range(4):
            edited = list(tokens)
            positions = [i for i, tok in enumerate(tokens) if tok not in "()"]
            i = rng.choice(positions)
            if tokens[i].isdigit():
                edited[i] = str(int(tokens[i]) + rng.randint(1, 9))
            else:
                edited[i] = rng.choice([op for op in "+-*/" if op != tokens[i]])
            edited_text = "".join(edited)
            value = _fraction_value(edited)
            if value is not None and value == problem.target:
                continue  # the edit happened to keep the value; nothing to check
            assert countdown_reward(f"<answer>{edited_text}</answer>", problem.nums, problem.target) == 0.1


def _fraction_value(tokens):
    """Independent evaluator for the property test: recursive descent over Fractions (None on 0-division)."""
    pos = 0

    def expr():
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            right = term()
            value = None if value is None or right is None else (value + right if op == "+" else value - right)
        return value

    def term():
        nonlocal pos
        value = factor()
        while pos < len(tokens) and tokens[pos] in "*/":
            op = tokens[pos]
            pos += 1
            right = factor()
            if value is None or right is None or (op == "/" and right == 0):
                value = None
            else:
                value = value * right if op == "*" else value / right
        return value

    def factor():
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "(":
            value = expr()
            pos += 1  # ")"
            return value
        return Fraction(int(token))

    return expr()


def test_format_reward():
    assert format_reward("15+7=22</think>\n<answer>(3*5)+7</answer>") == 1.0
    assert format_reward("x</think><answer>1</answer><|endoftext|>") == 1.0
    assert format_reward("x</think><answer>1</answer>\n<|im_end|>") == 1.0
    assert format_reward("x</think><answer>1</answer> trailing") == 0.0
    assert format_reward("no think end <answer>1</answer>") == 0.0
    assert format_reward("x</think><answer>1</answer><answer>2</answer>") == 0.0
    assert format_reward("x</think></think><answer>1</answer>") == 0.0
