"""Tests for bbh_mmlu_grader: hand-written cases for each rule, and agreement with the official graders on real data.

The official verdicts (BBH metrics accuracy, MMLU-Pro pred) are read here only as oracles to measure agreement.
Run:  python -m pytest -q test_bbh_mmlu_grader.py      Report tables:  python test_bbh_mmlu_grader.py
"""
import functools
import gzip
import json
import os
import re

import pytest

import benchmarks
from benchmarks import bbh_cot_prompt, bbh_extract, bbh_grade, mmlu_pro_extract, mmlu_pro_grade, mmlu_pro_prompt


def bbh_accuracy_by_task(rows):
    """{task: accuracy %} as correct / n * 100, the arithmetic of the official metrics file."""
    counts = {}
    for row in rows:
        tally = counts.setdefault(row["task"], [0, 0])
        tally[0] += bbh_grade(row["prediction"], row["target"])[0]
        tally[1] += 1
    return {task: correct / total * 100 for task, (correct, total) in counts.items()}


def bbh_prompt(task_prompt_file_text, question):
    return benchmarks.prompt("bbh", {"question": question}, "base", None, bbh_cot_prompt(task_prompt_file_text))


DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
BBH_DIR = os.path.join(DATA, "bbh")
BBH_OUTPUTS = os.path.join(BBH_DIR, "graded_model_outputs", "code-davinci-002-cot.jsonl.gz")
BBH_METRICS = os.path.join(BBH_DIR, "graded_model_outputs", "code-davinci-002-cot.metrics.json")
BBH_PROMPTS = os.path.join(BBH_DIR, "cot-prompts")
MMLU_DIR = os.path.join(DATA, "mmlu_pro")
MMLU_FILES = {"Llama-2-7B": "Llama-2-7b-hf_5shots.jsonl.gz", "Llama-3-8B": "Meta-Llama-3-8B_5shots.jsonl.gz"}


def require(path):
    """Skip the calling test, naming the path, when a data file is absent."""
    if not os.path.exists(path):
        pytest.skip("data not found: " + path)
    return path


def read_jsonl_gz(path):
    with gzip.open(require(path), "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------- BBH: hand-written cases, one per rule

@pytest.mark.parametrize("prediction, expected", [
    ("A is false. So the answer is (A).", "(A)"),                         # parentheses kept, one period dropped
    ("So the answer is True.", "True"),
    ("So the answer is 3.5.", "3.5"),                                     # only the final period goes
    ("So the answer is ] ] >.", "] ] >"),                                 # inner spaces kept (dyck_languages)
    ("So the answer is   Yes.  \n", "Yes"),                               # surrounding whitespace dropped
    ("So the answer is (B).\n\nQ: next question\nA: So the answer is (C).", "(B)"),  # first occurrence, first line
    ("So the answer is\n(C).", "(C)"),                                    # answer on the next line still found
    ("So the answer is apple banana cherry", "apple banana cherry"),      # no period: nothing dropped
])
def test_bbh_extract_rules(prediction, expected):
    assert bbh_extract(prediction) == expected


@pytest.mark.parametrize("prediction", ["", None, "The answer is (A).", "so the answer is (A).", "So the answer is ."])
def test_bbh_extract_no_answer(prediction):
    # The phrase is case-sensitive and must be followed by something besides a full stop.
    assert bbh_extract(prediction) is None


@pytest.mark.parametrize("prediction, target, verdict", [
    ("So the answer is (A).", "(A)", (True, "(A)", "correct")),
    ("So the answer is A.", "(A)", (False, "A", "wrong_value")),          # parentheses matter
    ("So the answer is true.", "True", (False, "true", "wrong_value")),   # case matters
    ("So the answer is ]].", "] ]", (False, "]]", "wrong_value")),        # spacing matters
    ("Stack: ( [ ... ] )", "] )", (False, None, "no_answer")),            # no phrase, even if the target appears
])
def test_bbh_grade(prediction, target, verdict):
    assert bbh_grade(prediction, target) == verdict


def test_bbh_accuracy_by_task_formula():
    rows = [{"task": "t", "target": "(A)", "prediction": "So the answer is (A)."}] * 232
    rows += [{"task": "t", "target": "(A)", "prediction": "So the answer is (B)."}] * 18
    assert bbh_accuracy_by_task(rows) == {"t": 232 / 250 * 100}  # 92.80000000000001, as the metrics file has


def test_bbh_cot_prompt_strips_header():
    text = "BENCHMARK DATA ... canary GUID 1234\n-----\nTask description.\n\nQ: q1\nA: Let's think step by step.\nx"
    assert bbh_cot_prompt(text) == "Task description.\n\nQ: q1\nA: Let's think step by step.\nx\n\n"
    assert bbh_prompt(text, "q2").endswith("x\n\nQ: q2\nA: Let's think step by step.")


# ---------------------------------------------------------------- MMLU-Pro: hand-written cases, one per rule

@pytest.mark.parametrize("text, expected", [
    ("... so the answer is (C).", "C"),                                   # rule 1 with parentheses
    ("The answer is D", "D"),                                             # rule 1 without
    ("The answer is (J", "J"),                                            # truncated: ")" is optional
    ("The answer is (A, B, C).", "A"),                                    # several letters: the first
    ("The answer is (B).\n\nQuestion: ...\nThe answer is (E).", "B"),     # first occurrence wins
    ("Answer: Let's think. The answer is (H).", "H"),                     # rule 1 before rule 2
    ("I think so.\nAnswer: G", "G"),                                      # rule 2 fallback
    ("answer: F", "F"),                                                   # rule 2 accepts lower-case "a"
    ("Answer: A or Answer: C\nAnswer: E", "C"),                           # rule 2: last match on the first such line
    ("Answer: Answer: B", "B"),                                           # ... even when the matches touch
    ("Answer:\n  E", "E"),                                                # the space after ":" may span lines
    ("The answer is Because", "B"),                                       # official quirk: any capital A-J
])
def test_mmlu_pro_extract_rules(text, expected):
    assert mmlu_pro_extract(text) == expected


@pytest.mark.parametrize("text", [
    "", None,
    "The Answer is (C).",               # rule 1 is case-sensitive
    "The answer is (.",                 # nothing after the parenthesis
    "The answer is 100.",               # not a letter
    "The answer is (K).",               # outside A-J
    "Answer: Let's think step by step. The value is 265.",   # "L" is not A-J
    "Option B looks right but so does C",                   # no last-letter guess
])
def test_mmlu_pro_extract_no_answer(text):
    assert mmlu_pro_extract(text) is None


def test_mmlu_pro_grade():
    assert mmlu_pro_grade("The answer is (C).", "C") == (True, "C", "correct")
    assert mmlu_pro_grade("The answer is (D).", "C") == (False, "D", "wrong_value")
    assert mmlu_pro_grade("I am not sure.", "C") == (False, None, "no_answer")


def test_mmlu_pro_prompt_zero_and_few_shot():
    instruction = 'About {$}. Finish with "the answer is (X)".\n\n\n'
    zero = mmlu_pro_prompt("What is 2+2?", ["3", "4"], "math", instruction)
    assert zero == ('About math. Finish with "the answer is (X)".\n\n\n\n'
                    "Question:\nWhat is 2+2?\nOptions:\nA. 3\nB. 4\nAnswer: Let's think step by step.")
    shot = {"question": "1+1?", "options": ["2", "5"],
            "cot_content": "A: Let's think step by step. 2. The answer is (A)."}
    few = mmlu_pro_prompt("What is 2+2?", ["3", "4"], "math", instruction, exemplars=[shot])
    assert ("Question:\n1+1?\nOptions:\nA. 2\nB. 5\nAnswer: Let's think step by step. 2. The answer is (A).\n\n"
            "Question:\nWhat is 2+2?\n") in few


def test_mmlu_pro_prompt_ten_options_with_real_instruction():
    path = require(os.path.join(MMLU_DIR, "initial_prompt.txt"))
    with open(path, encoding="utf-8") as handle:
        instruction = handle.read()
    prompt = mmlu_pro_prompt("Q?", [str(i) for i in range(10)], "law", instruction)
    assert prompt.startswith("The following are multiple choice questions (with answers) about law.")
    assert "\nJ. 9\nAnswer: Let's think step by step." in prompt and "{$}" not in prompt


# ---------------------------------------------------------------- BBH: agreement with the official metrics

def bbh_comparison():
    """[(task, ours, official)] for the 27 tasks; rows are stripped to the fields a grader may use."""
    rows = [{key: row[key] for key in ("task", "target", "prediction")} for row in read_jsonl_gz(BBH_OUTPUTS)]
    with open(require(BBH_METRICS), encoding="utf-8") as handle:
        official = json.load(handle)
    ours = bbh_accuracy_by_task(rows)
    return [(task, ours.get(task), official[task]["accuracy"]) for task in sorted(official)]


def test_bbh_matches_official_accuracy_per_task():
    table = bbh_comparison()
    assert len(table) == 27
    off = [(task, ours, official) for task, ours, official in table if ours is None or abs(ours - official) > 0.1]
    assert not off, off


def test_bbh_matches_official_accuracy_exactly():
    assert all(ours == official for _, ours, official in bbh_comparison())


def test_bbh_graded_rows_match_dataset_targets():
    # The graded file must hold the same examples as bbh/TASK.jsonl, in the same order.
    rows = read_jsonl_gz(BBH_OUTPUTS)
    for task in sorted({row["task"] for row in rows}):
        with open(require(os.path.join(BBH_DIR, task + ".jsonl")), encoding="utf-8") as handle:
            targets = [json.loads(line)["target"] for line in handle]
        assert targets == [row["target"] for row in rows if row["task"] == task], task


def test_bbh_cot_prompt_on_every_real_file():
    require(BBH_PROMPTS)
    names = sorted(name for name in os.listdir(BBH_PROMPTS) if name.endswith(".txt"))
    assert len(names) == 27
    for name in names:
        with open(os.path.join(BBH_PROMPTS, name), encoding="utf-8") as handle:
            prompt = bbh_cot_prompt(handle.read())
        assert "canary" not in prompt and not prompt.startswith("-----"), name
        assert prompt.count("A: Let's think step by step.") == 3 and prompt.endswith(".\n\n"), name


# ---------------------------------------------------------------- MMLU-Pro: agreement with the official pred

@functools.lru_cache(maxsize=None)  # several tests read the same 12,032 rows
def mmlu_disagreements(model):
    """(rows, disagreeing rows) for one model; a disagreement is mmlu_pro_extract != official pred."""
    rows = read_jsonl_gz(os.path.join(MMLU_DIR, "graded_model_outputs", MMLU_FILES[model]))
    return rows, [row for row in rows if mmlu_pro_extract(row["generated_text"]) != row["pred"]]


@pytest.mark.parametrize("model", sorted(MMLU_FILES))
def test_mmlu_pro_extract_matches_official_pred(model):
    rows, bad = mmlu_disagreements(model)
    assert len(rows) == 12032
    assert (len(rows) - len(bad)) / len(rows) >= 0.999, [(r["question_id"], r["pred"]) for r in bad[:20]]


@pytest.mark.parametrize("model", sorted(MMLU_FILES))
def test_mmlu_pro_no_answer_rows_agree(model):
    # Rows where the official extractor found nothing must give None here too.
    rows, _ = mmlu_disagreements(model)
    nulls = [row for row in rows if row["pred"] is None]
    assert nulls and all(mmlu_pro_extract(row["generated_text"]) is None for row in nulls)


def last_standalone_letter(text):
    """A last-letter fallback (the step the official outputs show was NOT applied), for the test below."""
    letters = re.findall(r"\b([A-J])\b", text)
    return letters[-1] if letters else None


@pytest.mark.parametrize("model", sorted(MMLU_FILES))
def test_mmlu_pro_last_letter_fallback_would_disagree(model):
    # Evidence for the docstring: adding a last-letter step breaks agreement on hundreds of no-answer rows.
    rows, _ = mmlu_disagreements(model)
    changed = [row for row in rows if mmlu_pro_extract(row["generated_text"]) is None
               and last_standalone_letter(row["generated_text"]) is not None]
    assert len(changed) > 100 and all(row["pred"] is None for row in changed)


# ---------------------------------------------------------------- report

def print_report():
    """Print ours vs official for BBH and the MMLU-Pro agreement with any disagreeing rows."""
    print("BBH code-davinci-002 CoT: task, ours, official, exact")
    for task, ours, official in bbh_comparison():
        print("  {:42s} {:8.4f} {:8.4f} {}".format(task, ours, official, ours == official))
    for model in sorted(MMLU_FILES):
        rows, bad = mmlu_disagreements(model)
        agree = len(rows) - len(bad)
        print("MMLU-Pro {}: {}/{} = {:.4%} agree".format(model, agree, len(rows), agree / len(rows)))
        for row in bad:
            tail = row["generated_text"][-160:]
            print("  ", row["question_id"], repr(tail), mmlu_pro_extract(row["generated_text"]), row["pred"])


if __name__ == "__main__":
    print_report()
