"""The task plug: train.py and eval.py run any task module that provides the names below; --task=NAME imports
NAME.py from beside train.py (importlib). countdown.py (the default) and parity.py are the two tasks here.
No registry and no base class: a fork adds a task by writing one new file with these names.

    KNOBS                  the train.Config fields the task reads, e.g. ("n_bits", "leap"); train.py passes
                           them as keywords (**knobs) to the three functions marked (k)
    RUN_DEFAULTS           {field: value} of train.Config / grpo.GRPOConfig defaults for this task (model size,
                           steps, max_new_tokens, ...), applied under the command line; {} keeps the defaults
    problem_stream(seed, phase, **knobs)           (k) endless iterator of training problems, deterministic
                           from seed; phase is "warmup" (next-token prediction) or "rl"
    test_set(n, **knobs)   (k) the fixed held-out problems, which problem_stream never produces
    sample_demonstration(problem, p_long, rng, **knobs)  (k) a warm-up completion: long with probability p_long
    prompt_setup(tokenizer, template, from_scratch)  -> (template, stop ids); template may be "auto"
    render_prompt(problem, template, tokenizer)      -> the prompt text
    reward(response, problem)                        -> (reward, reason); accuracy counts reason "correct"
    is_long_form(response)                           -> True for the long (chain-of-thought) form
    problem.to_dict()      a JSON-able view of a problem (samples.jsonl, eval.py's generations.jsonl)

Bad knobs raise ValueError with one line saying what to do; train.py turns it into "error: ..." before any work.
"""
import importlib

NAMES = ("KNOBS", "RUN_DEFAULTS", "problem_stream", "test_set", "sample_demonstration", "prompt_setup",
         "render_prompt", "reward", "is_long_form")


def load(name):
    """The task module NAME.py, checked for the names above; ValueError (one line) if there is none or it lacks some."""
    if not name.isidentifier():
        raise ValueError(f"--task={name}: expected a module name like countdown or parity")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ValueError(f"--task={name}: there is no {name}.py; use countdown or parity, or write a task module "
                         f"(README: Adding a task)") from None
    missing = [n for n in NAMES if not hasattr(module, n)]
    if missing:
        raise ValueError(f"--task={name}: {name}.py is not a task module, it lacks {', '.join(missing)} (README: "
                         f"Adding a task)")
    return module


def knobs(module, values):
    """{knob: value} for the task's KNOBS from a config (a dataclass or a dict such as run_config.json's)."""
    get = values.get if isinstance(values, dict) else lambda k, default=None: getattr(values, k, default)
    out = {k: get(k) for k in module.KNOBS if get(k) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}
