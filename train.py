"""
train.py: the whole run in one file. Next-token-prediction warm-up, then GRPO on a task, then the final model.

    python train.py                                   # the CPU default: minutes on 2 cores, no download
    python train.py --rl_steps=20 --eval_size=50      # any field of Config or grpo.GRPOConfig as --key=value
    python train.py --help                            # every field, its default and what it does
    python train.py --resume                          # continue a killed run exactly where its checkpoint left it
    python train.py --init=qwen --model_dir=PATH      # TinyZero setting: a Qwen2/Qwen2.5 checkpoint, one GPU
    python train.py --task=parity                     # the parity experiment of the same paper (parity.py)
    torchrun --nproc_per_node=N train.py [flags]      # data parallel on N GPUs (or CPU processes): distributed.py

The task is a module (--task=countdown, the default, or parity; tasks.py lists the names it provides).

What the default run does (after Tsilivis et al., "How Reinforcement Learning After Next-Token Prediction
Facilitates Learning", arXiv 2510.11495, on Countdown instead of parity):
  1. warm-up: a small byte-level transformer is trained from scratch with next-token prediction on
     demonstrations of 3-number problems: mostly SHORT ones (the answer alone) and a fraction p_long of LONG
     ones (a written-out search, countdown.long_demonstration). The loss covers completion tokens only.
     Short and long replies part at their opening tag ("<answer>" vs "<think>"), and p_long < 1/2, so
     greedy decoding picks the short form, which the model can only guess.
  2. GRPO on fresh problems with the 0/0.1/1 Countdown reward. Long answers win more often, RL up-weights
     them, the sampled long fraction climbs, greedy decoding switches to the long form and responses lengthen.
  What the reference run measured, and on which seeds: README.md and reference/metrics.jsonl.

Run directory (out_dir): metrics.jsonl (one JSON object per step; "phase" is warmup, rl or eval), warmup/ and
final/ (Hugging Face layout + tokenizer + run_config.json), ckpt/ (the same plus state.pt: optimizer, RNG,
step; replaced atomically). Ctrl-C or SIGTERM finishes the current step, saves ckpt/ and exits; --resume
continues it.
Every step's problems and sampling seed are a function of (seed, step), so resuming replays the same data.
"""
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
import grpo
import tasks
from checkpoint import (disk_needed, load_checkpoint_state, read_run_config, rng_state, save_checkpoint,
                        set_rng_state, truncate_log)
from cli import opt, parse, pick_device, run_script, show
from eval import greedy
from hf_io import load_qwen
from lora import add_lora, load_lora, lora_state_dict, without_adapters
from memory import count_params, print_run_plan
from model import PRESETS, ModelConfig, Transformer, generate
from offload import OffloadedAdamW
from rewards import is_correct
from tokenizer import byte_tokenizer, load_tokenizer

# -----------------------------------------------------------------------------
# Config: run defaults here, the algorithm's knobs in grpo.GRPOConfig; both take --key=value overrides


@dataclass
class Config:
    # run
    out_dir: str = opt("out", "run directory: metrics.jsonl, warmup/, final/, ckpt/")
    seed: int = opt(1337, "seeds python/numpy/torch and every step's problems and samples")
    device: str = opt("auto", "auto = cuda, then mps, then cpu")
    precision: str = opt("auto", "auto = bf16-mixed on cuda (fp32 master weights, bf16 autocast), else fp32; or bf16")
    threads: int = opt(0, "torch CPU threads; 0 = all cores")
    resume: bool = opt(False, "continue from out_dir/ckpt (same config, same data, same RNG)")
    dry_run: bool = opt(False, "print the GPU memory plan of this run (config.json alone for qwen) and exit")
    progress: bool = opt(True, "show a tqdm bar (the per-step log line is printed either way)")
    run_preset: str = opt("auto", "defaults under the command line (below): auto = qwen, gpu on CUDA, else cpu")
    # model
    init: str = opt("scratch", "scratch = a fresh PRESETS[preset] with the byte tokenizer; qwen = model_dir")
    preset: str = opt("small", "model.PRESETS key for --init=scratch")
    dim: int = opt(128, "override the preset's width (0 = keep); heads = dim // 64, kv heads = dim // 128")
    n_layers: int = opt(4, "override the preset's depth (0 = keep)")
    model_dir: str = opt("", "Hugging Face Qwen2/Qwen2.5 directory for --init=qwen")
    warmup_from: str = opt("", "scratch: skip the warm-up and start RL from this warm-up model of an earlier run "
                               "(its out_dir/warmup; same task and knobs)")
    template: str = opt("auto", "auto (compact for scratch, chat/base from the tokenizer) | compact | base | chat")
    gradient_checkpointing: bool = opt(False, "recompute each block in backward (memory for compute)")
    lora_rank: int = opt(0, "RL with LoRA adapters of this rank on every block's q/k/v/o/gate/up/down, all else "
                            "frozen (0 = full fine-tuning; a scratch warm-up stays full); saves merged weights")
    lora_alpha: float = opt(0.0, "LoRA's alpha: the adapters' output is scaled by alpha / rank; 0 = 2 * lora_rank")
    optimizer_offload: bool = opt(False, "AdamW's state and update on the CPU (offload.py): full fine-tuning on a "
                                         "smaller GPU, for host memory and a slower step")
    fsdp: bool = opt(False, "under torchrun: FSDP2, each rank holds 1/N of the weights, gradients and AdamW state "
                            "(distributed.py); full fine-tuning")
    compile: bool = opt(False, "the training forwards (warm-up, GRPO's log-probs) run each block under torch.compile "
                               "(model.compiled_block); ~40 s to compile first on CPU (README: when it pays)")
    decode: str = opt("eager", "the rollouts' decode loop (model.generate): eager | static | compiled (torch.compile, "
                               "CUDA graphs on CUDA; on CPU ~20 s to compile, then 1.1-1.4x faster: README); static "
                               "and compiled keep their KV cache between rollouts (in the memory plan)")
    # task: a module with the names tasks.py lists; its knobs (its KNOBS) are the fields below
    task: str = opt("countdown", "countdown | parity | a fork's task module NAME.py (its RUN_DEFAULTS apply)")
    n_nums: tuple = opt((3, 3), "countdown: how many numbers per problem, (min, max)")
    num_range: tuple = opt((1, 12), "countdown: the numbers, inclusive (1-12: mostly one-digit arithmetic)")
    target_range: tuple = opt((1, 100), "countdown: the target, inclusive")
    n_bits: int = opt(16, "parity: bits per problem, d")
    leap: int = opt(1, "parity: the long chain writes every leap-th prefix parity (1 = all d of them)")
    eval_size: int = opt(200, "held-out problems for greedy evaluation")
    eval_batch_size: int = opt(200, "prompts per generate() call during evaluation")
    # warm-up: next-token prediction on demonstrations (scratch only; 0 steps skips it)
    warmup_steps: int = opt(5000, "optimizer steps")
    warmup_batch_size: int = opt(16, "demonstrations per step, one per row")
    warmup_seq_len: int = opt(0, "longest prompt + demonstration kept; 0 = max_new_tokens (one budget)")
    warmup_lr: float = opt(3e-3, "peak AdamW lr, linear warm-up over 20 steps then cosine to 10%")
    p_long: float = opt(0.4, "fraction of long (chain-of-thought) demonstrations; < 1/2: greedy answers short")
    # RL
    rl_steps: int = opt(30, "GRPO steps")
    prompts_per_step: int = opt(16, "distinct problems per step (times group_size completions)")
    lr: float = opt(3e-4, "AdamW lr for RL (after lr_warmup_steps); 6e-4 is unstable, 1e-3 babbles")
    lr_warmup_steps: int = opt(3, "linear lr warm-up at the start of RL (Adam's first steps are full-size)")
    decay_lr: bool = opt(False, "after lr_warmup_steps, cosine-decay the RL lr to 10% at rl_steps (the warm-up's "
                                "schedule); off: constant")
    weight_decay: float = opt(0.0, "AdamW weight decay (both phases)")
    eval_every: int = opt(10, "held-out greedy eval every N RL steps (and at the first and last)")
    sample_every: int = opt(10, "print a few decoded completions every N RL steps")
    keep_samples: int = opt(8, "rollouts per RL step kept in out_dir/samples.jsonl for eval.py --analyze (0 = none)")
    keep_steps: tuple = opt((), "RL steps whose model is kept as out_dir/step_N, e.g. 0,30,100 (eval.py --compare)")
    save_every: int = opt(20, "write ckpt/ every N steps of either phase (and at the end of each phase)")
    max_bad_steps: int = opt(5, "stop after this many non-finite losses or gradients in a row (either phase)")
    check_disk: bool = opt(True, "before the first step, stop if out_dir lacks the space its checkpoints need")
    gpu_memory_gb: float = opt(0.0, "GPU size the memory plan is for; 0 = the visible GPU (80 when none is)")


# Run presets: defaults for a kind of run, applied before the command line (which always wins).
RUN_PRESETS = {
    "cpu": {},  # the Config defaults: a ~0.75M model learns the long form on 2 CPU cores in minutes
    # TinyZero and nano-aha-moment: lr 1e-6, k3 KL 0.001, 1024 new tokens, 8 samples per prompt (GRPO-Zero /
    # TRL), 16 prompts per step (nano-aha's batch, doubled group), 3-4 numbers in 1-99
    "qwen": dict(gradient_checkpointing=True, n_nums=(3, 4), num_range=(1, 99), target_range=(1, 100),
                 eval_size=500, eval_batch_size=128, warmup_steps=0, rl_steps=400, prompts_per_step=16, lr=1e-6,
                 eval_every=25, sample_every=5, save_every=25, group_size=8, max_new_tokens=1024, beta=0.001,
                 micro_batch_size=8),
    # the from-scratch run scaled up for one GPU (not yet run on a GPU; lower warmup_lr first if the loss spikes)
    "gpu": dict(dim=384, n_layers=6, warmup_steps=4000, warmup_batch_size=64, warmup_lr=1e-3, rl_steps=100,
                prompts_per_step=64, eval_batch_size=200, micro_batch_size=128)}


def resolve_config(overrides, device, saved=None):
    """Defaults -> run preset -> the task's RUN_DEFAULTS -> command line; a resumed run starts from its saved
    config instead. Returns (Config, GRPOConfig); ValueError or FileNotFoundError for bad values."""
    values = {**dataclasses.asdict(Config()), **dataclasses.asdict(grpo.GRPOConfig())}
    if saved is not None:
        values.update({k: tuple(v) if isinstance(values.get(k), tuple) else v for k, v in saved.items()})
    else:
        preset = overrides.get("run_preset", "auto")
        if preset == "auto":
            on_cuda = torch.device(device).type == "cuda"
            preset = "qwen" if overrides.get("init") == "qwen" else "gpu" if on_cuda else "cpu"
        if preset not in RUN_PRESETS:
            raise ValueError(f"--run_preset={preset}: choose auto, {', '.join(RUN_PRESETS)}")
        values.update(RUN_PRESETS[preset], run_preset=preset)
        values.update(tasks.load(overrides.get("task", "countdown")).RUN_DEFAULTS)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in values.items() if k in names})
    gcfg = grpo.GRPOConfig(**{k: v for k, v in values.items() if k not in names})
    for name, allowed in [("init", ("scratch", "qwen")), ("template", ("auto", "compact", "base", "chat")),
                          ("precision", ("auto", "fp32", "bf16-mixed", "bf16")), ("preset", tuple(PRESETS)),
                          ("decode", ("eager", "static", "compiled"))]:
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name}={getattr(cfg, name)}: choose {', '.join(allowed)}")
    if cfg.lora_rank < 0 or cfg.lora_alpha < 0:
        raise ValueError(f"--lora_rank={cfg.lora_rank} --lora_alpha={cfg.lora_alpha}: expected a rank >= 0 (0 = "
                         f"full fine-tuning) and an alpha >= 0 (0 = 2 * rank)")
    if not all(str(s).isdigit() for s in cfg.keep_steps):
        raise ValueError(f"--keep_steps={show(cfg.keep_steps)}: expected RL step numbers like 0,30,100")
    cfg.keep_steps = tuple(int(s) for s in cfg.keep_steps)
    if cfg.warmup_from:
        check_warmup_from(cfg)
    if cfg.init == "qwen" and not os.path.isdir(cfg.model_dir):
        raise FileNotFoundError(f"--init=qwen needs --model_dir=PATH, a Hugging Face Qwen2 directory; got "
                                f"{cfg.model_dir!r}")
    return cfg, gcfg


def check_warmup_from(cfg):
    """ValueError unless --warmup_from names a scratch warm-up model of the same task and knobs as this run."""
    saved = read_run_config(cfg.warmup_from)
    if cfg.init != "scratch" or not os.path.isfile(os.path.join(cfg.warmup_from, "config.json")) or not saved:
        raise ValueError(f"--warmup_from={cfg.warmup_from!r}: expected the warmup/ directory of an earlier "
                         f"train.py run (config.json and run_config.json), with --init=scratch")
    task = tasks.load(cfg.task)
    ours, theirs = tasks.knobs(task, cfg), tasks.knobs(task, saved)
    if saved.get("task", "countdown") != cfg.task or ours != theirs:
        raise ValueError(f"--warmup_from={cfg.warmup_from}: that model learned task {saved.get('task', 'countdown')}"
                         f" with {theirs}, this run asks for {cfg.task} with {ours}: pass the same knobs")


def parse_args(argv):
    notes = "Run presets (--run_preset):\n" + "\n".join(textwrap.fill(
        " ".join(f"--{k}={show(v)}" for k, v in preset.items()) or "(the defaults above)", 116,
        initial_indent=f"  {name:<6} ", subsequent_indent=" " * 9) for name, preset in RUN_PRESETS.items())
    return parse(argv, [Config, grpo.GRPOConfig], __doc__.strip().split("\n\n")[0], notes)

# -----------------------------------------------------------------------------
# Small pieces both phases use


def step_seed(seed, phase, step):
    """A seed for one step, a pure function of (seed, phase, step): resume replays the same data and samples."""
    return random.Random(f"{seed}/{phase}/{step}").randrange(2**63)


def lr_at(step, total, peak, warmup):
    """Linear warm-up to peak, then cosine decay to 10% of peak at the last step (warmup=0, total=0: constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= 0:
        return peak
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def spread(n, k):
    """k indices spread evenly over range(n) (fewer if n < k): the rollouts printed and kept each step."""
    return range(0, n, max(1, n // max(k, 1)))[:k]


def format_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))  # H:MM:SS


class Run:
    """What set-up builds and both phases share (model, tokenizer, prompt setup, held-out problems), and the
    scaffolding around every step of either phase: the tqdm bar and ETA, the bad-step guard, the metrics row
    and log line, and saving ckpt/ every save_every steps or when a signal asked to stop (main)."""

    def __init__(self, cfg, gcfg, device, model, tok, test_problems, stop_requested, world=distributed.SINGLE):
        self.cfg, self.gcfg, self.device, self.model, self.tok = cfg, gcfg, device, model, tok
        self.world = world  # torchrun's ranks (distributed.py); rank 0 alone prints, logs and saves
        self.on_cuda = torch.device(device).type == "cuda"  # also cuda:1
        self.task = tasks.load(cfg.task)  # the task module (countdown, parity, ...) and its knobs from cfg
        self.knobs = tasks.knobs(self.task, cfg)
        self.test_problems = test_problems  # the fixed held-out set; training problems come per step
        self.template, self.stop_ids = self.task.prompt_setup(tok, cfg.template, cfg.init == "scratch")
        # bf16 autocast keeps float32 master weights and optimizer state but runs matmuls in bf16
        self.autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                       enabled=cfg.precision == "bf16-mixed")
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(cfg.out_dir, "samples.jsonl")
        self.stop_requested, self.t_start = stop_requested, time.time()

    def steps(self, desc, start, total):
        """range(start, total) under a tqdm bar; also resets the bad-step counter and the phase clock."""
        self.bad_steps, self.t_phase, self.phase_start, self.total = 0, time.time(), start, total
        return tqdm(range(start, total), initial=start, total=total, desc=desc, file=sys.stdout, dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.world.main))

    def step_is_finite(self, finite, what):
        """Count non-finite steps in a row (their update is never applied); stop the run after max_bad_steps."""
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if not finite:
            print(f"{what}: non-finite loss or gradient, update skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise SystemExit(f"error: {self.bad_steps} non-finite steps in a row: the run diverged; lower the "
                                 f"learning rate, or resume from {self.cfg.out_dir}/ckpt with --resume")
        return finite

    def append(self, path, rows):
        """Append JSON rows to a log (opened and closed at once, so a kill loses at most a torn last line); rank 0
        only."""
        if not self.world.main:
            return
        try:
            with open(path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        except OSError as e:  # a full disk: the checkpoints already written stay valid
            raise SystemExit(f"error: could not append to {path} ({e.strerror or e}); the last checkpoint in "
                             f"{self.cfg.out_dir}/ckpt is intact: free some space, then --resume")

    def log(self, row, line=None):
        """One row of metrics.jsonl, and the log line with the elapsed time (and the phase's ETA)."""
        self.append(self.metrics_path, [{**row, "time": time.time() - self.t_start}])
        if line is not None:
            done = row["step"] + 1 - self.phase_start
            eta = (time.time() - self.t_phase) / max(done, 1) * (self.total - row["step"] - 1)
            tqdm.write(f"{line} | {format_time(time.time() - self.t_start)} | eta {format_time(max(eta, 0))}")

    def save(self, name, phase=None, step=None, optimizer=None):
        """out_dir/name in Hugging Face layout; with an optimizer also state.pt (what --resume needs). Rank 0
        writes it (every rank holds the same weights and optimizer state); the others wait until it is on disk."""
        model, adamw = self.model, None
        if self.world.fsdp:  # every rank sends its shards; rank 0 gets the whole model and AdamW state
            model, adamw = distributed.gathered(self.model, self.world, optimizer)
        if self.world.main:
            state = None if optimizer is None else {"phase": phase, "step": step, "rng": rng_state(),
                                                    "optimizer": adamw or optimizer.state_dict()}
            if state is not None and phase == "rl" and self.cfg.lora_rank:  # the weights saved are merged: keep
                state["lora"] = lora_state_dict(self.model)                  # the adapters apart for --resume
            save_checkpoint(os.path.join(self.cfg.out_dir, name), model, self.tok, self.cfg, self.gcfg, state)
        self.world.barrier()

    def save_or_stop(self, phase, step, optimizer):
        """After a step: save ckpt/ every save_every steps, or now and return True if a signal asked to stop. A
        signal to any rank stops every rank after the same step (one all-reduce of the flag)."""
        if self.world.sum([len(self.stop_requested)])[0] and not self.stop_requested:
            self.stop_requested.append(signal.SIGTERM)  # asked on another rank: exit as if told here
        if self.stop_requested or step % self.cfg.save_every == 0:
            self.save("ckpt", phase, step, optimizer)
        if self.stop_requested:
            print(f"saved {self.cfg.out_dir}/ckpt at {phase} step {step}; resume with --resume")
        return bool(self.stop_requested)

    def adamw(self, lr, beta2, state=None):
        """A phase's AdamW (decoupled weight decay, Loshchilov & Hutter 2019; fused kernels on CUDA) and the step
        it starts from: 0, or a resumed checkpoint's step, with its optimizer and RNG state restored."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # with LoRA: the adapters only
        if self.cfg.optimizer_offload:  # the same AdamW, on host copies of the weights
            optimizer = OffloadedAdamW(trainable, lr=lr, betas=(0.9, beta2), weight_decay=self.cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, beta2),
                                          weight_decay=self.cfg.weight_decay, fused=self.on_cuda)
        if state is None:
            return optimizer, 0
        if self.world.fsdp:
            distributed.load_optimizer_state(optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return optimizer, state["step"]

# -----------------------------------------------------------------------------
# Set-up: configuration, seeds, precision, model and tokenizer


def scratch_config(cfg):
    """PRESETS[cfg.preset], resized by --dim / --n_layers: heads of width 64, two query heads per kv head."""
    mc = PRESETS[cfg.preset]
    if cfg.dim or cfg.n_layers:
        dim = cfg.dim or mc.dim
        mc = dataclasses.replace(mc, dim=dim, n_layers=cfg.n_layers or mc.n_layers, n_heads=max(1, dim // 64),
                                 n_kv_heads=max(1, dim // 128), ffn_dim=dim * 8 // 3 // 16 * 16)
    return mc


def build_model(cfg, resume_from, device, precision, state=None):
    """The checkpoint to resume, the Qwen directory, or a fresh scratch_config(cfg). A LoRA run resumed in RL
    starts from its frozen base instead (the RL starting point: model_dir, or out_dir/warmup from scratch), since
    its checkpoints hold merged weights; train_rl puts the saved adapters back on it."""
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if precision == "bf16" and cfg.lr < 1e-4 and not cfg.lora_rank:
        print(f"WARNING: pure bf16 weights lose updates of lr={cfg.lr} (bf16 keeps ~3 digits); use bf16-mixed")
    if resume_from and cfg.lora_rank and state["phase"] == "rl":
        resume_from = cfg.model_dir if cfg.init == "qwen" else os.path.join(cfg.out_dir, "warmup")
    if cfg.init == "qwen" or resume_from or cfg.warmup_from:
        return load_qwen(resume_from or cfg.warmup_from or cfg.model_dir, device=device, dtype=weight_dtype)
    return Transformer(scratch_config(cfg)).to(device=device, dtype=weight_dtype)


def dry_run(cfg, gcfg):
    """--dry_run: the memory plan from config.json alone (no weights read; the tokenizer when it is there)."""
    if cfg.init == "qwen":
        with open(os.path.join(cfg.model_dir, "config.json")) as f:
            mc = ModelConfig.from_hf(json.load(f))
        try:
            tok = load_tokenizer(cfg.model_dir)
        except FileNotFoundError:
            tok = None
    else:
        mc, tok = scratch_config(cfg), byte_tokenizer()
    task = tasks.load(cfg.task)
    problems = task.test_set(min(cfg.eval_size, 50), **tasks.knobs(task, cfg))
    if tok is None:
        prompt_len = 256
        print("no tokenizer beside config.json: planning for prompts of 256 tokens")
    else:
        template, _ = task.prompt_setup(tok, cfg.template, cfg.init == "scratch")
        prompt_len = max(len(tok.encode(task.render_prompt(p, template, tok))) for p in problems)
    precision = cfg.precision if cfg.precision != "auto" else "bf16-mixed"  # the plan is for a GPU
    print_run_plan(cfg, gcfg, mc, prompt_len, precision, tok.n_vocab if tok else None, distributed.from_env().size)


def check_world_size(cfg, size, state=None):
    """ValueError unless the ranks can split every step evenly: whole groups of problems, whole demonstrations."""
    warms_up = cfg.init == "scratch" and cfg.warmup_steps > 0 and not cfg.warmup_from and \
        not (state and state["phase"] == "rl")
    for name in ("prompts_per_step",) + (("warmup_batch_size",) if warms_up else ()):
        if getattr(cfg, name) % size:
            raise ValueError(f"--{name}={getattr(cfg, name)} does not divide among {size} ranks: each rank takes an "
                             f"equal share of every step; pass a multiple of {size}")


def check_fsdp(cfg, size):
    """ValueError unless --fsdp can run: under torchrun, full fine-tuning, AdamW on the GPU."""
    if not cfg.fsdp:
        return
    if size == 1:
        raise ValueError("--fsdp shards the model across torchrun's ranks; run it under torchrun "
                         "--nproc_per_node=N (N >= 2), or drop --fsdp")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 (public from torch 2.6)
    except ImportError:
        raise ValueError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
                         f"{torch.__version__}: upgrade torch, or drop --fsdp") from None
    if cfg.lora_rank or cfg.optimizer_offload:
        raise ValueError("--fsdp is for full fine-tuning with AdamW on the GPUs; drop --lora_rank or "
                         "--optimizer_offload (each fits a model on one card instead)")
    if cfg.compile:
        raise ValueError("--compile is not tested with --fsdp's hooks on every block; drop one of them")


def setup(argv, stop_requested):
    """-> (Run, the resumed state.pt or None). Bad input ends here with one line, before any work. Under torchrun
    every rank runs this alike (the same config, seeds and model) and joins the process group here."""
    world = distributed.from_env()
    distributed.only_main_prints(world)
    try:
        overrides = parse_args(argv)
        device = pick_device(overrides.get("device", "auto"))
        resume_from, state = load_checkpoint_state(overrides.get("out_dir", "out")) if overrides.get("resume") \
            else (None, None)
        cfg, gcfg = resolve_config(overrides, device, read_run_config(resume_from) if resume_from else None)
        if cfg.dry_run:
            dry_run(cfg, gcfg)
            raise SystemExit(0)
        check_world_size(cfg, world.size, state)
        check_fsdp(cfg, world.size)
        if state and state["phase"] == "rl" and bool(cfg.lora_rank) != ("lora" in state):
            raise ValueError(f"--resume: {resume_from} was saved " + ("with" if "lora" in state else "without")
                             + " LoRA adapters; resume it with the --lora_rank it was run with")
        device = pick_device(cfg.device)  # a resumed run keeps the device it was saved with
        tok = load_tokenizer(cfg.model_dir) if cfg.init == "qwen" else byte_tokenizer()
        task = tasks.load(cfg.task)
        test_problems = task.test_set(cfg.eval_size, **tasks.knobs(task, cfg))
        template, _ = task.prompt_setup(tok, cfg.template, cfg.init == "scratch")  # a template it lacks stops here
        check_demonstrations_fit(cfg, gcfg, task, tok, template)
        world, device = distributed.init(device)  # under torchrun: the process group, this rank's GPU
        threads = cfg.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count())
        torch.set_num_threads(threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # before the model: a fresh model's weights follow the seed, alike on every rank
        on_cuda = torch.device(device).type == "cuda"
        precision = cfg.precision if cfg.precision != "auto" else "bf16-mixed" if on_cuda else "fp32"
        model = build_model(cfg, resume_from, device, precision, state)
        if cfg.fsdp:  # every rank built the whole model alike; each keeps its shard of it
            world = dataclasses.replace(world, fsdp=True)
            distributed.shard_model(model)
        mc = model.config
        if cfg.lora_rank > min(mc.dim, mc.n_kv_heads * mc.head_dim):
            raise ValueError(f"--lora_rank={cfg.lora_rank} is more than the narrowest adapted layer "
                             f"({min(mc.dim, mc.n_kv_heads * mc.head_dim)} wide): a smaller rank, or 0 (full)")
        # last: bad input above leaves an old run's logs alone; rank 0 alone writes them
        for name in ("metrics.jsonl", "samples.jsonl") if world.main else ():
            path = os.path.join(cfg.out_dir, name)
            if state:  # the logs are cut back to the checkpoint's position
                truncate_log(path, state["phase"], state["step"])
            elif os.path.exists(path):
                os.remove(path)  # a fresh run starts fresh logs
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if hasattr(sys.stdout, "reconfigure"):  # log lines appear as they happen, also when piped
        sys.stdout.reconfigure(line_buffering=True)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.compile_blocks = cfg.compile
    cfg = dataclasses.replace(cfg, device=device, precision=precision,
                              warmup_seq_len=cfg.warmup_seq_len or gcfg.max_new_tokens)
    run = Run(cfg, gcfg, device, model, tok, test_problems, stop_requested, world)
    run.cfg = cfg = dataclasses.replace(cfg, template=run.template)  # saved resolved: eval.py reads it
    print("config:", json.dumps({**dataclasses.asdict(cfg), **dataclasses.asdict(gcfg)}))
    if world.size > 1:
        print(f"torchrun: {world.size} ranks ({'nccl' if run.on_cuda else 'gloo'}), each with "
              + ("1/N of the model (FSDP2)" if world.fsdp else "the whole model") + "; a step's problems, "
              "demonstrations and held-out problems are split among them, gradients summed")
    mc = model.config
    print(f"model: {count_params(mc) / 1e6:.2f}M parameters, {mc.n_layers} layers, dim {mc.dim}, on {device} "
          f"({precision}); tokenizer n_vocab {tok.n_vocab}; template {run.template}; stop ids {run.stop_ids}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_bytes, need = disk_needed(cfg.out_dir, model, with_warmup=cfg.init == "scratch")
    free = shutil.disk_usage(cfg.out_dir).free
    print(f"checkpoints: ckpt/ {ckpt_bytes / 2**30:.2f} GiB (weights + AdamW state); the run needs "
          f"{need / 2**30:.2f} GiB more disk at the peak of a save, {free / 2**30:.1f} GiB are free")
    if cfg.check_disk and need > free:
        raise SystemExit(f"error: {cfg.out_dir} has {free / 2**30:.2f} GiB free, but this run's checkpoints need "
                         f"{need / 2**30:.2f} GiB more (ckpt/ twice during a save, plus warmup/ and final/); free "
                         f"some space, choose another --out_dir, or pass --check_disk=false")
    if state:
        print(f"resuming from {resume_from}: phase {state['phase']}, step {state['step']}")
    return run, state

# -----------------------------------------------------------------------------
# Phase 1: next-token-prediction warm-up on the demonstration mix (scratch only)


def check_demonstrations_fit(cfg, gcfg, task, tok, template):
    """ValueError if no long demonstration among the first 16 warm-up problems fits both the warm-up's budget
    (prompt + reply <= warmup_seq_len) and the reply budget max_new_tokens: the warm-up would drop them all
    (p_long silently 0) and RL could never write the long form."""
    if cfg.init != "scratch" or cfg.warmup_steps == 0 or cfg.p_long == 0:
        return
    seq_len, knobs = cfg.warmup_seq_len or gcfg.max_new_tokens, tasks.knobs(task, cfg)
    stream, rng, sizes = task.problem_stream(0, "warmup", **knobs), random.Random(0), []
    for _ in range(16):
        problem = next(stream)
        reply = len(tok.encode(task.sample_demonstration(problem, 1.0, rng, **knobs))) + 1  # + EOS
        sizes.append((len(tok.encode(task.render_prompt(problem, template, tok))) + reply, reply))
    if not any(total <= seq_len + 1 and reply <= gcfg.max_new_tokens for total, reply in sizes):
        total, reply = min(sizes)
        raise ValueError(f"a long demonstration takes {reply} tokens ({total} with its prompt), more than "
                         f"--max_new_tokens={gcfg.max_new_tokens} or --warmup_seq_len={seq_len} allow: raise them, "
                         f"or make the problems smaller")


def warmup_batch(cfg, step, tok, template, task, knobs, world=distributed.SINGLE):
    """Demonstrations for one warm-up step (this rank's share of them) -> list of micro-batches (inputs [b, T],
    targets [b, T], loss mask [b, T] True on completion tokens). One demonstration per row, right-padded: rows never
    share attention, which a model this small needs (packed rows slowed learning to copy the prompt's numbers ~3x in
    our runs). Rows are sorted by length and cut where the length jumps by 1.5x, so short rows don't pay for long
    padding."""
    rng = random.Random(step_seed(cfg.seed, "warmup", step))
    stream = task.problem_stream(rng.randrange(2**32), "warmup", **knobs)  # countdown: each has a long form
    examples = []
    while len(examples) < cfg.warmup_batch_size:
        problem = next(stream)
        prompt = tok.encode(task.render_prompt(problem, template, tok))
        completion = tok.encode(task.sample_demonstration(problem, cfg.p_long, rng, **knobs)) + [tok.eos_id]
        if len(prompt) + len(completion) <= cfg.warmup_seq_len + 1:  # longer ones are skipped
            examples.append((prompt, completion))
    examples = world.shard(examples)  # every rank draws the step's demonstrations alike, then keeps its slice
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
    if world.fsdp:  # each forward and backward is a collective there: as many micro-batches on every rank, the
        inputs, targets, mask = micro_batches[0]  # extra ones a row with no loss token (a zero gradient)
        micro_batches += [(inputs[:1], targets[:1], torch.zeros_like(mask[:1]))] * (
            world.max(len(micro_batches)) - len(micro_batches))
    return micro_batches


def warmup(run, state):
    """Next-token prediction on demonstrations; returns False if a signal stopped the run (ckpt/ saved)."""
    cfg, model = run.cfg, run.model
    optimizer, start = run.adamw(cfg.warmup_lr, 0.95, state)  # nanoGPT's beta2 for pre-training
    print(f"warm-up: {cfg.warmup_steps} steps x {cfg.warmup_batch_size} demonstrations (one per row, length-"
          f"bucketed micro-batches), p_long {cfg.p_long}, lr {cfg.warmup_lr}"
          + (f"; {cfg.warmup_batch_size // run.world.size} per rank" if run.world.size > 1 else ""))
    for step in run.steps("warm-up", start, cfg.warmup_steps):
        t0 = time.time()
        micro_batches = warmup_batch(cfg, step, run.tok, run.template, run.task, run.knobs, run.world)
        lr = lr_at(step, cfg.warmup_steps, cfg.warmup_lr, warmup=20)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # cross-entropy on completion tokens only (the prompt is given, not learned), averaged over all of the
        # step's completion tokens (on every rank): each micro-batch adds its sum / that count, then one step
        num_tokens = int(run.world.sum([sum(int(m.sum()) for _, _, m in micro_batches)])[0])
        loss = torch.zeros((), device=run.device)
        for inputs, targets, mask in micro_batches:
            inputs, targets, mask = inputs.to(run.device), targets.to(run.device), mask.to(run.device)
            with run.autocast:
                logits = model(inputs)                                                  # [b, T, V]
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            micro_loss = (losses * mask.flatten()).sum() / num_tokens
            micro_loss.backward()
            loss += micro_loss.detach()
        run.world.sum_grads(model.parameters())  # each rank's share -> the gradient of the step's whole batch
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.gcfg.max_grad_norm or float("inf"))
        loss, tokens = run.world.sum([loss.item(), sum(x.numel() for x, _, _ in micro_batches)])  # all ranks'
        if not run.step_is_finite(math.isfinite(loss) and torch.isfinite(grad_norm).item(), f"warm-up step {step}"):
            optimizer.zero_grad(set_to_none=True)  # a non-finite loss or gradient never reaches the weights
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_per_s = tokens / (time.time() - t0)
        row = {"phase": "warmup", "step": step, "loss": loss, "grad_norm": grad_norm.item(), "lr": lr,
               "tokens_per_s": tokens_per_s}
        show = step % 20 == 0 or step == cfg.warmup_steps - 1
        run.log(row, f"warmup {step + 1}/{cfg.warmup_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                     f"tok/s {tokens_per_s:.0f}" if show else None)
        if run.save_or_stop("warmup", step + 1, optimizer):
            return False
    return True

# -----------------------------------------------------------------------------
# Phase 2: GRPO


def evaluate(run, step):
    """Greedy decoding on the held-out problems: accuracy, mean response length, share in the long form. Under
    torchrun each rank decodes its slice of the problems, and the metrics are computed from all of them."""
    problems = run.world.shard(run.test_problems)
    prompts = [run.tok.encode(run.task.render_prompt(p, run.template, run.tok)) for p in problems]
    with run.autocast, distributed.unsharded(run.model, run.world):  # FSDP: weights gathered once, not per token
        completions = greedy(run.model, prompts, run.gcfg.max_new_tokens, run.stop_ids, run.tok.n_vocab,
                             run.cfg.eval_batch_size)
    texts = [run.tok.decode(c) for c in completions]
    results = run.world.gather([(is_correct(run.task.reward(t, p)[1]), len(c), run.task.is_long_form(t))
                                for t, c, p in zip(texts, completions, problems)])   # one per held-out problem
    accuracy = sum(correct for correct, _, _ in results) / len(results)
    length = sum(n for _, n, _ in results) / len(results)
    long_frac = sum(long for _, _, long in results) / len(results)
    run.log({"phase": "eval", "step": step, "eval_accuracy": accuracy, "eval_response_length": length,
             "eval_long_frac": long_frac}, f"eval @ rl step {step} | held-out greedy accuracy {accuracy:.3f} | "
                                           f"length {length:.1f} | long form {long_frac:.2f}")


def rollout_metrics(rewards, reasons, texts, completions, stop_ids, group_size, is_long_form):
    """What the rollouts did: reward, accuracy (fully correct only), lengths, truncations, uniform groups, and
    the share in the task's long form."""
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
            "accuracy": sum(map(is_correct, reasons)) / len(reasons),
            "response_length": sum(map(len, completions)) / len(completions),
            "truncated_frac": sum(grpo.is_truncated(c, stop_ids) for c in completions) / len(completions),
            "zero_adv_frac": grpo.uniform_groups(rewards, group_size).float().mean().item(),
            "long_frac": sum(map(is_long_form, texts)) / len(texts)}


def rl_setup(run, state):
    """What the GRPO loop starts from -> (optimizer, first step, reference model or None): LoRA's adapters when
    asked, AdamW, ckpt/ at RL step 0 of a fresh scratch run, the frozen reference for the KL term, the plan."""
    cfg, gcfg, model, tok, G, task = run.cfg, run.gcfg, run.model, run.tok, run.gcfg.group_size, run.task
    world = run.world
    if state is None and cfg.init == "scratch":  # the RL starting point: out/warmup (and below ckpt/ at RL step 0)
        run.save("warmup")  # on disk before any rank reads it back as the reference model (save waits for it)
    if cfg.lora_rank:  # LoRA (Hu et al. 2021): the RL starting point is the frozen base, only the adapters train
        # under bf16 autocast the frozen Linear weights are stored in bf16: the bf16 copies autocast would make
        base_dtype = torch.bfloat16 if cfg.precision in ("bf16-mixed", "bf16") else None
        alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
        add_lora(model, cfg.lora_rank, alpha, base_dtype)
        if state is not None:
            load_lora(model, state["lora"])  # build_model loaded the base; its adapters as they were saved
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA: rank {cfg.lora_rank}, alpha {alpha}, {n / 1e6:.2f}M trainable "
              f"parameters; the reference for the KL term is the frozen base (the same tensors, adapters off)")
    optimizer, start = run.adamw(cfg.lr, 0.999, state)  # nano-aha-moment / TRL's AdamW betas for RL
    if state is None and cfg.init == "scratch":
        run.save("ckpt", "rl", 0, optimizer)
    ref_model = None  # a frozen copy of the RL starting point for the KL term (bf16 on CUDA: only ever read)
    if gcfg.beta > 0 and cfg.lora_rank:
        ref_model = without_adapters(model)
    elif gcfg.beta > 0:
        ref_source = cfg.model_dir if cfg.init == "qwen" else os.path.join(cfg.out_dir, "warmup")
        ref_model = load_qwen(ref_source, run.device, torch.bfloat16 if run.on_cuda
                              else next(model.parameters()).dtype).eval().requires_grad_(False)
        if world.fsdp:  # sharded like the policy (it only runs forwards, alongside the policy's)
            distributed.shard_model(ref_model)
    print(f"RL: {cfg.rl_steps} steps x {cfg.prompts_per_step} prompts x {G} samples = {cfg.prompts_per_step * G} "
          f"rollouts per step in micro-batches of {gcfg.micro_batch_size}; max_new_tokens {gcfg.max_new_tokens}; "
          f"lr {cfg.lr}; eval on {len(run.test_problems)} held-out problems every {cfg.eval_every} steps"
          + (f"; {cfg.prompts_per_step // world.size} prompts per rank" if world.size > 1 else ""))
    if run.on_cuda or cfg.init == "qwen":
        prompt_len = max(len(tok.encode(task.render_prompt(p, run.template, tok))) for p in run.test_problems)
        print_run_plan(cfg, gcfg, model.config, prompt_len, cfg.precision, model.vocab_limit, world.size)
    return optimizer, start, ref_model


def train_rl(run, state):
    """The GRPO loop; returns False if a signal stopped the run (ckpt/ saved), True when it finished."""
    cfg, gcfg, model, tok, G, task = run.cfg, run.gcfg, run.model, run.tok, run.gcfg.group_size, run.task
    world = run.world  # torchrun's ranks; one process: SINGLE, and every world.* call below is the identity
    optimizer, start, ref_model = rl_setup(run, state)
    for step in run.steps("GRPO", start, cfg.rl_steps + 1):
        if step in cfg.keep_steps:  # the policy before this step's update, for pass@k over RL length
            run.save(f"step_{step}")
        if step % cfg.eval_every == 0 or step == cfg.rl_steps:
            evaluate(run, step)
        if step == cfg.rl_steps:
            run.save("final")
            run.save("ckpt", "rl", step, optimizer)
            break
        t0 = time.time()
        # ---- 1. problems: fresh ones each step, a function of (seed, step), so a resumed run sees the same;
        # under torchrun each rank takes its slice of whole problems (a group never spans ranks)
        seed = step_seed(cfg.seed, "rl", step)
        stream = task.problem_stream(seed % 2**32, "rl", **run.knobs)
        problems = world.shard([next(stream) for _ in range(cfg.prompts_per_step)])
        prompts = [tok.encode(task.render_prompt(p, run.template, tok)) for p in problems]
        # ---- 2. rollouts: G samples per prompt, each cut after its first stop id; rows grouped by prompt
        # (under torchrun: this rank's rows of the step's batch, sampled as one process would sample them)
        with run.autocast, distributed.unsharded(model, world):  # FSDP: gathered once for the whole rollout
            completions = generate(model, prompts, gcfg.max_new_tokens, temperature=gcfg.temperature,
                                   top_p=gcfg.top_p, stop_ids=run.stop_ids, seed=seed, num_samples=G,
                                   decode=cfg.decode, batch_rows=(world.rank * len(prompts) * G,
                                                                  cfg.prompts_per_step * G))
        # ---- 3. rewards: the task's score of every response
        texts = [tok.decode(c) for c in completions]
        row_problems = grpo.per_row(problems, G)
        rewards, reasons = zip(*[task.reward(t, p) for t, p in zip(texts, row_problems)])
        rewards = torch.tensor(rewards, dtype=torch.float32)                    # [N / ranks] this rank's rows
        # ---- 4. advantages: each reward against its own group's mean (and std), from every rank's rewards (so
        # that scale_rewards=batch divides by the whole batch's std); this rank keeps its own rows' advantages
        all_rewards = torch.tensor(world.gather(rewards.tolist()), dtype=torch.float32)         # [N] the batch
        advantages = world.shard(grpo.group_advantages(all_rewards, G, gcfg.scale_rewards, gcfg.adv_eps))
        # ---- 5. the loss, its backward and the optimizer step (num_iterations of them) on micro-batches
        lr = lr_at(step, cfg.rl_steps if cfg.decay_lr else 0, cfg.lr, cfg.lr_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # normalisers over all ranks' rows, gradients summed over ranks: the step of one process on the whole batch
        batch = grpo.micro_batches(grpo.per_row(prompts, G), completions, rewards, advantages, gcfg,
                                   tok.pad_id, run.stop_ids, run.device, world)
        update = grpo.update(model, optimizer, batch, gcfg, ref_model, autocast=run.autocast, world=world)
        run.step_is_finite(math.isfinite(update["loss"]) and math.isfinite(update["grad_norm"]), f"rl step {step}")
        # ---- 6. log, and keep a few rollouts for eval.py --analyze: every rank's rows, in one process's order
        rows = world.gather(zip(reasons, texts, completions, row_problems))
        reasons, texts, completions, row_problems = (list(column) for column in zip(*rows))
        rewards = all_rewards                                                   # [N] the batch
        dt = time.time() - t0
        metrics = {**rollout_metrics(rewards, reasons, texts, completions, run.stop_ids, G, task.is_long_form),
                   **update}
        run.log({"phase": "rl", "step": step, **metrics, "lr": lr, "tokens_per_s": sum(map(len, completions)) / dt,
                 "step_time": dt},
                f"rl {step + 1}/{cfg.rl_steps} | reward {metrics['reward_mean']:.3f} | acc {metrics['accuracy']:.3f} "
                f"| loss {metrics['loss']:+.4f} | kl {metrics['kl']:.4f} | clip {metrics['clip_frac']:.3f} | len "
                f"{metrics['response_length']:.1f} | long {metrics['long_frac']:.2f}")
        run.append(run.samples_path, [{"phase": "rl", "step": step, "problem": row_problems[i].to_dict(),
                                       "response": texts[i], "reward": rewards[i].item(), "reason": reasons[i],
                                       "length": len(completions[i])} for i in spread(len(texts), cfg.keep_samples)])
        if step % cfg.sample_every == 0:
            for i in spread(len(texts), 3):
                tqdm.write(f"  sample (reward {rewards[i]:.1f}) {row_problems[i].to_dict()}: {texts[i][:300]!r}")
        # ---- 7. save
        if run.save_or_stop("rl", step + 1, optimizer):
            return False
    print(f"done in {format_time(time.time() - run.t_start)}; final model in {cfg.out_dir}/final")
    return True

# -----------------------------------------------------------------------------
# The run


STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])


def main(argv=None):
    """Ctrl-C, SIGTERM (what SLURM, Kubernetes and torchrun send before a kill) and SIGUSR1 (SLURM's --signal
    ahead of the time limit) set a flag; the loop saves after the current step and exits with 128 + the signal's
    number. A second Ctrl-C stops at once."""
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step"
              + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""))
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        run, state = setup(sys.argv[1:] if argv is None else argv, stop_requested)
        if state is None or state["phase"] == "warmup":
            skip = run.cfg.init != "scratch" or run.cfg.warmup_steps == 0 or run.cfg.warmup_from
            if not skip and not warmup(run, state):
                raise SystemExit(128 + stop_requested[0])
            state = None
        if not train_rl(run, state):
            raise SystemExit(128 + stop_requested[0])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        distributed.close()


if __name__ == "__main__":
    run_script(main)
