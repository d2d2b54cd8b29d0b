"""What long runs meet, on tiny CPU runs: a torn or corrupt metrics line, damaged checkpoint files (with and without
an earlier checkpoint to fall back to), SIGTERM / SIGUSR1 from a scheduler, a full disk, a NaN gradient in the
warm-up, a closed stdout. Each ends in an exact resume or in one clear line and a non-zero exit."""
import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from hf_io import load_safetensors
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim=64", "--n_layers=2", "--n_nums=2", "--num_range=1,9", "--target_range=1,20", "--p_long=0",
        "--warmup_batch_size=8", "--warmup_seq_len=96", "--max_new_tokens=32", "--eval_size=4",
        "--eval_batch_size=16", "--threads=1", "--progress=false", "--seed=3", "--prompts_per_step=2",
        "--group_size=4", "--lr=3e-3", "--eval_every=2", "--save_every=1"]
WALL_CLOCK = ("time", "tokens_per_s", "step_time")


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in f]


@pytest.fixture(scope="module")
def two_rl_steps(tmp_path_factory):
    """A finished tiny run (4 warm-up steps, 2 RL steps, ckpt/ saved after every step), copied per test."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    train.main(TINY + [f"--out_dir={out}", "--warmup_steps=4", "--rl_steps=2"])
    return out


@pytest.fixture
def run_dir(two_rl_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(two_rl_steps, out)
    return out


def resume(out, *extra):
    train.main(TINY + [f"--out_dir={out}", "--resume", "--rl_steps=3", *extra])

# -----------------------------------------------------------------------------
# metrics.jsonl


def test_a_torn_last_metrics_line_is_dropped_and_said(run_dir, capsys):
    before = read_metrics(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"phase": "rl", "step": 2, "rew')  # a kill in the middle of an append
    resume(run_dir)
    assert "dropped its torn last line" in capsys.readouterr().out
    after = read_metrics(run_dir)
    assert after[:len(before) - 1] == before[:-1]  # everything up to the final eval, which is redone at step 3
    assert [(r["phase"], r["step"]) for r in after[-3:]] == [("eval", 2), ("rl", 2), ("eval", 3)]


def test_a_corrupt_metrics_line_elsewhere_is_an_error_naming_it(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).readlines()
    lines[2] = "garbage\n"
    open(path, "w").writelines(lines)
    with pytest.raises(SystemExit, match=r"metrics.jsonl, line 3: not a metrics row \('garbage'\); delete or repair"):
        resume(run_dir)
    assert open(path).readlines() == lines  # nothing was rewritten

# -----------------------------------------------------------------------------
# Damaged checkpoints


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
def test_a_truncated_checkpoint_file_with_nothing_to_fall_back_to_stops_with_one_line(run_dir, name):
    truncate(os.path.join(run_dir, "ckpt", name))
    with pytest.raises(SystemExit, match=rf"ckpt/{name} has \d+ bytes, its manifest says \d+ .*no earlier "
                                         rf"complete checkpoint"):
        resume(run_dir)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(run_dir, capsys):
    """ckpt.old is what a save leaves while it swaps; a damaged ckpt/ beside it is never used."""
    shutil.copytree(os.path.join(run_dir, "ckpt"), os.path.join(run_dir, "ckpt.old"))
    truncate(os.path.join(run_dir, "ckpt", "model.safetensors"))
    resume(run_dir)
    out = capsys.readouterr().out
    assert "ckpt/model.safetensors has" in out and "resuming from" in out and "ckpt.old instead" in out
    last = read_metrics(run_dir)[-1]
    assert (last["phase"], last["step"]) == ("eval", 3)


def test_an_unreadable_state_pt_with_a_matching_manifest_is_caught_too(run_dir):
    """A checkpoint from before manifests (no manifest.json) whose state.pt is torn."""
    os.remove(os.path.join(run_dir, "ckpt", checkpoint.MANIFEST))
    truncate(os.path.join(run_dir, "ckpt", "state.pt"))
    with pytest.raises(SystemExit, match=r"state.pt cannot be read"):
        resume(run_dir)


def test_every_saved_directory_verifies_against_its_manifest(run_dir):
    for name in ("warmup", "ckpt", "final"):
        manifest = json.load(open(os.path.join(run_dir, name, checkpoint.MANIFEST)))
        assert "model.safetensors" in manifest and checkpoint.damaged_file(os.path.join(run_dir, name)) is None
    assert "state.pt" in json.load(open(os.path.join(run_dir, "ckpt", checkpoint.MANIFEST)))

# -----------------------------------------------------------------------------
# SIGTERM and SIGUSR1: save after the current step, exit 128 + signal, resume exactly


def launch(args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def signal_when(process, out_dir, phase, min_step, signum):
    """Send signum once metrics.jsonl shows a row of `phase` at step >= min_step; -> the process's exit code."""
    path, deadline = os.path.join(out_dir, "metrics.jsonl"), time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            rows = [json.loads(line) for line in open(path)]
            if any(r["phase"] == phase and r["step"] >= min_step for r in rows):
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    assert process.poll() is None, "finished before the signal: " + process.stderr.read().decode()[-2000:]
    process.send_signal(signum)
    return process.wait(timeout=120)


def test_sigterm_in_warmup_and_sigusr1_in_rl_save_and_resume_exactly(tmp_path):
    common = TINY + ["--warmup_steps=400", "--rl_steps=16", "--save_every=1000"]  # only the signal saves
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    reference = launch(common + [f"--out_dir={straight}"])
    code = signal_when(launch(common + [f"--out_dir={stopped}"]), stopped, "warmup", 5, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    state = torch.load(os.path.join(stopped, "ckpt", "state.pt"), weights_only=False)
    logged = [r for r in read_metrics(stopped) if r["phase"] == "warmup"]
    assert state["phase"] == "warmup" and state["step"] == logged[-1]["step"] + 1  # the step it was in is kept
    code = signal_when(launch(common + [f"--out_dir={stopped}", "--resume"]), stopped, "rl", 2, signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1
    assert torch.load(os.path.join(stopped, "ckpt", "state.pt"), weights_only=False)["phase"] == "rl"
    finish = launch(common + [f"--out_dir={stopped}", "--resume"])
    for p in (reference, finish):
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert read_metrics(stopped) == read_metrics(straight)
    samples = [open(os.path.join(d, "samples.jsonl")).read() for d in (stopped, straight)]
    assert samples[0] == samples[1]  # the kept rollouts are cut back and replayed like the metrics
    a = load_safetensors(os.path.join(straight, "final", "model.safetensors"))
    b = load_safetensors(os.path.join(stopped, "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# -----------------------------------------------------------------------------
# A full disk


def test_too_little_free_space_stops_before_the_first_step(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 10**5))
    with pytest.raises(SystemExit, match=r"has 0.00 GiB free, but this run's checkpoints need .* --check_disk=false"):
        train.main(TINY + [f"--out_dir={out}", "--warmup_steps=2", "--rl_steps=1"])
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # no step ran
    train.main(TINY + [f"--out_dir={out}", "--warmup_steps=2", "--rl_steps=1", "--check_disk=false"])
    assert os.path.isdir(os.path.join(out, "final"))


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A fake disk that fills during the third save: the error is one line, ckpt.tmp is gone, the previous
    ckpt/ is intact and the run resumes from it."""
    out, real_save_hf, calls = str(tmp_path / "run"), checkpoint.save_hf, []

    def filling_save_hf(model, directory):
        calls.append(directory)
        real_save_hf(model, directory)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_hf", filling_save_hf)
    with pytest.raises(SystemExit, match=r"saving .*ckpt failed after \d+\.\d MiB \(.*No space left on device\); "
                                         r".* free on its disk; the previous .*ckpt is intact"):
        train.main(TINY + [f"--out_dir={out}", "--warmup_steps=5", "--rl_steps=1"])
    assert not os.path.exists(os.path.join(out, "ckpt.tmp"))
    assert checkpoint.damaged_file(os.path.join(out, "ckpt")) is None
    assert torch.load(os.path.join(out, "ckpt", "state.pt"), weights_only=False)["step"] == 2
    monkeypatch.setattr(checkpoint, "save_hf", real_save_hf)
    train.main(TINY + [f"--out_dir={out}", "--resume"])
    assert [r["step"] for r in read_metrics(out) if r["phase"] == "warmup"] == [0, 1, 2, 3, 4]


def test_a_real_tiny_disk(tmp_path):
    """Where a tmpfs can be mounted (root in a container): checked before the first step, and a save that
    fills it anyway (--check_disk=false) ends in one line with nothing half-written."""
    mount = str(tmp_path / "disk")
    os.makedirs(mount)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the fake full disk above covers the save")
    try:
        args = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + [f"--out_dir={mount}/run",
                                                                          "--warmup_steps=3", "--rl_steps=1"]
        checked = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert checked.returncode == 1 and "but this run's checkpoints need" in checked.stderr
        assert "Traceback" not in checked.stderr
        full = subprocess.run(args + ["--check_disk=false"], capture_output=True, text=True, timeout=120)
        assert full.returncode == 1 and "failed after" in full.stderr and "Traceback" not in full.stderr
        assert not any(name.endswith(".tmp") for name in os.listdir(f"{mount}/run"))
    finally:
        subprocess.run(["umount", mount])

# -----------------------------------------------------------------------------
# A NaN gradient in the warm-up


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poisoned_model(steps):
    """A Transformer whose training forward gives a finite loss but NaN gradients on the given calls."""
    calls = []

    class Poisoned(Transformer):
        def forward(self, tokens, kv_cache=None, attention_mask=None):
            logits = super().forward(tokens, kv_cache, attention_mask)
            calls.append(1)
            return NaNGradient.apply(logits) if len(calls) in steps else logits
    return Poisoned


def test_a_nan_gradient_in_the_warmup_is_skipped(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    monkeypatch.setattr(train, "Transformer", poisoned_model(steps={2, 3}))  # one micro-batch per step here
    train.main(TINY + [f"--out_dir={out}", "--warmup_steps=6", "--rl_steps=1", "--warmup_batch_size=1"])
    assert "warm-up step 1: non-finite loss or gradient, update skipped (1 in a row)" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out) if r["phase"] == "warmup"] == [0, 3, 4, 5]
    weights = load_safetensors(os.path.join(out, "final", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_steps_in_a_row_stop_the_run_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "Transformer", poisoned_model(steps=set(range(100))))
    with pytest.raises(SystemExit, match="error: 3 non-finite steps in a row: the run diverged"):
        train.main(TINY + [f"--out_dir={tmp_path}/run", "--warmup_steps=6", "--max_bad_steps=3",
                           "--warmup_batch_size=1"])

# -----------------------------------------------------------------------------
# A closed stdout


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_into_a_closed_pipe_exits_quietly(script):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as with `| head` after its lines
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                            text=True, timeout=60)
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""
