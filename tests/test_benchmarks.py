"""benchmarks.py end to end: loading each benchmark's published format, its prompts, and `eval.py --grade` on the
real graded outputs in ../shared/data, whose official verdicts our graders must reproduce (the graders never read
them). The per-rule tests of each grader are in test_benchmarks_gsm8k.py, test_benchmarks_bbh_mmlu.py and
test_math_grader.py."""
import gzip
import json
import os

import pytest

import benchmarks
import eval as ev

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def shared(*parts):
    path = os.path.join(DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared benchmark data not found: {path}")
    return path


def read(path):
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def grade_file(tmp_path, benchmark, rows):
    """eval.py --grade on rows (the benchmark's fields + "response") -> (results, graded rows in input order)."""
    out = tmp_path / "graded"
    results = ev.main(["--grade", write_jsonl(tmp_path / "responses.jsonl", rows), f"--benchmark={benchmark}",
                       f"--out_dir={out}"])
    return results, read(str(out / "graded.jsonl"))

# -----------------------------------------------------------------------------
# Agreement with the official graders, through eval.py --grade


def test_gsm8k_agrees_with_openai_on_gpt3_solutions(tmp_path):
    graded = read(shared("gsm8k", "graded_model_solutions.jsonl.gz"))
    rows = [{"question": r["question"], "answer": r["ground_truth"], "response": r["solution"]} for r in graded]
    results, ours = grade_file(tmp_path, "gsm8k", rows)
    agree = sum(o["correct"] == r["is_correct"] for o, r in zip(ours, graded))
    assert agree / len(graded) >= 0.999, f"{agree} of {len(graded)}"
    assert results["accuracy"] == pytest.approx(sum(r["is_correct"] for r in graded) / len(graded), abs=1e-3)


def test_gsm8k_gold_solutions_grade_correct(tmp_path):
    rows = [{**r, "response": r["answer"]} for r in read(shared("gsm8k", "test.jsonl"))]
    results, _ = grade_file(tmp_path, "gsm8k", rows)
    assert results["n"] == 1319 and results["accuracy"] == 1.0


def test_math500_agrees_with_the_qwen25_math_evaluator(tmp_path):
    graded = read(shared("math500", "graded_model_responses.jsonl.gz"))
    rows = [{"problem": r["problem"], "answer": r["answer"], "response": r["response"]} for r in graded]
    _, ours = grade_file(tmp_path, "math", rows)
    agree = sum(o["correct"] == r["official_correct"] for o, r in zip(ours, graded))
    assert agree / len(graded) >= 0.99, f"{agree} of {len(graded)}"


def test_math500_gold_solutions_grade_correct(tmp_path):
    rows = [{**r, "response": r["solution"]} for r in read(shared("math500", "test.jsonl"))]
    results, _ = grade_file(tmp_path, "math", rows)
    assert results["n"] == 500 and results["accuracy"] == 1.0
    assert len(results["by_group"]) == 7  # MATH's subjects


def test_bbh_reproduces_the_official_per_task_accuracy(tmp_path):
    outputs = read(shared("bbh", "graded_model_outputs", "code-davinci-002-cot.jsonl.gz"))
    with open(shared("bbh", "graded_model_outputs", "code-davinci-002-cot.metrics.json")) as f:
        official = json.load(f)
    inputs = {task: iter(read(shared("bbh", f"{task}.jsonl"))) for task in official}  # same order as outputs
    rows = [{"input": next(inputs[r["task"]])["input"], "target": r["target"], "task": r["task"],
             "response": r["prediction"]} for r in outputs]
    results, _ = grade_file(tmp_path, "bbh", rows)
    assert set(results["by_group"]) == set(official) and len(official) == 27
    for task, metrics in official.items():
        assert 100 * results["by_group"][task]["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.05), task


@pytest.mark.parametrize("model", ["Llama-2-7b-hf", "Meta-Llama-3-8B"])
def test_mmlu_pro_extracts_the_official_letter(tmp_path, model):
    graded = read(shared("mmlu_pro", "graded_model_outputs", f"{model}_5shots.jsonl.gz"))
    rows = [{key: r[key] for key in ("question", "options", "answer", "category")} | {"response": r["generated_text"]}
            for r in graded]
    results, ours = grade_file(tmp_path, "mmlu_pro", rows)
    agree = sum(o["extracted"] == r["pred"] for o, r in zip(ours, graded))
    assert agree / len(graded) >= 0.999, f"{agree} of {len(graded)}"
    assert len(results["by_group"]) == 14  # MMLU-Pro's categories
    assert sum(o["reason"] == "no_answer" for o in ours) == sum(r["pred"] is None for r in graded)

# -----------------------------------------------------------------------------
# Loading and prompts


def test_load_reads_each_format_and_names_bad_rows(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    assert benchmarks.load("gsm8k", gsm)[0] | {} == {"question": "1+1?", "answer": "1+1=2\n#### 2", "gold": "2",
                                                        "group": "gsm8k"}
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "half?", "solution": "is \\boxed{\\frac{1}{2}}"}])
    assert benchmarks.load("math", math)[0]["gold"] == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="row 1: a mmlu_pro row needs the fields .* it lacks \\['options'\\]"):
        benchmarks.load("mmlu_pro", write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "A"}]))
    with pytest.raises(ValueError, match="a MATH row needs an 'answer'"):
        benchmarks.load("math", write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "2"}]))
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not valid JSON"):
        benchmarks.load("gsm8k", str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        benchmarks.load("gsm8k", str(tmp_path / "missing.jsonl"))
    with pytest.raises(SystemExit, match="--benchmark=bbh needs --data=FILE"):  # one line, before any work
        ev.main(["--benchmark=bbh", f"--ckpt={tmp_path}"])


def test_bbh_three_shot_prompt_is_the_official_one():
    rows = benchmarks.load("bbh", shared("bbh"))
    assert len(rows) == 6511 and len({r["group"] for r in rows}) == 27
    row = next(r for r in rows if r["group"] == "navigate")
    shots = benchmarks.exemplars("bbh", row, 3, shared("bbh"), "")
    text = benchmarks.prompt("bbh", row, "base", None, shots)
    with open(shared("bbh", "cot-prompts", "navigate.txt")) as f:
        official = f.read().split("-----\n", 1)[1].strip()
    assert text == official + "\n\nQ: " + row["input"] + "\nA: Let's think step by step."
    assert "canary" not in text
    with pytest.raises(ValueError, match="three"):
        benchmarks.exemplars("bbh", row, 2, shared("bbh"), "")


def test_mmlu_pro_few_shot_takes_exemplars_of_the_same_category(tmp_path):
    question = {"question": "Q?", "options": ["x", "y"], "answer": "B", "category": "law"}
    pool = [{"question": f"E{i}", "options": ["a", "b"], "category": c, "cot_content": "A: Let's think step by step. "
             "The answer is (A)."} for i, c in enumerate(["math", "law", "law"])]
    row = benchmarks.load("mmlu_pro", write_jsonl(tmp_path / "q.jsonl", [question]))[0]
    shots = benchmarks.exemplars("mmlu_pro", row, 2, "", write_jsonl(tmp_path / "pool.jsonl", pool))
    text = benchmarks.prompt("mmlu_pro", row, "base", None, shots)
    assert text.startswith(benchmarks.MMLU_PRO_INSTRUCTION.replace("{$}", "law"))
    assert "E1" in text and "E2" in text and "E0" not in text
    assert text.endswith("Question:\nQ?\nOptions:\nA. x\nB. y\nAnswer: Let's think step by step.")
    with pytest.raises(ValueError, match="fewer than --shots=3"):
        benchmarks.exemplars("mmlu_pro", row, 3, "", str(tmp_path / "pool.jsonl"))

# -----------------------------------------------------------------------------
# --suite: two models over several benchmarks, one table


def test_suite_on_two_tiny_checkpoints(tmp_path):
    from test_eval import random_model, save_model  # tiny byte-level checkpoints in train.py's layout
    run_config = {"template": "auto", "init": "scratch", "max_new_tokens": 8, "n_nums": [3, 3],
                  "num_range": [1, 9], "target_range": [1, 20], "eval_size": 3}
    a = save_model(tmp_path / "a", random_model(), run_config)
    b = save_model(tmp_path / "b", random_model().half().float(), run_config)  # slightly different weights
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(3)])
    (tmp_path / "bbh").mkdir()
    write_jsonl(tmp_path / "bbh" / "navigate.jsonl", [{"input": "Go?\nOptions:\n- Yes\n- No", "target": "No"}] * 2)
    out = tmp_path / "suite"
    table = ev.main(["--suite", a, b, "--suite_files", f"gsm8k={gsm}", f"bbh={tmp_path / 'bbh'}", "countdown=",
                     "--n_samples=2", "--n_problems=3", "--threads=1", f"--out_dir={out}"])
    suite = json.load(open(out / "suite.json"))
    assert list(suite["table"]) == ["gsm8k", "bbh", "countdown"] and suite["labels"] == ["a", "b"]
    for name in ("gsm8k", "bbh", "countdown"):
        results = json.load(open(out / name / "results.json"))  # each benchmark's own full evaluation
        for label in ("a", "b"):
            assert table[name][label]["pass_at_1"] == results["models"][label]["pass_at_k"]["1"]
            assert table[name][label]["greedy_accuracy"] == results["models"][label]["greedy_accuracy"]
    assert json.load(open(out / "bbh" / "results.json"))["n_problems"] == 2
    with pytest.raises(SystemExit, match="--suite takes two directories and --suite_files"):
        ev.main(["--suite", a, b, "--suite_files", "arc=x.jsonl"])
