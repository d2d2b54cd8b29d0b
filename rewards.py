"""Rewards for Countdown: plain functions of the model's response and the problem.

    from rewards import reward
    reward("...<answer>(5*3)+7</answer>", countdown.Problem((3, 5, 7), 22))   # -> (1.0, "correct")

The values follow TinyZero (verl/utils/reward_score/countdown.py): 1.0 for a correct equation, 0.1 when an
answer is present but wrong (a small "format" credit), 0.0 when there is no answer at all.
countdown_reward_details also returns why, so training and evaluation can count failures by kind:
"correct", "no_answer", "invalid_expression", "wrong_numbers", "division_by_zero", "wrong_value".

Pass the model's RESPONSE only, never prompt + response: the TinyZero prompt itself contains an example
answer tag ("<answer> (1 + 2) / 3 </answer>").

Where we differ from the anchors on purpose (they all call eval() on a character-whitelisted string):
- No eval/exec anywhere. A small iterative shunting-yard parser over exact fractions.Fraction, so
  "99**99**99" cannot hang the trainer and 10,000 nested parentheses cannot raise RecursionError.
- Only the prompt's operators: binary + - * / and parentheses. "**" and "//" are invalid.
- The answer is the content of the LAST complete <answer>...</answer> pair anywhere in the response
  (TinyZero also takes the last one, but only on the last line; we do not care what follows it).
  "Complete pair" = an <answer> whose next answer tag is </answer>, so "<answer><answer>1+2</answer>" and
  "<answer>1+2</answer></answer>" both read as "1+2", and an unclosed <answer> at the end is ignored.
- Exact rational arithmetic instead of |value - target| < 1e-5, so 8/(3-8/3) = 24 is exactly right and
  nothing is "close enough".

Decisions about the answer text (each one is tested in tests/test_rewards.py):
- Characters: ASCII digits 0-9, + - * / ( ) =, and whitespace " \\t\\n\\r" between tokens. Anything else
  (".", "^", letters, unicode digits such as Arabic-Indic "٣", NUL, non-breaking space) is invalid.
  str.isdigit() would accept unicode digits, so we compare against "0123456789" explicitly.
- Unary minus is rejected ("-3+5", "3*(-2)"): the prompt allows binary operators only, and "-3" would be
  a number that was not given.
- Leading zeros are rejected ("07"): Python's eval (which the anchors use) rejects them too, and a
  literal should spell a given number exactly. "0" on its own is fine.
- Decimals ("1.0") are rejected: the numbers are integers.
- An optional "= N" suffix is allowed, where N is an integer literal; N must equal the target (otherwise
  "wrong_value"). Only one "=" and nothing but an integer after it.
- Answers longer than MAX_ANSWER_CHARS are invalid, which bounds the work per call.
- The numbers check is on the multiset of literals: every given number exactly once, no others.
Order of checks (first failure wins): no answer -> invalid_expression -> wrong_numbers -> division_by_zero
-> wrong_value.

A fork adds a reward by writing another plain function with the same arguments (see format_reward).
"""
from fractions import Fraction

MAX_ANSWER_CHARS = 1000  # longer answers are invalid; bounds the parser's work (the real ones are < 50)

DIGITS = "0123456789"  # ASCII only: str.isdigit() is also true for "٣", "²", ...
WHITESPACE = " \t\n\r"
OPERATORS = "+-*/"
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

CORRECT_REWARD = 1.0  # TinyZero's `score`
FORMAT_REWARD = 0.1  # TinyZero's `format_score`: an answer tag is present but the equation is wrong


class _Invalid(Exception):
    """Raised inside the parser for malformed expressions; never escapes this module."""


def extract_answer(response):
    """Return the text inside the last complete <answer>...</answer> pair, or None if there is none.

    The last complete pair opens at the last <answer> before the last </answer> (no <answer> comes between
    them, so the next tag after that <answer> is a </answer>) and closes at the first </answer> after it.
    Three str.find calls: linear time even for a megabyte of tags.
    """
    open_tag, close_tag = "<answer>", "</answer>"
    last_close = response.rfind(close_tag)
    if last_close < 0:
        return None
    start = response.rfind(open_tag, 0, last_close)
    if start < 0:
        return None
    start += len(open_tag)
    return response[start:response.find(close_tag, start)]


def _tokenize(text):
    """Split an expression into int literals and one-character operator/parenthesis tokens."""
    tokens = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in WHITESPACE:
            i += 1
        elif ch in DIGITS:
            j = i
            while j < n and text[j] in DIGITS:
                j += 1
            literal = text[i:j]
            if len(literal) > 1 and literal[0] == "0":
                raise _Invalid("leading zero")
            tokens.append(int(literal))  # at most MAX_ANSWER_CHARS digits, below Python's 4300-digit cap
            i = j
        elif ch in OPERATORS or ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise _Invalid(f"character {ch!r} is not allowed")
    return tokens


def _to_postfix(tokens):
    """Shunting-yard (Dijkstra 1961) with an operand/operator state machine; iterative, so no depth limit.

    Accepts exactly: expr := operand (op operand)*, operand := INT | "(" expr ")". Every operator is binary
    and left-associative. Returns the expression in postfix (reverse Polish) order.
    """
    output, stack = [], []
    expect_operand = True
    for token in tokens:
        if expect_operand:
            if isinstance(token, int):
                output.append(token)
                expect_operand = False
            elif token == "(":
                stack.append(token)
            else:
                raise _Invalid(f"expected a number or '(' but got {token!r}")  # unary minus, "**", "()"
        else:
            if isinstance(token, int) or token == "(":
                raise _Invalid("two operands in a row")  # "2 3", "2(3)"
            if token == ")":
                while stack and stack[-1] != "(":
                    output.append(stack.pop())
                if not stack:
                    raise _Invalid("unbalanced ')'")
                stack.pop()
            else:
                # Pop operators of higher or equal precedence first: left associativity.
                while stack and stack[-1] != "(" and PRECEDENCE[stack[-1]] >= PRECEDENCE[token]:
                    output.append(stack.pop())
                stack.append(token)
                expect_operand = True
    if expect_operand:
        raise _Invalid("expression ends without an operand")
    while stack:
        if stack[-1] == "(":
            raise _Invalid("unbalanced '('")
        output.append(stack.pop())
    return output


def _evaluate(postfix):
    """Evaluate a postfix expression exactly; ZeroDivisionError propagates to the caller."""
    stack = []
    for token in postfix:
        if isinstance(token, int):
            stack.append(Fraction(token))
            continue
        right, left = stack.pop(), stack.pop()
        if token == "+":
            stack.append(left + right)
        elif token == "-":
            stack.append(left - right)
        elif token == "*":
            stack.append(left * right)
        else:
            stack.append(left / right)  # Fraction division: exact, raises ZeroDivisionError on 0
    return stack[0]


def countdown_reward_details(response, nums, target):
    """Score one response; returns (reward, reason). Never raises on any response text."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    given = sorted(int(n) for n in nums)  # numpy ints are fine; Fraction compares exactly with int
    target = int(target)
    answer = extract_answer(response)
    if answer is None:
        return 0.0, "no_answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return FORMAT_REWARD, "invalid_expression"
    # Optional "= N" suffix: it must be an integer literal and equal the target.
    claimed = None
    if "=" in answer:
        expression, _, rhs = answer.partition("=")
        try:
            rhs_tokens = _tokenize(rhs)
        except _Invalid:
            return FORMAT_REWARD, "invalid_expression"
        if len(rhs_tokens) != 1 or not isinstance(rhs_tokens[0], int):
            return FORMAT_REWARD, "invalid_expression"  # also catches a second "=" (not a valid char)
        claimed = rhs_tokens[0]
    else:
        expression = answer
    try:
        postfix = _to_postfix(_tokenize(expression))
    except _Invalid:
        return FORMAT_REWARD, "invalid_expression"
    # Every given number exactly once, and no other literals (multiset equality).
    literals = sorted(token for token in postfix if isinstance(token, int))
    if literals != given:
        return FORMAT_REWARD, "wrong_numbers"
    try:
        value = _evaluate(postfix)
    except ZeroDivisionError:
        return FORMAT_REWARD, "division_by_zero"
    if value != target or (claimed is not None and claimed != target):
        return FORMAT_REWARD, "wrong_value"
    return CORRECT_REWARD, "correct"


def reward(response, problem):
    """The entry point every caller uses: TinyZero's Countdown reward (1.0 correct, 0.1 answer present but wrong,
    0.0 no answer) and its reason, for one response to one countdown.Problem."""
    return countdown_reward_details(response, problem.nums, problem.target)


def is_correct(reason):
    """Accuracy counts fully correct answers only, never the format credit."""
    return reason == "correct"


def format_reward(response, nums=None, target=None):
    """Optional small format reward (in the style of GRPO-Zero / nano-aha-moment): 1.0 if the response is
    "...</think>" then whitespace then exactly one "<answer>...</answer>" and nothing after it (a trailing
    end-of-text special token is ignored), else 0.0. The response starts after the "<think>" prefill.
    nums/target are unused; they keep the signature of every other reward. Scale it down (e.g. x 0.1) when
    adding it to reward() so that correctness dominates."""
    text = response
    for stop in ("<|endoftext|>", "<|im_end|>"):
        if text.endswith(stop):
            text = text[: -len(stop)]
    text = text.rstrip()
    think_end = text.find("</think>")
    if think_end < 0 or text.count("</think>") != 1 or "<think>" in text:
        return 0.0
    tail = text[think_end + len("</think>"):].lstrip()
    if not (tail.startswith("<answer>") and tail.endswith("</answer>")):
        return 0.0
    if tail.count("<answer>") != 1 or tail.count("</answer>") != 1:
        return 0.0
    return 1.0
