"""Tests for gsm8k_grader: hand-written rule cases, then agreement with real graded data.

The data tests read /work/shared/data/gsm8k/ (read-only) and skip, naming the missing path, when it is absent.
`is_correct` is read only here, as the oracle; the grader never sees it.
"""
import gzip
import json
import os

import pytest

from benchmarks import gsm8k_extract as extract, gsm8k_flexible_extract as flexible_extract
from benchmarks import gsm8k_gold as gold_answer, gsm8k_grade as grade, gsm8k_normalize as normalize
from benchmarks import gsm8k_strict_match as strict_match

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "gsm8k")
TEST_PATH = os.path.join(DATA, "test.jsonl")
GRADED_PATH = os.path.join(DATA, "graded_model_solutions.jsonl.gz")


def _rows(path):
    """Rows of a (possibly gzipped) JSONL file; skip the test when the file is missing."""
    if not os.path.exists(path):
        pytest.skip(f"data file missing: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- hand-written cases, one group per rule ---

@pytest.mark.parametrize("text", ["1,000", "$1000.00", "1000", " 1000. ", "$1,000", "1000 dollars"])
def test_normalize_equal_forms(text):
    assert normalize(text) == "1000"


def test_normalize_decimals_and_signs():
    assert normalize("18.00") == "18"
    assert normalize("7.50") == "7.5"
    assert normalize("-2.5") == "-2.5"
    assert normalize("\u22125") == "-5"  # Unicode minus
    assert normalize("50%") == "50"


def test_gold_answer_both_formats():
    assert gold_answer("She makes 9 * 2 = $18 a day.\n#### 18") == "18"
    assert gold_answer("So he made a profit of $70,000\n#### 70,000") == "70000"
    assert gold_answer("Job A: $20\nThe total is 2,125\nA: 2,125") == "2125"


def test_commas():
    assert grade("The house costs $1,450,000.\nA: 1,450,000", "1450000") == (True, "1450000", "correct")
    assert extract("I have 2,3 and 4") == "4"  # "2,3" is a list, not a thousands group
    assert extract("1,2345") == "2345"


def test_dollars():
    assert grade("She makes $18 every day.\nA: $18", "18")[0]
    assert grade("The answer is $1000.00.", "1,000")[0]


def test_decimals():
    assert grade("#### 18.00", "18") == (True, "18", "correct")
    assert grade("A: 7.5", "7.50")[0]
    assert grade("A: 7.5", "7") == (False, "7.5", "wrong_value")


def test_negative_numbers():
    assert grade("The change is -5 degrees.\nA: -5", "-5")[0]
    assert not grade("A: 5", "-5")[0]
    assert extract("16-3-4") == "4"  # binary minus is not a sign


def test_fractions_compare_exactly():
    assert grade("The answer is 3/4.", "0.75")[0]
    assert not grade("A: 0.3333", "1/3")[0]


def test_no_number_is_no_answer():
    assert extract("I do not know.") is None
    assert grade("I do not know.", "18") == (False, None, "no_answer")


def test_hashes_win_over_earlier_numbers():
    assert extract("She has 16 eggs and eats 3.\n#### 18\nThe answer is 99") == "18"
    assert grade("16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18", "18") == (True, "18", "correct")


def test_last_marker_wins_and_labels_are_not_markers():
    assert extract("A: 5\nwait, recompute\nA: 6") == "6"
    assert extract("Publisher A: 5000 cents, so the total is 7500") == "7500"  # mid-line "A:" is a label
    assert extract("The answer is 12. Check: 3 * 4 = 12 and 1 more") == "12"


def test_marker_without_number_falls_through():
    assert extract("#### \nA: 7") == "7"
    assert extract("We get 42 in total.\nThe answer is unknown") == "42"


def test_last_number_fallback():
    assert extract("so she makes 9 * 2 = <<9*2=18>>18 dollars") == "18"


def test_lm_eval_extractions():
    text = "Step 1: 2 + 3 = 5.\n#### 1,000\nQuestion: next"
    assert strict_match(text) == "1,000"
    assert flexible_extract(text) == "1,000"
    assert strict_match("The answer is 18.") is None
    assert flexible_extract("The answer is 18.") == "18."  # lm-eval's pattern keeps the trailing dot
    assert flexible_extract("no digits") is None


# --- real data ---

def test_agreement_with_openai_verdicts():
    rows = _rows(GRADED_PATH)
    assert len(rows) == 5276
    disagreements = []
    for i, row in enumerate(rows):
        gold = gold_answer(row["ground_truth"])
        ok, found, _ = grade(row["solution"], gold)
        if ok != row["is_correct"]:
            disagreements.append((i, row["solution"][-80:], gold, found, row["is_correct"]))
    agree = len(rows) - len(disagreements)
    print(f"\nagreement with is_correct: {agree}/{len(rows)} = {100 * agree / len(rows):.3f}%")
    for d in disagreements:
        print("DISAGREE", d)
    assert agree / len(rows) >= 0.999


def test_every_test_answer_grades_correct():
    rows = _rows(TEST_PATH)
    assert len(rows) == 1319
    wrong = [i for i, r in enumerate(rows) if not grade(r["answer"], gold_answer(r["answer"]))[0]]
    assert wrong == []


def test_strict_match_reads_every_test_answer():
    rows = _rows(TEST_PATH)
    assert all(normalize(strict_match(r["answer"])) == gold_answer(r["answer"]) for r in rows)
