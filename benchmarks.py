"""The benchmarks of the seed paper's table ("Reinforcement Learning is all You Need": GSM8K, MATH, BIG-Bench Hard,
MMLU-Pro): each one's published file format, its prompt (zero-shot by default, k-shot from official exemplars),
and a grader whose rules are written out below and checked against the benchmark's own grader on real graded
outputs (tests/test_benchmarks.py, reading ../shared/data). MATH's answer equivalence is math_grader.py.

    rows = load("gsm8k", "gsm8k/test.jsonl")              # each row: its own fields + "question", "gold", "group"
    text = prompt("gsm8k", rows[0], "chat", tokenizer)
    correct, extracted, reason = grade("gsm8k", response, rows[0])     # reason: correct, wrong_value, no_answer

GSM8K (gsm8k_grade), rules in order:
  1. Gold: the text after the last "####" of the answer field (the graded GPT-3 files: after the last "A:").
  2. The model's answer, the first rule that yields a number: the first number after the last "####"; the first
     number after the last answer marker (a line-initial "A:", "The answer is", "Final answer:", "\\boxed{");
     the last number in the text; else none.
  3. Numbers: sign, "$", thousands groups, decimals, "a/b"; a "-" after a word character or ")" is a minus
     sign between terms, not a sign ("16-3-4" ends in 4). Both sides lose "$", thousands commas, a trailing ".",
     unit words, "%" and decimal zeros, and compare exactly as fractions (else as lower-case strings).
  lm-evaluation-harness's two extractions (strict "#### N", flexible: the last number) are here too, to report.
BBH (bbh_grade): the text after the FIRST "So the answer is", its first line, stripped, one trailing "." dropped;
  correct iff it equals the target exactly (case, parentheses and spaces count), as the official scoring.
MMLU-Pro (mmlu_pro_grade): the first "answer is (X)" / "answer is X" (X in A-J, case-sensitive), else the official
  "Answer: X" rule; no letter at all is wrong (no last-letter guess: the official script makes none either).
"""
import json
import os
import re
from fractions import Fraction

from math_grader import grade as math_grade
from math_grader import last_boxed


def verdict(extracted, same):
    """(correct, extracted, reason) of an extracted answer: reason "no_answer", "correct" or "wrong_value"."""
    if extracted is None:
        return False, None, "no_answer"
    return same, extracted, "correct" if same else "wrong_value"


# -----------------------------------------------------------------------------
# GSM8K

# Sign only when it is not a binary minus ("16-3"); thousands groups must be exactly three digits, so "2,3" in a
# list stays two numbers.
GSM8K_NUMBER = r"(?:(?<![\w)])[-\u2212])?\$?(?:(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?"
GSM8K_NUMBER_RE = re.compile(GSM8K_NUMBER)
# "A:" must start a line: the data has labels such as "Job A: $30000" inside the reasoning.
GSM8K_MARKER_RE = re.compile(r"(?im)^[ \t]*A:|the (?:final )?answer is|final answer:|\\boxed\{")
# lm-evaluation-harness gsm8k.yaml filters: strict takes the first match, flexible the last.
GSM8K_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _first_number(text):
    """First number in text, as written, or None."""
    m = GSM8K_NUMBER_RE.search(text)
    return m.group(0) if m else None


def gsm8k_normalize(number_text):
    """Canonical text of a number: no "$", thousands commas, trailing ".", unit words, "%" or decimal zeros."""
    s = number_text.strip().replace("\u2212", "-").replace("$", "").replace(",", "")
    s = re.sub(r"[A-Za-z%\s.]+$", "", s).strip()  # "18 dollars.", "50%", "18." -> the number alone
    if re.fullmatch(r"-?\d*\.\d+", s):
        s = s.rstrip("0").rstrip(".") or "0"  # "18.00" -> "18", "7.50" -> "7.5"
    return s


def _value(text):
    """Exact value of normalised text as a Fraction, or None when it is not a number."""
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_gold(answer_text):
    """Gold number from a GSM8K answer ("... #### N") or a graded ground truth ("... A: N"), normalised."""
    if "####" in answer_text:
        tail = answer_text.rsplit("####", 1)[1]
    else:
        marks = list(re.finditer(r"(?m)^[ \t]*A:", answer_text))
        tail = answer_text[marks[-1].end():] if marks else answer_text
    return gsm8k_normalize(tail)


def gsm8k_extract(response):
    """The model's final answer as written: after the last "####", else after the last answer marker
    (line-initial "A:", "The answer is", "Final answer:", "\\boxed{"), else the last number; None if none."""
    if "####" in response:
        found = _first_number(response.rsplit("####", 1)[1])
        if found:
            return found
    marks = list(GSM8K_MARKER_RE.finditer(response))
    if marks:
        found = _first_number(response[marks[-1].end():])
        if found:
            return found
    numbers = GSM8K_NUMBER_RE.findall(response)
    return numbers[-1] if numbers else None


def gsm8k_grade(response, gold):
    """Grade a response against a gold number: (correct, normalised extraction or None, reason), where reason is
    "correct", "wrong_value" or "no_answer"."""
    found = gsm8k_extract(response)
    if found is None:
        return False, None, "no_answer"
    pred, want = gsm8k_normalize(found), gsm8k_normalize(gold)
    pv, gv = _value(pred), _value(want)
    same = pv == gv if pv is not None and gv is not None else pred.lower() == want.lower()
    return same, pred, "correct" if same else "wrong_value"


def gsm8k_strict_match(response):
    """lm-evaluation-harness "strict-match": the first number after "#### ", or None."""
    m = GSM8K_STRICT_RE.search(response)
    return m.group(1).strip() if m else None


def gsm8k_flexible_extract(response):
    """lm-evaluation-harness "flexible-extract": the last number-like match anywhere in the text, or None."""
    matches = GSM8K_FLEXIBLE_RE.findall(response)
    if not matches:
        return None
    return next(g for g in matches[-1] if g).strip()

# -----------------------------------------------------------------------------
# BBH

BBH_ANSWER_PHRASE = "So the answer is"
BBH_PROMPT_SEPARATOR = "-----"  # the line that ends the canary header of each cot-prompts/TASK.txt


def bbh_extract(prediction):
    """Return the answer text after the first "So the answer is", or None when there is none.

    Keeps only the first line after the phrase and strips whitespace and one trailing period.
    """
    if prediction is None:
        return None
    start = prediction.find(BBH_ANSWER_PHRASE)
    if start < 0:
        return None
    rest = prediction[start + len(BBH_ANSWER_PHRASE):].strip()
    answer = rest.split("\n", 1)[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]  # the sentence's full stop, not part of the answer
    return answer or None


def bbh_grade(prediction, target):
    """Grade one BBH output: return (correct, extracted, reason).

    reason is "correct", "wrong_value" (an answer that differs from target) or "no_answer".
    The comparison is exact string equality, as in the official scoring.
    """
    extracted = bbh_extract(prediction)
    return verdict(extracted, extracted == target)


def bbh_cot_prompt(task_prompt_file_text):
    """Return the 3-shot CoT prompt of a cot-prompts/TASK.txt file without its canary header.

    The header is everything up to and including the "-----" line. The result ends with a blank line, so a caller
    can append "Q: {input}\\nA: Let's think step by step." directly (see bbh_prompt).
    """
    lines = task_prompt_file_text.split("\n")
    if BBH_PROMPT_SEPARATOR in lines[:5]:
        lines = lines[lines.index(BBH_PROMPT_SEPARATOR) + 1:]
    else:  # no separator: drop a bare canary line if present
        lines = [line for line in lines if "canary GUID" not in line]
    return "\n".join(lines).strip() + "\n\n"

# -----------------------------------------------------------------------------
# MMLU-Pro

MMLU_PRO_LETTERS = "ABCDEFGHIJ"
# Rule 1: "answer is (X)" / "answer is X"; the closing parenthesis is optional, so truncated text still counts.
_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
# Rule 2: "Answer: X". The official pattern is .*[aA]nswer:\s*([A-J]) without DOTALL: the greedy .* stays on
# one line, so it picks the LAST match that starts on the FIRST line having one. That regex backtracks
# quadratically on long lines, so _answer_colon gets the same result from this plain pattern in linear time.
# The letter sits in a lookahead so that "Answer: Answer: B" can still match at its second "Answer".
_ANSWER_COLON = re.compile(r"[aA]nswer:\s*(?=([A-J]))")


def mmlu_pro_extract(generated_text):
    """Return the answer letter (A-J) of an MMLU-Pro CoT output, or None.

    Tries "answer is (X)" first, then "Answer: X"; no last-letter guess (see the module docstring).
    """
    if not generated_text:
        return None
    match = _ANSWER_IS.search(generated_text)
    if match:
        return match.group(1)
    return _answer_colon(generated_text)


def _answer_colon(text):
    """Rule 2: the last "Answer: X" that starts on the first line with one (as the official .*-prefixed regex)."""
    matches = list(_ANSWER_COLON.finditer(text))
    if not matches:
        return None
    line_end = text.find("\n", matches[0].start())
    if line_end < 0:
        line_end = len(text)
    return [m for m in matches if m.start() < line_end][-1].group(1)


def mmlu_pro_grade(generated_text, answer_letter):
    """Grade one MMLU-Pro output: return (correct, extracted, reason).

    reason is "correct", "wrong_value" (another letter) or "no_answer" (no letter found; counted wrong).
    """
    extracted = mmlu_pro_extract(generated_text)
    return verdict(extracted, extracted == answer_letter)


def _mmlu_pro_question_block(question, options):
    """The "Question:/Options:" block shared by exemplars and the asked question."""
    text = "Question:\n" + question + "\n" + "Options:\n"
    for letter, option in zip(MMLU_PRO_LETTERS, options):
        text += "{}. {}\n".format(letter, option)
    return text


def mmlu_pro_prompt(question, options, category, initial_prompt_text, exemplars=()):
    """Build the official-format MMLU-Pro CoT prompt; zero-shot unless exemplars are given.

    Layout: the instruction (initial_prompt.txt with {$} replaced by category) and a newline, then for each
    exemplar its question block and its worked answer, then the asked question's block ending in
    "Answer: Let's think step by step.". Each exemplar is a dict with question, options and cot_content
    (the validation split's field; its leading "A: Let's think step by step." becomes "Answer: ...").
    """
    prompt = initial_prompt_text.replace("{$}", category) + "\n"
    for example in exemplars:
        cot = example["cot_content"].replace("A: Let's think step by step.", "Answer: Let's think step by step.")
        prompt += _mmlu_pro_question_block(example["question"], example["options"]) + cot + "\n\n"
    prompt += _mmlu_pro_question_block(question, options) + "Answer: Let's think step by step."
    return prompt

# -----------------------------------------------------------------------------
# Loading: the benchmark's own file -> rows {its fields..., "question", "gold", "group"}

BENCHMARK_NAMES = ("gsm8k", "math", "bbh", "mmlu_pro")
FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem",), "bbh": ("input", "target"),
          "mmlu_pro": ("question", "options", "answer")}
# MMLU-Pro's official chain-of-thought instruction (initial_prompt.txt), {$} = the question's category
MMLU_PRO_INSTRUCTION = ('The following are multiple choice questions (with answers) about {$}. Think step by step '
                        'and then finish your answer with "the answer is (X)" where X is the correct letter choice.')
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."  # SimpleRL's prompt


def read_jsonl(path):
    """The rows of a JSONL file (blank lines skipped); a bad line is an error naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"benchmark file {path!r} is empty")
    return rows


def load(benchmark, path):
    """Every row of a benchmark's file in its published format (for BBH also a directory of TASK.jsonl files,
    the official layout; the task is the file's name unless a row has a "task" field). -> rows with their own
    fields plus "question", "gold" (the answer to grade against) and "group" (BBH task, MMLU-Pro category)."""
    if benchmark not in BENCHMARK_NAMES:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARK_NAMES)}")
    files = [path]
    if benchmark == "bbh" and os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".jsonl")]
    rows = []
    for file in files:
        for number, row in enumerate(read_jsonl(file), start=1):
            missing = [key for key in FIELDS[benchmark] if key not in row]
            if missing:
                raise ValueError(f"{file}, row {number}: a {benchmark} row needs the fields {FIELDS[benchmark]}; "
                                 f"it lacks {missing}")
            if benchmark == "gsm8k":
                rows.append({**row, "gold": gsm8k_gold(row["answer"]), "group": "gsm8k"})
            elif benchmark == "math":  # MATH-500 gives "answer"; the original MATH only the solution's box
                gold = row.get("answer") or last_boxed(row.get("solution") or "")
                if not gold:
                    raise ValueError(f"{file}, row {number}: a MATH row needs an 'answer' or a \\boxed{{}} solution")
                rows.append({**row, "question": row["problem"], "gold": gold, "group": row.get("subject", "math")})
            elif benchmark == "bbh":
                task = row.get("task") or os.path.basename(file).removesuffix(".jsonl")
                rows.append({**row, "question": row["input"], "gold": row["target"], "group": task})
            else:
                rows.append({**row, "gold": row["answer"], "group": row.get("category", "mmlu_pro")})
    return rows

# -----------------------------------------------------------------------------
# Prompts


def exemplars(benchmark, row, shots, data_path, shots_file):
    """The worked examples before a question (shots = 0: none). BBH: its official 3-shot chain-of-thought prompt,
    cot-prompts/TASK.txt beside the task files. GSM8K, MATH, MMLU-Pro: the first k rows of shots_file, in the
    benchmark's own format (MMLU-Pro: rows of the question's category with their cot_content, as its validation
    split has)."""
    if shots == 0:
        return ""
    if benchmark == "bbh":
        if shots != 3:
            raise ValueError("BBH's official exemplars are three: use --shots=0 or --shots=3")
        directory = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
        path = os.path.join(directory, "cot-prompts", row["group"] + ".txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BBH --shots=3 needs the official prompt {path!r} beside the task files")
        with open(path, encoding="utf-8") as f:
            return bbh_cot_prompt(f.read())
    if not shots_file:
        raise ValueError(f"--shots={shots} for {benchmark} needs --shots_file=FILE of worked examples")
    pool = [r for r in read_jsonl(shots_file) if benchmark != "mmlu_pro" or r.get("category") == row["group"]]
    if len(pool) < shots:
        raise ValueError(f"{shots_file} has {len(pool)} exemplars for {row['group']}, fewer than --shots={shots}")
    if benchmark == "mmlu_pro":
        return pool[:shots]  # mmlu_pro_prompt lays them out
    solution = "solution" if benchmark == "math" else "answer"
    return "".join(f"Question: {r.get('problem', r.get('question'))}\nAnswer: {r[solution]}\n\n" for r in pool[:shots])


def prompt(benchmark, row, template, tokenizer, shots=()):
    """The prompt text for one row. base: plain text; chat: the same text as the user's turn of the tokenizer's
    chat template. shots: exemplars(...)'s result (text, or for MMLU-Pro the exemplar rows)."""
    if benchmark == "mmlu_pro":
        text = mmlu_pro_prompt(row["question"], row["options"], row["group"], MMLU_PRO_INSTRUCTION, shots or ())
    elif benchmark == "bbh":
        text = (shots or "") + f"Q: {row['question']}\nA: Let's think step by step."
    else:  # GSM8K and MATH: SimpleRL's zero-shot instruction (limit-of-RLVR's protocol)
        text = (shots or "") + f"Question: {row['question']}\n{MATH_INSTRUCTION}\nAnswer:"
        if template == "chat":
            text = (shots or "") + f"{row['question']}\n{MATH_INSTRUCTION}"
    if template == "chat":
        return tokenizer.chat_template([{"role": "user", "content": text}])
    return text

# -----------------------------------------------------------------------------
# Grading


def grade(benchmark, response, row):
    """(correct, extracted answer or None, reason) of one response to one loaded row, by the benchmark's rules."""
    if benchmark == "gsm8k":
        return gsm8k_grade(response, row["gold"])
    if benchmark == "math":
        return math_grade(response, row["gold"])
    if benchmark == "bbh":
        return bbh_grade(response, row["gold"])
    return mmlu_pro_grade(response, row["gold"])


GRADER_RULES = {  # what results.json and the terminal say about each grader (tests/test_benchmarks.py: agreement)
    "gsm8k": "benchmarks.gsm8k_grade: the number after the last '####' / answer marker, else the last number; "
             "exact as fractions",
    "math": "math_grader.grade: the last \\boxed{}, LaTeX normalised, compared as strings, tuples/sets/intervals "
            "and numerically",
    "bbh": "benchmarks.bbh_grade: exact match of the text after the first 'So the answer is'",
    "mmlu_pro": "benchmarks.mmlu_pro_grade: the first 'answer is (X)', else 'Answer: X'; no letter is wrong",
}
