"""A MATH / MATH-500 answer grader in pure Python (standard library only).

Rules, in the order they are applied:

1. Extraction (`extract`): the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched, also
   ``\\boxed 5``); else the text after the last "final answer is" / "the answer is"; else None.
2. Normalisation (`normalize`), each step on the result of the one before:
   a. unicode math symbols -> LaTeX; a surrounding ``\\boxed{}``, ``$`` / ``\\(`` ``\\)`` and a final full stop go;
   b. sizing and spacing commands go: ``\\left``, ``\\right``, ``\\!``, ``\\,``, ``\\;``, ``\\:``, ``\\ ``,
      ``\\quad``, ``\\qquad``, ``\\displaystyle``, ``~``;
   c. a trailing ``\\text{...}`` after a number is a unit and is dropped (``15\\mbox{ cm}^2`` -> ``15``);
      other text wrappers are unwrapped (``\\text{Evelyn}`` -> ``Evelyn``);
   d. degree signs, ``\\%``, ``\\$`` and ``$`` go; ``\\dfrac`` / ``\\tfrac`` / ``\\cfrac`` -> ``\\frac``;
      ``\\leq`` -> ``\\le``, ``\\geq`` -> ``\\ge``;
   e. whitespace goes, except one space between a command and a following letter (``\\pi r``);
   f. command arguments get braces: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``;
      one-character super/subscripts lose them: ``x^{2}`` -> ``x^2``, ``4210_{5}`` -> ``4210_5``;
   g. a "x =" or "x \\in" prefix (a single-letter left side) goes, and so do trailing full stops;
   h. plain numbers: thousands separators (``10{,}000``, ``32,\\!348``, ``3,250``), a leading ``+``,
      leading zeros and trailing decimal zeros go (``037.50`` -> ``37.5``, ``.5`` -> ``0.5``);
   i. a choice letter loses its parentheses (``(B)`` -> ``B``); a bare word is lower-cased.
3. Equality (`equal`), on the two normalised strings:
   a. identical strings;
   b. the same structure compared element-wise: tuples and intervals with the same brackets (in order),
      matrices of the same shape (in order), sets / bare comma lists / ``a \\pm b`` (in any order), unions of
      intervals (in any order);
   c. scalars: numeric equality when both evaluate to numbers with a small evaluator of LaTeX arithmetic
      (rationals exactly with Fraction, otherwise a relative tolerance of 1e-9);
   d. scalars with the same single-letter variables: equal values at three fixed points (``4a-2`` = ``-2+4a``);
   e. otherwise not equal.
4. Verdict (`grade`): (correct, extracted, reason), reason "correct", "wrong_value" or "no_answer".
"""

import math
import re
from fractions import Fraction

REL_TOL = 1e-9  # MATH asks for exact answers, so numeric equality is strict
ABS_TOL = 1e-12  # only absorbs float noise around zero, e.g. sin(pi)

# -----------------------------------------------------------------------------
# Extraction

_BOX = re.compile(r'\\(?:boxed|fbox)(?![a-zA-Z])')
_PHRASE = re.compile(r'(?:final answer|the answer)\s*(?:is|:)\s*:?', re.IGNORECASE)


def _braced(text, start):
    """Return (content, end) of the brace group opening at text[start] == '{', or None if unbalanced."""
    depth = 0
    for k in range(start, len(text)):
        if text[k] == '{':
            depth += 1
        elif text[k] == '}':
            depth -= 1
            if depth == 0:
                return text[start + 1:k], k + 1
    return None


def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} in text (nested braces matched), else None.

    "\\boxed 5" (no braces) gives the next word. A box whose braces never close is skipped in favour of
    an earlier, complete one.
    """
    if not text:
        return None
    for m in reversed(list(_BOX.finditer(text))):
        rest = text[m.end():]
        stripped = rest.lstrip()
        if stripped.startswith('{'):
            group = _braced(stripped, 0)
            if group is not None:
                return group[0]
        elif rest[:1].isspace() and stripped:
            return re.split(r'[\s$]', stripped, maxsplit=1)[0]
    return None


def extract(response):
    """The final answer in a model response, or None.

    The last box wins (every one of the 800 graded responses has one, and the official evaluator also takes
    the last). Without a box, fall back to the text after the last "final answer is" / "the answer is" (the
    phrase the Qwen2.5-Math evaluator and Minerva-style prompts use), up to the end of its line: the first
    $...$ in it if there is one, without \\( \\) and a trailing full stop. An empty answer counts as none.
    """
    answer = last_boxed(response)
    if answer is None and response:
        matches = list(_PHRASE.finditer(response))
        if matches:
            line = response[matches[-1].end():].strip().split('\n')[0]
            dollars = re.search(r'(?<!\\)\$+((?:\\\$|[^$])+?)(?<!\\)\$', line)  # \$ is a dollar sign
            answer = dollars.group(1) if dollars else line
            answer = re.sub(r'^\\\(|\\\)$', '', answer.strip().rstrip('.').strip())
    if answer is None or not answer.strip():
        return None
    return answer.strip()


# -----------------------------------------------------------------------------
# Normalisation

_UNICODE = {'π': '\\pi ', '√': '\\sqrt', '−': '-', '×': '\\times ', '·': '\\cdot ', '∞': '\\infty ', '°': ''}


def _commands(*names):
    """A regex alternation of LaTeX commands, each ending where its name ends (\\dfrac12 is \\dfrac, 12)."""
    return '|'.join(r'\\' + name + r'(?![a-zA-Z])' for name in names)


_SPACING = re.compile(_commands('left', 'right', 'displaystyle', 'quad', 'qquad') + r'|(?<!\\)\\[,;:! ]|~')
_TEXT_CMD = r'\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|operatorname)'
_UNIT = re.compile(r'(?<=\S)\s*' + _TEXT_CMD + r'\{[^{}]*\}(?:\^\{?\d\}?)?\s*$')
_WRAPPER = re.compile(_TEXT_CMD + r'\{([^{}]*)\}')
_RENAMES = [(re.compile(_commands('dfrac', 'tfrac', 'cfrac')), r'\\frac'),
            (re.compile(_commands('leq', 'leqslant')), r'\\le'), (re.compile(_commands('geq', 'geqslant')), r'\\ge'),
            (re.compile(_commands('neq')), r'\\ne')]
_DROPS = re.compile(r'\^\s*\{?\s*\\circ\s*\}?|' + _commands('circ', 'degree') + r'|\\%|%|\\\$|\$')
_PREFIX = re.compile(r'^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:=|' + _commands('in') + r')(?!.*=)')
_THOUSANDS = re.compile(r'[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?')
_DECIMAL = re.compile(r'([-+]?)(\d*)(?:\.(\d*))?')


def _strip_wrappers(s):
    """Drop the unicode, box and math-mode wrappers and a final full stop around an answer (rule a)."""
    for char, latex in _UNICODE.items():
        s = s.replace(char, latex)
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None and re.fullmatch(r'\\(?:boxed|fbox)\s*\{.*\}', s, re.DOTALL):
        s = boxed
    s = re.sub(r'^\\\(|\\\)$|^\\\[|\\\]$|(?<!\\)\$', '', s.strip())
    return s.strip().rstrip('.').rstrip()  # a unit is only found at the very end


def _drop_text(s):
    """A trailing \\text{...} after a number is a unit; other text wrappers are unwrapped (rule c)."""
    unit = _UNIT.search(s)
    if unit and re.search(r'\d', s[:unit.start()]):
        s = s[:unit.start()]
    while _WRAPPER.search(s):
        s = _WRAPPER.sub(r'\1', s)
    return s


def _squeeze_spaces(s):
    """Remove whitespace, keeping one space between a command and a letter so "\\pi r" stays two tokens."""
    s = re.sub(r'(\\[a-zA-Z]+)\s+(?=[a-zA-Z])', '\\1\x00', s)
    return re.sub(r'\s+', '', s).replace('\x00', ' ')


def _argument(s, k):
    """Return (argument, end) of the LaTeX argument starting at s[k]: a brace group, command or character."""
    while k < len(s) and s[k] == ' ':
        k += 1
    if k >= len(s):
        return None
    if s[k] == '{':
        group = _braced(s, k)
        return None if group is None else ('{' + group[0] + '}', group[1])
    command = re.match(r'\\[a-zA-Z]+', s[k:])
    if command:
        return '{' + command.group() + '}', k + command.end()
    return '{' + s[k] + '}', k + 1


def _brace_arguments(s, command, count):
    """Give every use of command its braces: \\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2} (rule f)."""
    out, k = [], 0
    pattern = re.compile(re.escape(command) + r'(?![a-zA-Z])')
    while True:
        m = pattern.search(s, k)
        if not m:
            return ''.join(out) + s[k:]
        out.append(s[k:m.end()])
        k = m.end()
        if command == '\\sqrt' and s[k:k + 1] == '[':  # keep the index of an nth root as it is
            close = s.find(']', k)
            out.append(s[k:close + 1])
            k = close + 1 if close >= 0 else len(s)
        for _ in range(count):
            arg = _argument(s, k)
            if arg is None:
                break
            out.append(arg[0])
            k = arg[1]


def _plain_number(s):
    """Canonical text of a plain decimal number: no thousands commas, sign +, or spare zeros (rule h)."""
    if _THOUSANDS.fullmatch(s):
        s = s.replace(',', '')
    m = _DECIMAL.fullmatch(s)
    if not m or not (m.group(2) or m.group(3)):
        return s
    sign, whole, frac = m.group(1), m.group(2).lstrip('0') or '0', (m.group(3) or '').rstrip('0')
    text = whole + ('.' + frac if frac else '')
    return text if sign != '-' or text == '0' else '-' + text


def normalize(answer):
    """Canonical string form of a LaTeX answer, following rules 2a-2i of the module docstring."""
    if answer is None:
        return ''
    s = _strip_wrappers(str(answer))
    s = _drop_text(_SPACING.sub(' ', s))
    s = _DROPS.sub('', s)
    for pattern, repl in _RENAMES:
        s = pattern.sub(repl, s)
    s = _squeeze_spaces(s)
    s = _brace_arguments(_brace_arguments(s, '\\frac', 2), '\\sqrt', 1)
    s = re.sub(r'([_^])\{(\w)\}', r'\1\2', s)
    s = _PREFIX.sub('', s).rstrip('.')
    s = _plain_number(s.replace('{,}', ','))
    choice = re.fullmatch(r'\(([A-Z])\)', s)
    if choice:
        s = choice.group(1)
    if re.fullmatch(r'[A-Za-z]{2,}', s):
        s = s.lower()
    return s


# -----------------------------------------------------------------------------
# A small evaluator of LaTeX arithmetic (recursive descent over tokens; state is [tokens, position, env])

_TOKEN = re.compile(r'\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\.|\S')
_FUNCTIONS = {'\\sin': math.sin, '\\cos': math.cos, '\\tan': math.tan, '\\ln': math.log, '\\exp': math.exp,
              '\\cot': lambda x: 1 / math.tan(x), '\\sec': lambda x: 1 / math.cos(x),
              '\\csc': lambda x: 1 / math.sin(x)}
_CONSTANTS = {'\\pi': math.pi, '\\infty': math.inf, 'i': 1j}
_ATOM_START = {'(', '{', '\\frac', '\\sqrt'} | set(_FUNCTIONS) | set(_CONSTANTS)
_MAX_EXACT_POWER = 1000  # larger integer powers go through floats so that Fraction stays fast


def _peek(st):
    """The next token, or None at the end."""
    return st[0][st[1]] if st[1] < len(st[0]) else None


def _take(st, expected=None):
    """Consume and return the next token, checking it when expected is given."""
    tok = _peek(st)
    if tok is None or (expected is not None and tok != expected):
        raise ValueError('expected %r, got %r' % (expected, tok))
    st[1] += 1
    return tok


def _starts_atom(tok, env):
    """Whether tok can begin a factor, so that juxtaposition ("2\\sqrt{3}") means multiplication."""
    return tok is not None and (tok in _ATOM_START or tok[0].isdigit() or tok[0] == '.' or tok in env)


def _expr(st):
    """expr := term (('+' | '-') term)*"""
    value = _term(st)
    while _peek(st) in ('+', '-'):
        value = value + _term(st) if _take(st) == '+' else value - _term(st)
    return value


def _term(st):
    """term := signed (('*' | '/' | '\\cdot' | '\\times' | '\\div' | juxtaposition) signed)*"""
    value = _signed(st)
    while True:
        tok = _peek(st)
        if tok in ('*', '\\cdot', '\\times'):
            _take(st)
            value = value * _signed(st)
        elif tok in ('/', '\\div'):
            _take(st)
            value = value / _signed(st)
        elif _starts_atom(tok, st[2]):
            value = value * _power(st)
        else:
            return value


def _signed(st):
    """signed := ('-' | '+') signed | power  (so -2^2 is -(2^2))"""
    if _peek(st) == '-':
        _take(st)
        return -_signed(st)
    if _peek(st) == '+':
        _take(st)
        return _signed(st)
    return _power(st)


def _power(st):
    """power := atom ('^' signed-atom)?"""
    base = _atom(st)
    if _peek(st) != '^':
        return base
    _take(st)
    if _peek(st) == '-':  # 2^-1, as models sometimes write it
        _take(st)
        return _raise(base, -_atom(st))
    return _raise(base, _atom(st))


def _raise(base, exponent):
    """base ** exponent, exactly for rationals with a modest integer exponent."""
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1 \
            and abs(exponent) <= _MAX_EXACT_POWER:
        return base ** int(exponent)
    base, exponent = _as_float(base), _as_float(exponent)
    if isinstance(base, float) and base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        base = complex(base)  # a negative base with a fractional exponent is complex
    return base ** exponent


def _as_float(x):
    """A Fraction as float; floats and complex numbers unchanged."""
    return float(x) if isinstance(x, Fraction) else x


def _root(x, n):
    """The n-th root of x: exact for perfect rational squares, real for odd roots of negatives."""
    if isinstance(x, Fraction) and n == 2 and x >= 0:
        num, den = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if num * num == x.numerator and den * den == x.denominator:
            return Fraction(num, den)
    x = _as_float(x)
    if isinstance(x, float) and x < 0:
        return -((-x) ** (1 / n)) if n % 2 == 1 else complex(x) ** (1 / n)
    return x ** (1 / n)


def _mixed_number(st, whole):
    """12\\frac{3}{5} is the mixed number 12 + 3/5 when the fraction is proper and both parts are integers."""
    t, i = st[0], st[1]
    pattern = t[i:i + 7]
    if len(pattern) == 7 and pattern[0] == '\\frac' and pattern[1::3] == ['{', '{'] and \
            pattern[3::3] == ['}', '}'] and pattern[2].isdigit() and pattern[5].isdigit():
        num, den = int(pattern[2]), int(pattern[5])
        if 0 < num < den:
            st[1] += 7
            return whole + Fraction(num, den)
    return whole


def _atom(st):
    """atom := number | (expr) | {expr} | \\frac A B | \\sqrt[n]A | function A | constant | variable"""
    tok = _take(st)
    if tok[0].isdigit() or tok[0] == '.':
        value = Fraction(tok)
        return _mixed_number(st, value) if tok.isdigit() else value
    if tok in ('(', '{'):
        value = _expr(st)
        _take(st, ')' if tok == '(' else '}')
        return value
    if tok == '\\frac':
        numerator = _atom(st)
        return numerator / _atom(st)
    if tok == '\\sqrt':
        index = 2
        if _peek(st) == '[':
            _take(st)
            index = int(_expr(st))
            _take(st, ']')
        return _root(_atom(st), index)
    if tok in _FUNCTIONS:
        return _function(st, _FUNCTIONS[tok])
    if tok in _CONSTANTS:
        return _CONSTANTS[tok]
    if tok in st[2]:
        return st[2][tok]
    raise ValueError('cannot evaluate %r' % tok)


def _function(st, fn):
    """fn applied to the next power, with "\\sin^2 x" meaning (sin x)^2."""
    exponent = None
    if _peek(st) == '^':
        _take(st)
        exponent = _atom(st)
    value = fn(_as_float(_power(st)))
    return value if exponent is None else _raise(value, exponent)


def evaluate(s, env=None):
    """The value of a normalised LaTeX expression (Fraction, float or complex), or None if it is not one.

    env maps single-letter variable names to values; without it any letter other than i (the imaginary unit)
    makes the expression non-numeric.
    """
    st = [_TOKEN.findall(s), 0, env or {}]
    if not st[0]:
        return None
    try:
        value = _expr(st)
    except (ValueError, ArithmeticError, TypeError, RecursionError):
        return None
    return value if st[1] == len(st[0]) else None


def _close(a, b):
    """Numeric equality: exact for two rationals, else relative tolerance REL_TOL."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = complex(a), complex(b)
    if not (math.isfinite(abs(a)) and math.isfinite(abs(b))):
        return a == b  # infinities must match exactly (and NaN never does)
    return abs(a - b) <= max(REL_TOL * max(abs(a), abs(b)), ABS_TOL)


# -----------------------------------------------------------------------------
# Equality

_MATRIX = re.compile(r'\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}', re.DOTALL)
_OPEN, _CLOSE = ('(', '[', '{'), (')', ']', '}')


def _split_top(s, separator):
    """Split s on separator where it is outside every (), [] and {} pair."""
    parts, depth, start, k = [], 0, 0, 0
    while k < len(s):
        if s[k] in _OPEN:
            depth += 1
        elif s[k] in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(separator, k):
            parts.append(s[start:k])
            start = k + len(separator)
            k = start
            continue
        k += 1
    return parts + [s[start:]]


def _enclosed(s):
    """(open, close, inner) when one bracket pair, e.g. "(" and "]", encloses all of s; else None."""
    opening = '\\{' if s.startswith('\\{') else s[:1]
    closing = '\\}' if s.endswith('\\}') else s[-1:]
    if opening not in ('(', '[', '\\{') or closing not in (')', ']', '\\}') or len(s) < 2:
        return None
    depth, body = 0, s[len(opening) - 1:]  # start at the bracket itself, past the backslash of \{
    for k, char in enumerate(body):
        depth += char in _OPEN
        depth -= char in _CLOSE
        if depth == 0 and k < len(body) - 1:
            return None  # the first bracket closes early, as in (1,2)\cup(3,4)
    return opening, closing, s[len(opening):len(s) - len(closing)]


def _expand_pm(parts):
    """a \\pm b stands for the two values a + b and a - b."""
    out = []
    for part in parts:
        pieces = _split_top(part, '\\pm')
        out += [pieces[0] + '+' + pieces[1], pieces[0] + '-' + pieces[1]] if len(pieces) == 2 else [part]
    return out


def _structure(s):
    """(kind, elements, ordered) of a normalised answer: scalar, tuple/interval, set, union or matrix."""
    matrix = _MATRIX.fullmatch(s)
    if matrix:
        rows = [row.split('&') for row in matrix.group(2).split('\\\\') if row]
        return 'matrix%dx%d' % (len(rows), len(rows[0])), [x for row in rows for x in row], True
    union = _split_top(s, '\\cup')
    if len(union) > 1:
        return 'union', union, False
    enclosed = _enclosed(s)
    if enclosed and enclosed[0] == '\\{':
        return 'set', _expand_pm(_split_top(enclosed[2], ',')), False
    if enclosed and len(_split_top(enclosed[2], ',')) > 1:
        return enclosed[0] + enclosed[1], _split_top(enclosed[2], ','), True
    parts = _expand_pm(_split_top(s, ','))
    return ('set', parts, False) if len(parts) > 1 else ('scalar', parts, True)


def _match_unordered(xs, ys):
    """Whether every x can be paired with a different, equal y (greedy; lists have the same length)."""
    unused = list(ys)
    for x in xs:
        partner = next((k for k, y in enumerate(unused) if _equal_normalized(x, y)), None)
        if partner is None:
            return False
        unused.pop(partner)
    return True


def _variables(s):
    """The single-letter variables of s, or None when it has words (so "east" is not e*a*s*t)."""
    bare = re.sub(r'\\[a-zA-Z]+', ' ', s)
    if re.search(r'[a-zA-Z]{2,}', bare):
        return None
    return set(re.findall(r'[a-zA-Z]', bare)) - {'i'}


def _same_function(a, b):
    """Whether a and b, with the same variables, agree at three fixed irrational points."""
    names = _variables(a)
    if not names or names != _variables(b):
        return False
    for trial in range(3):
        env = {name: math.sqrt(2 + trial) + 0.37 * j for j, name in enumerate(sorted(names))}
        x, y = evaluate(a, env), evaluate(b, env)
        if x is None or y is None or not _close(x, y):
            return False
    return True


def _scalar_equal(a, b):
    """Rules 3c and 3d for two scalars."""
    x, y = evaluate(a), evaluate(b)
    if x is not None and y is not None:
        return _close(x, y)
    return x is None and y is None and _same_function(a, b)


def _equal_normalized(a, b):
    """Rules 3a-3e on two normalised strings."""
    if a == b:
        return True
    if not a or not b:
        return False
    kind_a, xs, ordered = _structure(a)
    kind_b, ys, _ = _structure(b)
    if kind_a == kind_b == 'scalar':
        return _scalar_equal(a, b)
    if {kind_a, kind_b} <= {'scalar', 'set'}:
        ordered = False  # a single value against a one-element set, or a \pm against a list
    elif kind_a != kind_b:
        return False  # brackets and shapes are significant: (1,2) is not [1,2]
    if len(xs) != len(ys):
        return False
    if ordered:
        return all(_equal_normalized(x, y) for x, y in zip(xs, ys))
    return _match_unordered(xs, ys)


def equal(pred, gold):
    """Whether the predicted answer equals the gold answer (rules 2 and 3 of the module docstring)."""
    if pred is None or gold is None:
        return False
    return _equal_normalized(normalize(pred), normalize(gold))


def grade(response, gold):
    """Grade a full model response against the gold answer.

    Returns (correct, extracted, reason) with reason "correct", "wrong_value" or "no_answer".
    """
    extracted = extract(response)
    if extracted is None:
        return False, None, 'no_answer'
    correct = equal(extracted, gold)
    return correct, extracted, 'correct' if correct else 'wrong_value'
