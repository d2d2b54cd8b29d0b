"""Run directories on disk: atomic, self-verifying checkpoints, the RNG state that makes a resume exact, the
metrics log.

A checkpoint directory is a Hugging Face model directory (config.json + safetensors) with the tokenizer, the
run's run_config.json, for ckpt/ also state.pt ({"phase", "step", "optimizer", "rng"}), and manifest.json: every
file's size and SHA-256 (of the whole file up to 256 MiB, of its first and last 16 MiB beyond: cheap on a 37 GB
checkpoint, and with the size it catches a truncated file or a torn header). A save is written into path.tmp,
fsynced, and only then swapped in, so the previous checkpoint stays intact until the new one is on disk; a save
that fails (a full disk) removes path.tmp and stops the run. --resume checks the manifest.
"""
import dataclasses
import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch

from hf_io import read_safetensors_header, save_hf

MANIFEST = "manifest.json"
WHOLE_FILE_BYTES = 256 * 2**20  # files up to this size are hashed whole, larger ones at both ends
END_BYTES = 16 * 2**20


def file_digest(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(f.read(END_BYTES))
            f.seek(size - END_BYTES)
            h.update(f.read(END_BYTES))
    return h.hexdigest()


def damaged_file(directory):
    """None if the checkpoint in directory is complete, else one line naming the damaged file. A directory
    without a manifest (saved before manifests existed) is checked by its safetensors headers alone."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            entries = json.load(f)
    except FileNotFoundError:
        entries = None
    except (OSError, ValueError):
        return f"{directory}/{MANIFEST} is unreadable"
    if entries is None:
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")):
            try:
                read_safetensors_header(os.path.join(directory, name))
            except ValueError as e:
                return str(e)
        return None
    for name, want in entries.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != want["bytes"]:
            return f"{path} has {size} bytes, its manifest says {want['bytes']} (truncated?)"
        if file_digest(path, size) != want["sha256"]:
            return f"{path} does not match its checksum in {MANIFEST}"
    return None


def fsync_directory(path, with_files=True):
    """Make a directory's entries (renames) durable, and with_files its files too, so a power loss cannot tear
    them."""
    for name in os.listdir(path) if with_files else ():
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                os.fsync(f.fileno())
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows cannot open a directory
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) if os.path.isdir(path) else 0


def save_checkpoint(path, model, tok, cfg, gcfg, state=None):
    """Model (HF layout) + tokenizer + run_config.json (+ state.pt) + manifest, written into path.tmp, fsynced
    and swapped in: a kill at any moment leaves the old or the new directory complete, never a half-written one."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf(model, tmp)
        tok.save(tmp)
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), **dataclasses.asdict(gcfg)}, f, indent=2)
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
        sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        manifest = {name: {"bytes": size, "sha256": file_digest(os.path.join(tmp, name), size)}
                    for name, size in sizes.items()}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        fsync_directory(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        written = directory_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        kept = f"the previous {path} is intact; " if os.path.isdir(path) else ""
        raise SystemExit(f"error: saving {path} failed after {written / 2**20:.1f} MiB ({str(e).strip()[:200]}); "
                         f"{free / 2**20:.1f} MiB free on its disk; {kept}free some space, then --resume") from None
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)  # two renames: between them only path.old exists, which load_checkpoint_state accepts
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)), with_files=False)  # the renames
    shutil.rmtree(old, ignore_errors=True)


def disk_needed(out_dir, model, with_warmup):
    """-> (bytes of one ckpt/, bytes more than out_dir holds now that the run's checkpoints need at the peak of
    a save: ckpt/ and ckpt.tmp side by side, plus warmup/ (for a run from scratch) and final/)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + 16 * 2**20  # + tokenizer, configs
    ckpt = 3 * weights  # the weights and AdamW's two moments of each
    there = sum(directory_bytes(os.path.join(out_dir, name)) for name in ("ckpt", "warmup", "final"))
    return ckpt, max(0, 2 * ckpt + weights * (2 if with_warmup else 1) - there)


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


def load_checkpoint_state(out_dir):
    """--resume: (directory, state.pt contents) of out_dir/ckpt, or of ckpt.old when ckpt/ is damaged or was
    never swapped in (a kill between the two renames). Neither complete: ValueError naming the damaged file."""
    problems = []
    for name in ("ckpt", "ckpt.old"):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(os.path.join(path, "state.pt")):
            continue
        problem = damaged_file(path)
        if problem is None:
            try:
                state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
                if problems:
                    print(f"{problems[0]}; resuming from {path} instead (phase {state['phase']}, step {state['step']})")
                return path, state
            except Exception as e:  # a torn zip, a truncated pickle: torch raises several kinds
                problem = f"{path}/state.pt cannot be read ({type(e).__name__}: {str(e)[:120]})"
        problems.append(problem)
    if problems:
        raise ValueError(f"--resume: {problems[-1]}, and no earlier complete checkpoint in {out_dir} to fall back "
                         f"to; restore the file, or start again without --resume")
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


def truncate_log(path, phase, step):
    """Drop rows at or after (phase, step) so a resumed run appends without duplicates or holes. A torn last
    line (what a kill during an append leaves) is dropped with a note; a corrupt line elsewhere is an error."""
    order = {"warmup": 0, "rl": 1, "eval": 1}
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and row.get("phase") in order and isinstance(row.get("step"), int)):
            if n == lines[-1][0]:
                print(f"{path}: dropped its torn last line {n} ({len(line.strip())} characters, an interrupted "
                      f"write)")
                continue
            raise ValueError(f"{path}, line {n}: not a metrics row ({line.strip()[:60]!r}); delete or repair that "
                             f"line, then --resume again")
        rows.append(row)
    keep = [r for r in rows if (order[r["phase"]], r["step"]) < (order[phase], step)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)
