"""Run directories on disk: atomic checkpoints, the RNG state that makes a resume exact, the metrics log.

A checkpoint directory is a Hugging Face model directory (config.json + safetensors) with the tokenizer, the
run's run_config.json and, for ckpt/, state.pt: {"phase", "step", "optimizer", "rng"}.
"""
import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch

from hf_io import save_hf


def save_checkpoint(path, model, tok, cfg, gcfg, state=None):
    """Model (HF layout) + tokenizer + run_config.json (+ state.pt), written into path.tmp and swapped in, so
    a kill at any moment leaves either the old or the new directory complete (never a half-written one)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp)
    tok.save(tmp)
    with open(os.path.join(tmp, "run_config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), **dataclasses.asdict(gcfg)}, f, indent=2)
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)  # two renames: between them only path.old exists, which load_checkpoint accepts
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_run_config(path):
    """train.py's run_config.json of a model directory, or {} for a plain Hugging Face directory."""
    file = os.path.join(path, "run_config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {file}: {e}") from None


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
