"""Parity with rare long chains of thought: the task of Tsilivis et al., "How Reinforcement Learning After
Next-Token Prediction Facilitates Learning" (arXiv 2510.11495), in one file.

A problem is d bits x_1 ... x_d; the answer is their parity x_1 ^ x_2 ^ ... ^ x_d (^ = XOR), e.g. 1011 -> 1.

What is here, top to bottom:
1. Problem ({"bits": [1, 0, 1, 1]}), the held-out split and the problem streams. Every one of the 2^d bit
   strings belongs to the training side or the held-out side, by a SHA-256 hash of the string: TEST_BUCKETS of
   N_BUCKETS buckets are held out, whatever the seed, so the training stream never produces a held-out problem.
2. The prompt: the bits, then a newline ("1011\\n"), one byte (token) per bit for the byte-level model.
3. Demonstrations for the next-token-prediction warm-up, the paper's mixture D(p_cot) with p_cot = p_long:
   - short: the parity alone ("1");
   - long: the mark ">" then the running prefix parities x_1, x_1^x_2, ..., ending with the parity
     (">1101" for 1011);
   - leap-k long: ">" then every k-th prefix parity, ending with the parity (k = 2: ">11" for 1011), the
     paper's chain that skips steps.
   No separators: the i-th prefix parity is predicted while reading the (i-1)-th, whose value is the current
   token, and the bit it adds sits a fixed d + 1 positions back; the first one, x_1, is a plain copy from
   there, which teaches the model where to look. The mark makes that copy clean: after ">" the reply is
   always the chain (the README says what was measured without it, and with spaces between values).
   A leap-k chain has no copy to start from and no fixed offset: its j-th value adds bits (j-1)k+1 .. jk.
   The short answer must compute the whole parity at once, which a small model trained for minutes does not
   learn (it guesses). The first character decides the form: ">" with probability p_long, else a guess split
   between "0" and "1". Greedy decoding writes the chain when p_long > (1 - p_long) / 2, i.e. p_long > 1/3,
   the paper's threshold (Tsilivis et al.'s Theorem 1; the reconstruction in the anchors, section 4.4).
4. The reward: 1.0 when the reply's last bit is the parity, else 0.0 (the paper's end-to-end 0/1 answer
   reward; the chain's intermediate parities are not checked), with the reason of a failure.
5. The task plug: the names train.py and eval.py call (see "Adding a task" in the README).
"""
import hashlib
import json
import random
from dataclasses import dataclass
from itertools import product

# -----------------------------------------------------------------------------
# 1. Problems and the held-out split

N_BUCKETS = 1000
TEST_BUCKETS = 100  # buckets [0, 100) = 10% of all 2^d bit strings are held out; the training stream skips them
MAX_BITS = 64


@dataclass(frozen=True)
class Problem:
    bits: tuple  # tuple[int, ...] of 0/1, x_1 first

    def to_dict(self):
        return {"bits": list(self.bits)}

    @property
    def parity(self):
        return sum(self.bits) % 2


def problem_bucket(bits):
    """Stable bucket in [0, N_BUCKETS) of a bit string (SHA-256, not Python's salted hash())."""
    text = "".join(map(str, bits))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % N_BUCKETS


def is_held_out(bits):
    return problem_bucket(bits) < TEST_BUCKETS


def check_knobs(n_bits, leap):
    """ValueError naming the bad knob and what to do."""
    if not (isinstance(n_bits, int) and 2 <= n_bits <= MAX_BITS):
        raise ValueError(f"--n_bits={n_bits}: the parity task needs 2 <= n_bits <= {MAX_BITS}")
    if not (isinstance(leap, int) and 1 <= leap <= n_bits):
        raise ValueError(f"--leap={leap}: the chain writes every leap-th prefix parity; choose 1 <= leap <= "
                         f"n_bits ({n_bits})")


def problem_stream(seed, phase="rl", n_bits=16, leap=1):
    """Endless iterator of training problems (repeats possible), deterministic from seed: d bits drawn
    uniformly, kept only if the string is on the training side of the split. The phase ("warmup" or "rl")
    and leap do not change the problems here."""
    check_knobs(n_bits, leap)
    rng = random.Random(seed)
    while True:
        bits = tuple(rng.getrandbits(1) for _ in range(n_bits))
        if not is_held_out(bits):
            yield Problem(bits)


LIST_UP_TO_BITS = 16  # up to here test_set lists the held-out side (2^16 hashes: ~0.1 s); above, it samples


def test_set(n=500, seed=1234, n_bits=16, leap=1):
    """The fixed held-out set: n distinct bit strings from the held-out buckets (uniform over them), which
    problem_stream never produces; test_set(k) is the first k of test_set(n) for k < n. ValueError if the
    held-out side has fewer than n strings."""
    check_knobs(n_bits, leap)
    rng = random.Random(seed)
    if n_bits <= LIST_UP_TO_BITS:  # list the held-out side, then a seeded shuffle
        held_out = [b for b in product((0, 1), repeat=n_bits) if is_held_out(b)]
        if len(held_out) < n:
            raise ValueError(f"only {len(held_out)} of the 2^{n_bits} bit strings are held out, fewer than the "
                             f"{n} asked for: raise --n_bits or lower --eval_size")
        rng.shuffle(held_out)
        return [Problem(b) for b in held_out[:n]]
    if n > 2 ** n_bits * TEST_BUCKETS // N_BUCKETS // 2:  # far fewer than held out: rejection sampling ends
        raise ValueError(f"--eval_size={n} is more than half of the held-out 2^{n_bits} strings: lower it")
    seen, problems = set(), []
    while len(problems) < n:
        bits = tuple(rng.getrandbits(1) for _ in range(n_bits))
        if is_held_out(bits) and bits not in seen:
            seen.add(bits)
            problems.append(Problem(bits))
    return problems


def save_problems(path, problems):
    with open(path, "w") as f:
        f.writelines(json.dumps(p.to_dict()) + "\n" for p in problems)

# -----------------------------------------------------------------------------
# 2. The prompt


def render_prompt(problem, template, tokenizer=None):
    """"1011\\n": the bits, then a newline. Only the compact template (a byte model from scratch)."""
    if template != "compact":
        raise ValueError(f"the parity task has only the compact template (a model trained from scratch), got "
                         f"{template!r}")
    return "".join(map(str, problem.bits)) + "\n"


def prompt_setup(tokenizer, template, from_scratch):
    """-> (template, stop ids): compact, and the tokenizer's EOS ids."""
    if template not in ("auto", "compact") or not from_scratch:
        raise ValueError("the parity task runs on a model trained from scratch with the compact template: use "
                         "--init=scratch and --template=auto or compact")
    return "compact", list(dict.fromkeys(tokenizer.stop_ids))

# -----------------------------------------------------------------------------
# 3. Demonstrations


def prefix_parities(bits):
    """[x_1, x_1^x_2, ..., x_1^...^x_d]."""
    out, running = [], 0
    for bit in bits:
        running ^= bit
        out.append(running)
    return out


def short_demonstration(problem):
    """The parity alone: "1" for 1011."""
    return str(problem.parity)


LONG_MARK = ">"  # the first character of every long reply


def long_demonstration(problem, leap=1):
    """">" then every leap-th prefix parity, ending with the parity: ">1101" for 1011 (leap 1), ">11"
    (leap 2), ">1" (leap 4). d/leap values when leap divides d, else ceil(d/leap)."""
    parities = prefix_parities(problem.bits)
    d = len(parities)
    positions = list(range(leap - 1, d, leap))  # 0-based: the leap-th, 2*leap-th, ... prefix parity
    if positions[-1] != d - 1:
        positions.append(d - 1)  # the chain always ends with the parity itself
    return LONG_MARK + "".join(str(parities[i]) for i in positions)


def sample_demonstration(problem, p_long, rng, leap=1, **knobs):
    """A long demonstration with probability p_long, else a short one (the paper's D(p_cot)). rng: a
    random.Random. knobs: the task's other knobs (unused)."""
    if not 0.0 <= p_long <= 1.0:
        raise ValueError(f"p_long must be a probability in [0, 1], got {p_long}")
    return long_demonstration(problem, leap) if rng.random() < p_long else short_demonstration(problem)


def is_long_form(response):
    """A reply that starts with the mark ">": the chain (logged as long_frac and eval_long_frac)."""
    return response.strip().startswith(LONG_MARK)

# -----------------------------------------------------------------------------
# 4. The reward


STOP_TEXTS = ("<|endoftext|>", "<|im_end|>")  # train.py decodes the stop token with the reply


def strip_stop(response):
    for stop in STOP_TEXTS:
        if response.endswith(stop):
            return response[:-len(stop)]
    return response


def reward_details(response, bits):
    """(reward, reason) of one reply: an optional mark ">" then 1 to d characters 0/1; the last one is the
    answer. Reasons, first failure wins: "no_answer" (empty reply, or the mark alone), "invalid_format" (any
    other character, or more values than bits: no chain is longer than d), "wrong_parity", "correct". The
    chain's intermediate values are not checked (the paper's end-to-end reward). A trailing stop token's text
    is not part of the reply, nor is whitespace around it."""
    text = strip_stop(response).strip().removeprefix(LONG_MARK)
    if not text:
        return 0.0, "no_answer"
    if any(c not in "01" for c in text) or len(text) > len(bits):
        return 0.0, "invalid_format"
    if int(text[-1]) != sum(bits) % 2:
        return 0.0, "wrong_parity"
    return 1.0, "correct"


def reward(response, problem):
    """The entry point train.py and eval.py use: 1.0 when the last value is the parity, else 0.0, and why."""
    return reward_details(response, problem.bits)

# -----------------------------------------------------------------------------
# 5. The task plug (train.py and eval.py: --task=parity)

KNOBS = ("n_bits", "leap")  # train.Config fields passed as keywords to problem_stream, test_set, sample_demonstration
RUN_DEFAULTS = dict(  # the headline run on 2 CPU cores (README), under the command line; one thread: for a
    # 0.8M-parameter model more threads only add synchronisation, and they stall when the machine is busy
    threads=1, n_bits=16, p_long=0.1, dim=256, n_layers=1, warmup_steps=2000, warmup_batch_size=64, warmup_lr=5e-4,
    weight_decay=1.0, max_new_tokens=40, warmup_seq_len=80, rl_steps=100, prompts_per_step=16, group_size=8,
    # RL at a third of Countdown's lr, decayed: at 3e-4 and constant, GRPO broke the chain or the whole model on
    # some seeds (README)
    lr=1e-4, decay_lr=True, eval_size=500, eval_batch_size=500, eval_every=1, sample_every=10, micro_batch_size=64)
