"""Tests for math_grader: one or more hand-written cases per rule, then agreement with real graded data.

The data tests read ../shared/data/math500 and skip, naming
the missing path, when it is absent. The official verdict is read only here, as the oracle; the grader never
sees it.
"""

import gzip
import json
import os
from pathlib import Path

import pytest

from math_grader import equal, evaluate, extract, grade, last_boxed, normalize

DATA = Path(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) / '..' / 'shared' / 'data' / 'math500'
GRADED = DATA / 'graded_model_responses.jsonl.gz'
TEST = DATA / 'test.jsonl'


# ---------------------------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize('text, expected', [
    ('so \\boxed{5}.', '5'),
    ('\\boxed{1} then \\boxed{2}', '2'),                        # the last box wins
    ('\\boxed{\\frac{1}{\\sqrt{2}}}', '\\frac{1}{\\sqrt{2}}'),    # nested braces
    ('\\fbox{a{b}c}', 'a{b}c'),
    ('$\\boxed 5$', '5'),                                       # no braces: the next word
    ('\\boxed{3} and an unclosed \\boxed{4', '3'),              # an unbalanced box is skipped
    ('no box here', None),
    ('', None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize('response, expected', [
    ('work... \\(\\boxed{12}\\).', '12'),
    ('The final answer is $\\frac{1}{2}$. I hope it is correct.', '\\frac{1}{2}'),
    ('Therefore, the answer is: 42.\nDone.', '42'),
    ('so the answer is \\(7\\)', '7'),
    ('The final answer is $\\$18.90$.', '\\$18.90'),                 # an escaped dollar inside $...$
    ('I could not solve it.', None),
    ('\\boxed{ }', None),                                       # an empty answer counts as none
])
def test_extract(response, expected):
    assert extract(response) == expected


# ------------------------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize('raw, expected', [
    ('\\left( 3, \\frac{\\pi}{2} \\right)', '(3,\\frac{\\pi}{2})'),   # \left, \right, spaces
    ('10,\\!080', '10080'),                                         # \! and a thousands comma
    ('a\\,b\\;c\\:d\\quad e\\qquad f~g', 'abcdefg'),                     # spacing commands
    ('$\\frac{1}{2}$', '\\frac{1}{2}'),                             # math-mode dollars
    ('\\boxed{7}', '7'),                                            # a surrounding box
    ('5.4 \\text{ cents}', '5.4'),                                  # a unit in \text
    ('$5.4 \\text{ cents}$.', '5.4'),                               # also inside $...$, with a full stop
    ('15\\mbox{ cm}^2', '15'),                                      # a squared unit in \mbox
    ('\\frac{270}7\\text{ degrees}', '\\frac{270}{7}'),
    ('\\text{Evelyn}', 'evelyn'),                                   # a text wrapper; a word is lower-cased
    ('\\text{(B)}', 'B'),                                           # a choice letter
    ('5.', '5'),                                                    # a trailing full stop
    ('106^\\circ', '106'), ('90^{\\circ}', '90'), ('45°', '45'),     # degree signs
    ('25\\%', '25'), ('\\$18.90', '18.9'),                          # percent and dollar signs
    ('x = 5', '5'), ('k=\\frac{1}{2}', '\\frac{1}{2}'),              # "x =" prefixes
    ('x \\in [-2,7]', '[-2,7]'),                                    # "x \in" prefix
    ('5x - 7y + 11z + 4 = 0', '5x-7y+11z+4=0'),                     # an equation keeps its sides
    ('\\dfrac{17}{50}', '\\frac{17}{50}'), ('\\tfrac{1}{2}', '\\frac{1}{2}'),
    ('\\frac12', '\\frac{1}{2}'), ('\\frac 34', '\\frac{3}{4}'), ('\\frac9{19}', '\\frac{9}{19}'),
    ('\\frac\\pi2', '\\frac{\\pi}{2}'),
    ('\\sqrt2', '\\sqrt{2}'), ('11\\sqrt 2', '11\\sqrt{2}'), ('\\sqrt[3]{2}', '\\sqrt[3]{2}'),
    ('x^{2}', 'x^2'), ('4210_{5}', '4210_5'),                       # one-character scripts
    ('10{,}000', '10000'), ('900,000,000', '900000000'), ('\\$32,\\!348', '32348'),
    ('0.50', '0.5'), ('037.50', '37.5'), ('.0000672', '0.0000672'), ('+5', '5'), ('-0.0', '0'),
    ('3, 5, 7', '3,5,7'),                                           # a list is not a thousands number
    ('\\pi r^2', '\\pi r^2'),                                       # command + letter keep one space
    ('x \\leq 3', 'x\\le3'),
    ('π', '\\pi'),                                                  # unicode
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_normalize_none_is_empty():
    assert normalize(None) == ''


# ------------------------------------------------------------------------------------------------------ evaluator

@pytest.mark.parametrize('expr, value', [
    ('\\frac{1}{2}+\\frac{1}{3}', 5 / 6), ('2\\sqrt{3}', 2 * 3 ** 0.5), ('-2^2', -4), ('(1+2)*3', 9),
    ('2^{10}', 1024), ('\\sqrt[3]{-8}', -2), ('12\\frac{3}{5}', 12.6), ('3\\cdot4\\div6', 2),
    ('\\pi/2', 1.5707963267948966),
])
def test_evaluate(expr, value):
    assert abs(complex(evaluate(normalize(expr))) - value) < 1e-12


@pytest.mark.parametrize('expr', ['4:30', 'x+1', '\\text{east}', '1/0', '(1,2)', '', '2+'])
def test_evaluate_rejects(expr):
    assert evaluate(normalize(expr)) is None


# ------------------------------------------------------------------------------------------------------- equality

@pytest.mark.parametrize('pred, gold', [
    ('\\frac{\\sqrt{3}}{2}', '\\frac{1}{2}\\sqrt{3}'),
    ('0.5', '\\frac{1}{2}'), ('1/2', '\\dfrac12'), ('\\frac{6}{4}', '\\frac{3}{2}'),
    ('63/5', '12\\frac{3}{5}'),                                     # a mixed number
    ('2\\sqrt{5}', '\\sqrt{20}'), ('\\sqrt{4}', '2'),
    ('(3,\\frac{\\pi}{2})', '\\left( 3, \\frac{\\pi}{2} \\right)'),  # a tuple element-wise
    ('(0.6, 8/3]', '\\left(\\frac{3}{5},\\frac{8}{3}\\right]'),      # an interval element-wise
    ('(-\\infty,-1)\\cup(3,\\infty)', '(3,\\infty)\\cup(-\\infty,-1)'),
    ('\\{2,1\\}', '\\{1,2\\}'), ('-2, 1+\\sqrt5, 1-\\sqrt5', '\\{1\\pm\\sqrt{5},-2\\}'),
    ('1+\\sqrt{19}, 1-\\sqrt{19}', '1 \\pm \\sqrt{19}'), ('7, 5, 3', '3, 5, 7'),
    ('\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\end{pmatrix}', '\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}'),
    ('7i - 2', '-2 + 7i'), ('-80+15x', '15x - 80'), ('2r\\pi', '2\\pi r'), ('t\\cdot 4', '4t'),
    ('x = 5', '5'), ('\\text{(C)}', 'C'), ('East', '\\text{east}'), ('900000000', '900,000,000'),
    ('10000', '10{,}000'), ('4:30 \\text{ p.m.}', '4:30'), ('\\$5', '5 \\text{ dollars}'), ('120', '120^\\circ'),
])
def test_equal(pred, gold):
    assert equal(pred, gold)


@pytest.mark.parametrize('pred, gold', [
    ('\\frac{1}{2}', '\\frac{1}{3}'), ('0.5', '5'), ('(1,2)', '[1,2]'), ('(1,2)', '(2,1)'),
    ('(1,2]', '(1,2)'), ('\\{1,2\\}', '(1,2)'), ('1,2', '1,2,3'), ('\\infty', '-\\infty'),
    ('6287000', '6290000'), ('9999\\frac{6}{7}', '10{,}000'), ('0.333', '\\frac13'),
    ('x^2+1', 'x^2+2'), ('tase', 'east'), ('x+1', 'y+1'), ('4:30', '4:30p..'), ('1\\frac{1}{9}', '1\\frac{1}{10}'),
    ('', '0'), (None, '0'),
])
def test_not_equal(pred, gold):
    assert not equal(pred, gold)


def test_grade_reasons():
    assert grade('so \\boxed{\\dfrac{1}{2}}', '\\frac12') == (True, '\\dfrac{1}{2}', 'correct')
    assert grade('so \\boxed{3}', '4') == (False, '3', 'wrong_value')
    assert grade('no idea', '4') == (False, None, 'no_answer')


# ---------------------------------------------------------------------------------------------------- real data

def _rows(path):
    """The JSON lines of path, skipping the test when it is absent."""
    if not path.exists():
        pytest.skip('data not found: %s' % path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rt', encoding='utf-8') as handle:
        return [json.loads(line) for line in handle]


def test_agreement_with_official_grader():
    """grade() agrees with the Qwen2.5-Math evaluator on >= 99% of the 800 graded responses."""
    rows = _rows(GRADED)
    disagreements = []
    for row in rows:
        correct, extracted, _ = grade(row['response'], row['answer'])  # only response and gold go in
        if correct != row['official_correct']:
            disagreements.append((row['idx'], extracted, row['answer'], row['official_correct']))
    agreed = len(rows) - len(disagreements)
    print('agreement %d/%d = %.2f%%' % (agreed, len(rows), 100 * agreed / len(rows)))
    for item in disagreements:
        print('disagree: idx=%s ours=%r gold=%r official=%s' % item)
    assert len(rows) == 800
    assert agreed >= 792, disagreements


def test_gold_solutions_grade_correct():
    """Each MATH-500 solution's own last box grades correct against the given answer."""
    rows = _rows(TEST)
    failures = [(row['unique_id'], last_boxed(row['solution']), row['answer'])
                for row in rows if not grade(row['solution'], row['answer'])[0]]
    assert len(rows) == 500
    assert failures == []


def test_distinct_gold_answers_stay_distinct():
    """No false positives between different MATH-500 answers, except pairs that really are the same value."""
    answers = sorted({row['answer'] for row in _rows(TEST)})
    same = {frozenset(pair) for pair in [('-2,1', '1,-2'), ('10,\\!080', '10080'), ('120', '120^\\circ'),
                                         ('15', '15\\mbox{ cm}^2'), ('2 \\sqrt{5}', '2\\sqrt{5}'),
                                         ('30', '30^\\circ'), ('36', '36^\\circ'), ('36', '\\$36'),
                                         ('36^\\circ', '\\$36'), ('5', 'x=5'), ('90', '90^\\circ'),
                                         ('\\frac14', '\\frac{1}{4}')]}
    found = {frozenset((a, b)) for i, a in enumerate(answers) for b in answers[i + 1:] if equal(a, b)}
    assert found == same
