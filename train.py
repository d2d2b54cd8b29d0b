"""
train.py: the whole run in one file. Next-token-prediction warm-up, then GRPO on Countdown, then the final model.

    python train.py                                   # CPU default, ~15 minutes on 2 cores, no download
    python train.py --rl_steps=20 --eval_size=50      # any field of Config or grpo.GRPOConfig as --key=value
    python train.py --help                            # every field, its default and what it does
    python train.py --resume                          # continue a killed run exactly where its checkpoint left it
    python train.py --init=qwen --model_dir=PATH      # TinyZero setting: a Qwen2/Qwen2.5 checkpoint, one GPU

What the default run does (after Tsilivis et al., "How Reinforcement Learning After Next-Token Prediction
Facilitates Learning", arXiv 2510.11495, on Countdown instead of parity):
  1. warm-up: a small transformer (model.PRESETS["small"] narrowed to dim 128: ~0.75M parameters, byte
     tokenizer) is trained from scratch with next-token prediction on demonstrations of 3-number problems
     (numbers 1-12, targets 1-100): mostly SHORT ones (the answer alone) and a fraction p_long = 0.4 of LONG
     ones (a written-out search, countdown.long_demonstration). The loss covers completion tokens only.
     Short and long replies part at their opening tag ("<answer>" vs "<think>"), and p_long < 1/2, so
     greedy decoding picks the short form, which the model can only guess. (The parity paper's threshold is
     1/3 because there a guessed short answer splits its mass between two tokens; ours parts at one token.)
  2. GRPO on fresh problems (grpo.rollout + grpo.grpo_step) with the 0/0.1/1 Countdown reward. Long answers
     win more often, RL up-weights them, the sampled long fraction climbs, greedy decoding switches to the
     long form and responses lengthen.
  Measured (`python train.py`, 2-core CPU, 14 min 53 s; reference/metrics.jsonl): held-out greedy accuracy
  26.0% after warm-up (short answers, 26 tokens); RL switches greedy decoding to the long form within 10 steps
  (length 26 -> ~207 tokens) and accuracy reaches 81.0% (steps 10 and 20), ending at 78.5% (+52.5 points).
  Other seeds and the variants that led here: README.

--init=qwen starts from a pretrained checkpoint instead (no warm-up): TinyZero / nano-aha-moment's recipe
(lr 1e-6, 8 samples per prompt, k3 KL 0.001, 1024 new tokens, 3-4 numbers in 1-99). On CUDA the weights are
float32 masters with bf16 autocast (a 1e-6 update vanishes in bf16 weights), activation checkpointing on,
and a memory estimate with the largest micro-batch that fits is printed before the first step.

Run directory (out_dir): metrics.jsonl (one JSON object per step; "phase" is warmup, rl or eval), warmup/ and
final/ (Hugging Face layout + tokenizer + run_config.json), ckpt/ (the same plus state.pt: optimizer, RNG,
step; replaced atomically). Ctrl-C finishes the current step, saves ckpt/ and exits; --resume continues it.
Every step's problems and sampling seed are a function of (seed, step), so resuming replays the same data.
"""
import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import countdown
import grpo
from model import PRESETS, Transformer, generate, load_qwen, save_hf
from rewards import countdown_reward
from tokenizer import byte_tokenizer, load_tokenizer

# -----------------------------------------------------------------------------
# Config: run defaults here, the algorithm's knobs in grpo.GRPOConfig; both take --key=value overrides


@dataclass
class Config:
    # run
    out_dir: str = "out"            # run directory: metrics.jsonl, warmup/, final/, ckpt/
    seed: int = 1337                # seeds python/numpy/torch and every step's problems and samples
    device: str = "auto"            # auto = cuda, then mps, then cpu
    precision: str = "auto"         # auto = bf16-mixed on cuda (fp32 weights, bf16 autocast), else fp32; or bf16
    threads: int = 0                # torch CPU threads; 0 = all cores
    resume: bool = False            # continue from out_dir/ckpt (same config, same data, same RNG)
    progress: bool = True           # show a tqdm bar (the per-step log line is printed either way)
    # model
    init: str = "scratch"           # scratch = a fresh PRESETS[preset] with the byte tokenizer; qwen = model_dir
    preset: str = "small"           # model.PRESETS key for --init=scratch
    dim: int = 128                  # override the preset's width (0 = keep); heads = dim // 64. 128: ~0.75M params,
                                    # fast enough on 2 CPU cores to learn the long form in minutes (256 is ~3x slower)
    n_layers: int = 4               # override the preset's depth (0 = keep)
    model_dir: str = ""             # Hugging Face Qwen2/Qwen2.5 directory for --init=qwen
    template: str = "auto"          # prompt: auto (compact for scratch, chat/base from the tokenizer) | compact | base | chat
    gradient_checkpointing: bool = False  # recompute each block in backward (memory for compute)
    # task (countdown.train_stream / test_set difficulty knobs)
    n_nums: tuple = (3, 3)          # how many numbers per problem, (min, max)
    num_range: tuple = (1, 12)      # the numbers, inclusive (1-12: mostly one-digit arithmetic, 224 held-out problems)
    target_range: tuple = (1, 100)  # the target, inclusive
    eval_size: int = 200            # held-out problems for greedy evaluation
    eval_batch_size: int = 200      # prompts per generate() call during evaluation
    # warm-up: next-token prediction on demonstrations (scratch only; 0 steps skips it)
    warmup_steps: int = 5000        # optimizer steps (~0.15 s each on 2 cores)
    warmup_batch_size: int = 16     # demonstrations per step, one per row
    warmup_seq_len: int = 480       # longest prompt + demonstration kept (a longer one is skipped; 480 keeps 99.8%)
    warmup_lr: float = 3e-3         # peak AdamW lr, linear warm-up over 20 steps then cosine to 10%
    p_long: float = 0.4             # fraction of long (chain-of-thought) demonstrations; < 1/2: greedy answers short
    # RL
    rl_steps: int = 30              # GRPO steps (greedy switches to the long form after ~10-20 of them)
    prompts_per_step: int = 16      # distinct problems per step (times group_size completions)
    lr: float = 3e-4                # AdamW lr for RL (constant after lr_warmup_steps); 6e-4 is unstable, 1e-3 babbles
    lr_warmup_steps: int = 3        # linear lr warm-up at the start of RL (Adam's first steps are full-size)
    weight_decay: float = 0.0       # AdamW weight decay (both phases)
    eval_every: int = 10            # held-out greedy eval every N RL steps (and at the first and last)
    sample_every: int = 10          # print a few decoded completions every N RL steps
    save_every: int = 20            # write ckpt/ every N steps of either phase (and at the end of each phase)
    max_bad_steps: int = 5          # stop after this many non-finite losses in a row
    gpu_memory_gb: float = 80.0     # GPU size the memory estimate plans for when no GPU is visible


# Defaults for --init=qwen, applied before the command line (which always wins). TinyZero and nano-aha-moment:
# lr 1e-6, k3 KL 0.001, 1024 new tokens, temperature 1, grad clip 1, no weight decay (nano-aha); 8 samples per
# prompt (GRPO-Zero / TRL), 16 prompts per step (nano-aha's batch, doubled group); 3-4 numbers in 1-99.
QWEN_DEFAULTS = dict(template="auto", gradient_checkpointing=True, n_nums=(3, 4), num_range=(1, 99),
                     target_range=(1, 100), eval_size=500, eval_batch_size=128, warmup_steps=0, rl_steps=400,
                     prompts_per_step=16, lr=1e-6, eval_every=25, sample_every=5, save_every=25,
                     group_size=8, max_new_tokens=1024, beta=0.001, micro_batch_size=8)
# The one place the from-scratch run scales up on a GPU: a wider, deeper model, more and bigger steps.
# (Not yet run on a GPU; lower warmup_lr first if the warm-up loss spikes.)
CUDA_SCRATCH_DEFAULTS = dict(dim=384, n_layers=6, warmup_steps=4000, warmup_batch_size=64, warmup_lr=1e-3,
                             rl_steps=100, prompts_per_step=64, eval_batch_size=200, micro_batch_size=128)


def field_comments(cls):
    """{field: its trailing '# comment'} read from the class source, so --help needs no second copy of the docs."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s*(\w+)\s*:[^=#]*=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def show(value):
    """A value the way it is typed on the command line: 3,4 for a tuple, plain text otherwise."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_value(key, text, default):
    """Parse text into the type of default; ValueError naming the key and the expected type."""
    try:
        if isinstance(default, bool):  # before int: bool is an int subclass
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, tuple):  # "3,4" -> (3, 4); a single value fills a pair: "3" -> (3, 3)
            items = tuple(type(default[0])(x) for x in text.split(","))
            return items * 2 if len(items) == 1 and len(default) == 2 else items
        return type(default)(text)
    except ValueError:
        kind = f"a comma-separated list like {show(default)}" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"--{key}={text}: expected {kind} (the default is {default!r})") from None


def parse_args(argv):
    """--key=value pairs -> {key: typed value}; --help prints every field and exits; --resume = --resume=true."""
    defaults = {**dataclasses.asdict(Config()), **dataclasses.asdict(grpo.GRPOConfig())}
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip().split("\n\n")[0] + "\n\nOptions (--key=value):")
        for cls in (Config, grpo.GRPOConfig):
            comments = field_comments(cls)
            for f in dataclasses.fields(cls):
                print(f"  {'--' + f.name + '=' + show(f.default):<32} {comments.get(f.name, '')}")
        raise SystemExit(0)
    overrides = {}
    for arg in argv:
        key, _, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or (not _ and key != "resume"):
            raise ValueError(f"expected --key=value, got {arg!r} (see --help)")
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=3)
            raise ValueError(f"unknown option --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                          if close else "; see --help for the list"))
        overrides[key] = True if key == "resume" and not _ else parse_value(key, text, defaults[key])
    return overrides


def resolve_config(overrides, device, saved=None):
    """Defaults -> path defaults (qwen, or scratch on CUDA) -> overrides. A resumed run starts from its saved
    config instead. Returns (Config, GRPOConfig)."""
    values = {**dataclasses.asdict(Config()), **dataclasses.asdict(grpo.GRPOConfig())}
    if saved is not None:
        values.update({k: tuple(v) if isinstance(values.get(k), tuple) else v for k, v in saved.items()})
    elif overrides.get("init", "scratch") == "qwen":
        values.update(QWEN_DEFAULTS)
    elif device == "cuda":
        values.update(CUDA_SCRATCH_DEFAULTS)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in values.items() if k in names})
    gcfg = grpo.GRPOConfig(**{k: v for k, v in values.items() if k not in names})
    if cfg.init not in ("scratch", "qwen"):
        raise ValueError(f"--init={cfg.init}: choose scratch or qwen")
    if cfg.init == "qwen" and not os.path.isdir(cfg.model_dir):
        raise FileNotFoundError(f"--init=qwen needs --model_dir=PATH, a Hugging Face Qwen2 directory; got "
                                f"{cfg.model_dir!r}")
    if cfg.template not in ("auto", "compact", "base", "chat"):
        raise ValueError(f"--template={cfg.template}: choose auto, compact, base or chat")
    if cfg.precision not in ("auto", "fp32", "bf16-mixed", "bf16"):
        raise ValueError(f"--precision={cfg.precision}: choose auto, fp32, bf16-mixed or bf16")
    return cfg, gcfg


# -----------------------------------------------------------------------------
# Helpers: device, seeds, prompts, evaluation, memory estimate, checkpoints


def pick_device(name):
    """auto -> cuda if present, else Apple's mps, else cpu; an explicit name is used as given."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def step_seed(seed, phase, step):
    """A seed for one step, a pure function of (seed, phase, step): resume replays the same data and samples."""
    return random.Random(f"{seed}/{phase}/{step}").randrange(2**63)


def evaluate(model, tok, problems, template, gcfg, stop_ids, batch_size):
    """Greedy decoding on held-out problems -> accuracy (reward 1), mean response length, decoded texts."""
    prompts = [tok.encode(countdown.render_prompt(p, template, tok)) for p in problems]
    completions = []
    for i in range(0, len(prompts), batch_size):
        completions += generate(model, prompts[i:i + batch_size], gcfg.max_new_tokens, temperature=0.0,
                                stop_ids=stop_ids, vocab_limit=tok.n_vocab)
    texts = [tok.decode(c) for c in completions]
    correct = [countdown_reward(t, p.nums, p.target) == 1.0 for t, p in zip(texts, problems)]
    return sum(correct) / len(correct), sum(map(len, completions)) / len(completions), texts


def count_params(mc):
    """Parameters of a model config, from its shapes (no model needed)."""
    kv = mc.n_kv_heads * mc.head_dim
    per_layer = mc.dim * (mc.dim + 2 * kv) + (mc.dim + 2 * kv) + mc.dim * mc.dim + 3 * mc.dim * mc.ffn_dim + 2 * mc.dim
    embeddings = mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2)
    return embeddings + mc.n_layers * per_layer + mc.dim


def estimate_memory(mc, weight_bytes, rollout_rows, prompt_len, gcfg, micro_batch):
    """GPU bytes per term for one RL step (an estimate: allocator slack and kernel workspaces come on top)."""
    P, T, L = count_params(mc), prompt_len + gcfg.max_new_tokens, mc.n_layers
    return {
        "weights": P * weight_bytes,                        # one copy of every parameter
        "gradients": P * weight_bytes,                      # one gradient per parameter, same dtype
        "optimizer": 2 * P * weight_bytes,                  # AdamW's exp_avg and exp_avg_sq
        "reference": P * 2 if gcfg.beta > 0 else 0,         # frozen bf16 copy of the start for the KL term
        # K and V for every layer, kv head and position of every rollout row, in the weights' dtype
        "kv_cache": 2 * L * mc.n_kv_heads * mc.head_dim * T * rollout_rows * weight_bytes,
        # with checkpointing: each block's input (B*T*C, fp32 residual) + one block recomputed (~ 6C + 4F per token,
        # bf16) + a [chunk, V] float32 log-softmax and its gradient
        "activations": micro_batch * T * (L * mc.dim * 4 + (6 * mc.dim + 4 * mc.ffn_dim) * 2 * 2)
                       + 3 * gcfg.logprob_chunk * mc.vocab_size * 4,
    }


def print_memory_estimate(mc, weight_bytes, rollout_rows, prompt_len, gcfg, budget_bytes):
    """Print the terms, the two peaks (rollout: no gradients, all KV caches; update: gradients and one
    micro-batch of activations) and the largest power-of-two micro_batch_size whose update peak fits in 90%."""
    def peaks(micro_batch):
        t = estimate_memory(mc, weight_bytes, rollout_rows, prompt_len, gcfg, micro_batch)
        static = t["weights"] + t["optimizer"] + t["reference"]
        return t, static + t["kv_cache"], static + t["gradients"] + t["activations"]
    terms, rollout_peak, update_peak = peaks(gcfg.micro_batch_size)
    print(f"memory estimate ({count_params(mc) / 1e9:.2f}B params, {weight_bytes}-byte weights, "
          f"{rollout_rows} rollout rows of <= {prompt_len + gcfg.max_new_tokens} tokens, "
          f"budget {budget_bytes / 2**30:.0f} GiB):")
    for name, value in terms.items():
        print(f"  {name:<12}{value / 2**30:8.2f} GiB")
    print(f"  peak during rollouts {rollout_peak / 2**30:.1f} GiB, during the update {update_peak / 2**30:.1f} GiB "
          f"(micro_batch_size={gcfg.micro_batch_size})")
    fits = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if peaks(b)[2] < 0.9 * budget_bytes]
    print(f"  largest micro_batch_size that fits: {fits[-1] if fits else 'none'}"
          + ("" if rollout_peak < 0.9 * budget_bytes else "; rollouts do NOT fit: fewer prompts_per_step"))


def write_run_config(directory, cfg, gcfg):
    with open(os.path.join(directory, "run_config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), **dataclasses.asdict(gcfg)}, f, indent=2)


def save_checkpoint(path, model, tok, cfg, gcfg, state=None):
    """Model (HF layout) + tokenizer + run_config.json (+ state.pt), written into path.tmp and swapped in, so
    a kill at any moment leaves either the old or the new directory complete (never a half-written one)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp)
    tok.save(tmp)
    write_run_config(tmp, cfg, gcfg)
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)  # two renames: between them only path.old exists, which load_checkpoint accepts
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(out_dir):
    """out_dir/ckpt, or ckpt.old if a save was killed between its two renames."""
    for name in ("ckpt", "ckpt.old"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, "state.pt")):
            return path
    raise FileNotFoundError(f"--resume: no checkpoint in {out_dir}/ckpt (run without --resume to start fresh)")


def rng_state():
    # every generator a step could touch; restoring them makes a resumed run bit-identical on CPU
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_metrics(path, phase, step):
    """Drop rows at or after (phase, step) so a resumed run appends without duplicates or holes."""
    order = {"warmup": 0, "rl": 1, "eval": 1}
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if (order[r["phase"]], r["step"]) < (order[phase], step)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def warmup_batch(cfg, step, tok, template):
    """Demonstrations for one warm-up step -> list of micro-batches (inputs [b, T], targets [b, T], loss mask
    [b, T] True on completion tokens). One demonstration per row, right-padded: rows never share attention,
    which a model this small needs (packed rows slowed learning to copy the prompt's numbers ~3x in our runs).
    Rows are sorted by length and cut where the length jumps by 1.5x, so short rows don't pay for long padding."""
    rng = random.Random(step_seed(cfg.seed, "warmup", step))
    stream = countdown.train_stream(rng.randrange(2**32), cfg.n_nums, cfg.num_range, cfg.target_range,
                                    integer_steps=True)  # every problem then has a long demonstration
    examples = []
    while len(examples) < cfg.warmup_batch_size:
        problem = next(stream)
        prompt = tok.encode(countdown.render_prompt(problem, template, tok))
        completion = tok.encode(countdown.sample_demonstration(problem, cfg.p_long, rng)) + [tok.eos_id]
        if len(prompt) + len(completion) <= cfg.warmup_seq_len + 1:  # longer ones are skipped
            examples.append((prompt, completion))
    examples.sort(key=lambda e: len(e[0]) + len(e[1]))
    groups = [[examples[0]]]
    for e in examples[1:]:
        if len(e[0]) + len(e[1]) > 1.5 * sum(map(len, groups[-1][0])):
            groups.append([])
        groups[-1].append(e)
    micro_batches = []
    for group in groups:
        T = max(len(p) + len(c) for p, c in group)
        tokens = torch.full((len(group), T), tok.pad_id, dtype=torch.long)    # [b, T]
        mask = torch.zeros(len(group), T, dtype=torch.bool)                   # [b, T] True = completion token
        for i, (p, c) in enumerate(group):
            tokens[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p):len(p) + len(c)] = True
        micro_batches.append((tokens[:, :-1], tokens[:, 1:], mask[:, 1:]))  # position t predicts token t+1
    return micro_batches


def lr_at(step, total, peak, warmup):
    """Linear warm-up to peak, then cosine decay to 10% of peak at the last step (warmup=0, total=0: constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= 0:
        return peak
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -----------------------------------------------------------------------------
# The run


def main(argv=None):
    """Ctrl-C sets a flag; the loop saves after the current step and exits. A second Ctrl-C stops at once."""
    stop_requested = []

    def on_sigint(signum, frame):
        stop_requested.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: saving a checkpoint after this step (press again to quit without saving)")
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        run(sys.argv[1:] if argv is None else argv, stop_requested)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(argv, stop_requested):
    try:  # bad input: one clear line instead of a traceback
        overrides = parse_args(argv)
        device = pick_device(overrides.get("device", "auto"))
        resume_from = checkpoint_dir(overrides.get("out_dir", "out")) if overrides.get("resume") else None
        saved = json.load(open(os.path.join(resume_from, "run_config.json"))) if resume_from else None
        cfg, gcfg = resolve_config(overrides, device, saved)
        device = pick_device(cfg.device)  # a resumed run keeps the device it was saved with
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None

    # ---- setup: line-buffered output (log lines appear as they happen, also when piped), threads, seeds, precision
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else cfg.threads or os.cpu_count())
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if device == "cuda" else "fp32")
    cfg = dataclasses.replace(cfg, device=device, precision=precision)
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if precision == "bf16" and cfg.lr < 1e-4:
        print(f"WARNING: pure bf16 weights lose updates of lr={cfg.lr} (bf16 keeps ~3 digits); use bf16-mixed")
    # bf16 autocast keeps float32 master weights and optimizer state but runs matmuls in bf16
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    # ---- model and tokenizer
    if cfg.init == "qwen":
        tok = load_tokenizer(cfg.model_dir)
        model = load_qwen(resume_from or cfg.model_dir, device=device, dtype=weight_dtype)
    else:
        tok = byte_tokenizer()
        mc = PRESETS[cfg.preset]
        if cfg.dim or cfg.n_layers:  # heads of width 64, two query heads per kv head (the preset's ratio)
            dim = cfg.dim or mc.dim
            mc = dataclasses.replace(mc, dim=dim, n_layers=cfg.n_layers or mc.n_layers, n_heads=max(1, dim // 64),
                                     n_kv_heads=max(1, dim // 128), ffn_dim=dim * 8 // 3 // 16 * 16)
        model = load_qwen(resume_from, device=device, dtype=weight_dtype) if resume_from else \
            Transformer(mc).to(device=device, dtype=weight_dtype)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    template = cfg.template if cfg.template != "auto" else \
        "compact" if cfg.init == "scratch" else "chat" if tok.is_instruct else "base"
    cfg = dataclasses.replace(cfg, template=template)  # saved resolved: eval.py reads the template from run_config
    print("config:", json.dumps({**dataclasses.asdict(cfg), **dataclasses.asdict(gcfg)}))
    stop_ids = list(dict.fromkeys([*tok.stop_ids, *([tok.special_tokens["<|im_end|>"]] if template == "chat" else [])]))
    mc = model.config
    print(f"model: {count_params(mc) / 1e6:.2f}M parameters, {mc.n_layers} layers, dim {mc.dim}, on {device} "
          f"({precision}); tokenizer n_vocab {tok.n_vocab}; template {template}; stop ids {stop_ids}")

    # ---- task: the held-out set is fixed; training problems come from countdown.train_stream per step
    test_problems = countdown.test_set(cfg.eval_size, n_nums=cfg.n_nums, num_range=cfg.num_range,
                                       target_range=cfg.target_range)
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    # ---- resume: optimizer, RNG and position come from state.pt; metrics.jsonl is cut back to match
    state = torch.load(os.path.join(resume_from, "state.pt"), weights_only=False) if resume_from else None
    phase, start = (state["phase"], state["step"]) if state else ("warmup", 0)
    if state:
        truncate_metrics(metrics_path, phase, start)
        print(f"resuming from {resume_from}: phase {phase}, step {start}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    def log(row):  # one JSON object per line, appended and closed at once so a kill loses nothing
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save_state(phase, step, optimizer):
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt"), model, tok, cfg, gcfg,
                        {"phase": phase, "step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                         "data_position": {"phase": phase, "step": step}, "config": dataclasses.asdict(cfg)})

    def adamw(lr, beta2):  # fused kernels on CUDA; decoupled weight decay (Loshchilov & Hutter 2019)
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=cfg.weight_decay,
                                 fused=device == "cuda")
    t_start = time.time()

    # ==== Phase 1: next-token-prediction warm-up on the demonstration mix (scratch only) ====
    if phase == "warmup" and cfg.warmup_steps > 0 and cfg.init == "scratch":
        optimizer = adamw(cfg.warmup_lr, 0.95)  # nanoGPT's beta2 for pre-training
        if state:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        print(f"warm-up: {cfg.warmup_steps} steps x {cfg.warmup_batch_size} demonstrations (one per row, length-"
              f"bucketed micro-batches), p_long {cfg.p_long}, lr {cfg.warmup_lr}")
        bar = tqdm(range(start, cfg.warmup_steps), initial=start, total=cfg.warmup_steps, desc="warm-up",
                   disable=not cfg.progress, file=sys.stdout, dynamic_ncols=True)
        bad_steps, t_phase = 0, time.time()
        for step in bar:
            t0 = time.time()
            micro_batches = warmup_batch(cfg, step, tok, template)
            lr = lr_at(step, cfg.warmup_steps, cfg.warmup_lr, warmup=20)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # cross-entropy on completion tokens only (the prompt is given, not learned), averaged over all of the
            # step's completion tokens: each micro-batch adds its sum / that count, then one optimizer step
            num_tokens = sum(int(m.sum()) for _, _, m in micro_batches)
            loss = torch.zeros((), device=device)
            for inputs, targets, mask in micro_batches:
                inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
                with autocast:
                    logits = model(inputs)                                                  # [b, T, V]
                losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
                micro_loss = (losses * mask.flatten()).sum() / num_tokens
                micro_loss.backward()
                loss += micro_loss.detach()
            if not torch.isfinite(loss):
                bad_steps += 1
                print(f"warm-up step {step}: non-finite loss, step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(f"{bad_steps} non-finite losses in a row; lower --warmup_lr")
                optimizer.zero_grad(set_to_none=True)
                continue
            bad_steps = 0
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), gcfg.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # log
            dt = time.time() - t0
            tok_per_s = sum(x.numel() for x, _, _ in micro_batches) / dt
            eta = (time.time() - t_phase) / (step + 1 - start) * (cfg.warmup_steps - step - 1)
            log({"phase": "warmup", "step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
                 "tokens_per_s": tok_per_s, "time": time.time() - t_start})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % 20 == 0 or step == cfg.warmup_steps - 1:
                tqdm.write(f"warmup {step + 1}/{cfg.warmup_steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                           f"tok/s {tok_per_s:.0f} | {format_time(time.time() - t_start)} | eta {format_time(eta)}")
            # save
            if stop_requested or (step + 1) % cfg.save_every == 0:
                save_state("warmup", step + 1, optimizer)
            if stop_requested:
                print(f"saved {cfg.out_dir}/ckpt at warm-up step {step + 1}; resume with --resume")
                return
        bar.close()
    if phase == "warmup":  # the RL starting point, kept as out/warmup (for scratch: even with 0 warm-up steps)
        if cfg.init == "scratch":
            save_checkpoint(os.path.join(cfg.out_dir, "warmup"), model, tok, cfg, gcfg)
        phase, start, state = "rl", 0, None
        save_state("rl", 0, adamw(cfg.lr, 0.999))  # a resumed run starts RL here, with a fresh optimizer
    # a frozen copy of the RL starting point for the KL term (bf16 on CUDA: it is only ever read)
    ref_model = None
    if gcfg.beta > 0:
        ref_source = cfg.model_dir if cfg.init == "qwen" else os.path.join(cfg.out_dir, "warmup")
        ref_model = load_qwen(ref_source, device, torch.bfloat16 if device == "cuda" else weight_dtype)
        ref_model.eval().requires_grad_(False)

    # ==== Phase 2: GRPO ====
    optimizer = adamw(cfg.lr, 0.999)  # nano-aha-moment / TRL's AdamW betas for RL
    if state:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    rows = cfg.prompts_per_step * gcfg.group_size
    # derived quantities, once
    print(f"RL: {cfg.rl_steps} steps x {cfg.prompts_per_step} prompts x {gcfg.group_size} samples = {rows} rollouts "
          f"per step in {math.ceil(rows / gcfg.micro_batch_size)} micro-batches of {gcfg.micro_batch_size}; "
          f"max_new_tokens {gcfg.max_new_tokens}; lr {cfg.lr}; eval on {len(test_problems)} held-out problems "
          f"every {cfg.eval_every} steps")
    if device == "cuda" or cfg.init == "qwen":
        budget = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else cfg.gpu_memory_gb * 2**30
        prompt_len = max(len(tok.encode(countdown.render_prompt(p, template, tok))) for p in test_problems[:50])
        print_memory_estimate(mc, 4 if weight_dtype == torch.float32 else 2, rows, prompt_len, gcfg, budget)
    bar = tqdm(range(start, cfg.rl_steps + 1), initial=start, total=cfg.rl_steps + 1, desc="GRPO",
               disable=not cfg.progress, file=sys.stdout, dynamic_ncols=True)
    bad_steps, t_phase = 0, time.time()
    for step in bar:
        last_step = step == cfg.rl_steps
        # ---- once in a while: greedy accuracy on the held-out set (at the start, every eval_every, at the end)
        if step % cfg.eval_every == 0 or last_step:
            with autocast:
                accuracy, length, texts = evaluate(model, tok, test_problems, template, gcfg, stop_ids,
                                                   cfg.eval_batch_size)
            think = sum("</think>" in t for t in texts) / len(texts)
            log({"phase": "eval", "step": step, "eval_accuracy": accuracy, "eval_response_length": length,
                 "eval_think_frac": think, "time": time.time() - t_start})
            tqdm.write(f"eval @ rl step {step} | held-out greedy accuracy {accuracy:.3f} | length {length:.1f} | "
                       f"long form {think:.2f}")
        if last_step:
            save_checkpoint(os.path.join(cfg.out_dir, "final"), model, tok, cfg, gcfg)
            save_state("rl", step, optimizer)
            break
        t0 = time.time()
        # ---- rollouts: fresh problems for this step, group_size samples each
        # problems and sampling noise both come from (seed, step): a resumed run regenerates exactly these
        seed = step_seed(cfg.seed, "rl", step)
        stream = countdown.train_stream(seed % 2**32, cfg.n_nums, cfg.num_range, cfg.target_range)
        problems = [next(stream) for _ in range(cfg.prompts_per_step)]
        prompts = [tok.encode(countdown.render_prompt(p, template, tok)) for p in problems]
        with autocast:
            completions = grpo.rollout(model, prompts, gcfg, stop_ids, vocab_limit=tok.n_vocab, seed=seed)
        # ---- rewards and advantages (advantages are computed inside grpo_step from these rewards)
        texts = [tok.decode(c) for c in completions]
        group_problems = [p for p in problems for _ in range(gcfg.group_size)]
        rewards = [countdown_reward(t, p.nums, p.target) for t, p in zip(texts, group_problems)]
        correct = [r == 1.0 for r in rewards]  # accuracy counts only fully correct answers, not format credit
        # ---- loss and optimizer step
        lr = lr_at(step, 0, cfg.lr, cfg.lr_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            m = grpo.grpo_step(model, optimizer, prompts, completions, rewards, gcfg, tok.pad_id, stop_ids,
                               ref_model=ref_model, correct=correct, vocab_limit=tok.n_vocab)
        # grpo_step never applies a non-finite update; several in a row mean the run has diverged
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            bad_steps += 1
            print(f"rl step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
            if bad_steps >= cfg.max_bad_steps:
                raise RuntimeError(f"{bad_steps} non-finite steps in a row: the run diverged; lower --lr or "
                                   f"resume from an earlier checkpoint")
        else:
            bad_steps = 0
        # ---- log
        dt = time.time() - t0
        tok_per_s = sum(map(len, completions)) / dt
        eta = (time.time() - t_phase) / (step + 1 - start) * (cfg.rl_steps - step - 1)
        # share of samples in the long form: the quantity RL should push up (the paper's length increase)
        long_frac = sum("</think>" in t for t in texts) / len(texts)
        log({"phase": "rl", "step": step, **m, "long_frac": long_frac, "lr": lr, "tokens_per_s": tok_per_s,
             "step_time": dt, "time": time.time() - t_start})
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m['accuracy']:.2f}",
                        len=f"{m['response_length']:.0f}")
        tqdm.write(f"rl {step + 1}/{cfg.rl_steps} | reward {m['reward_mean']:.3f} | acc {m['accuracy']:.3f} | "
                   f"loss {m['loss']:+.4f} | kl {m['kl']:.4f} | clip {m['clip_frac']:.3f} | "
                   f"len {m['response_length']:.1f} | tok/s {tok_per_s:.0f} | {format_time(time.time() - t_start)} "
                   f"| eta {format_time(eta)}")
        if step % cfg.sample_every == 0:
            for i in range(0, len(texts), max(1, len(texts) // 3))[:3]:
                tqdm.write(f"  sample (reward {rewards[i]:.1f}) {group_problems[i].to_dict()}: "
                           f"{texts[i][:300]!r}")
        # ---- save
        if stop_requested or (step + 1) % cfg.save_every == 0:
            save_state("rl", step + 1, optimizer)
        if stop_requested:
            print(f"saved {cfg.out_dir}/ckpt at RL step {step + 1}; resume with --resume")
            return
    bar.close()
    print(f"done in {format_time(time.time() - t_start)}; final model in {cfg.out_dir}/final")


if __name__ == "__main__":
    main()
