"""Data parallelism on CPU with gloo and 2 ranks: the summed gradient step equals one process's step on the whole
batch; train.py under torchrun logs every row once, evaluates as one process does and resumes in one process; a
batch that does not divide among the ranks stops with one line; eval.py under torchrun gives one process's results."""
import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import distributed
import grpo
import train
from hf_io import load_safetensors
from model import ModelConfig, Transformer
from test_eval import bigram_model, random_model, save_model
from test_train import TINY, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, args):
    """script under torchrun with 2 CPU ranks (gloo) on this machine -> the finished process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script]
                          + args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


# -----------------------------------------------------------------------------
# One GRPO step on 2 ranks, each with half of a fixed rollout batch, against one process with all of it

P, G, STOP = 4, 4, 15
CASES = {  # name: (GRPOConfig overrides, rewards [P * G]); groups 0, 1 go to rank 0, groups 2, 3 to rank 1
    "dapo": (dict(loss_agg="dapo"), [1, 0, .5, 0, 0, 0, 1, 1, .5, 1, 0, 0, 1, 0, 0, .1]),
    "grpo": (dict(loss_agg="grpo", scale_rewards="batch"), [1, 0, .5, 0, 0, 0, 1, 1, .5, 1, 0, 0, 1, 0, 0, .1]),
    # dynamic sampling drops rank 1's uniform groups: a rank without rows still takes part in the sum
    "rank 1 keeps no rows": (dict(loss_agg="dapo", drop_uniform_groups=True), [1, 0, .5, 0, 0, 0, 1, 1] + [1] * 8),
}


def grpo_step(case, world, groups):
    """A tiny model's grpo.update (two iterations, KL to a reference, clipping) on the rows of `groups` of a fixed
    batch, with the world's normalisers and gradient sum (or FSDP2's, world.fsdp) -> (weights after the step,
    metrics)."""
    overrides, rewards = CASES[case]
    cfg = grpo.GRPOConfig(group_size=G, num_iterations=2, beta=0.02, micro_batch_size=3, max_new_tokens=10,
                          clip_eps_high=0.28, temperature=0.9, **overrides)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, STOP, (2 + i,), generator=g).tolist() for i in range(P)]
    completions = [torch.randint(0, STOP + 1, (int(torch.randint(1, 11, (), generator=g)),), generator=g).tolist()
                   for _ in range(P * G)]
    rewards = torch.tensor(rewards, dtype=torch.float32)
    advantages = grpo.group_advantages(rewards, G, cfg.scale_rewards)  # from the whole batch, as train.py does
    rows = [p * G + j for p in groups for j in range(G)]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64))
    ref_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so that the KL term has a gradient
        for p in ref_model.parameters():
            p.mul_(0.9)
    if world.fsdp:
        distributed.shard_model(model)
        distributed.shard_model(ref_model)
    # SGD, not AdamW: Adam's first step is lr * sign(g), which would turn float rounding in near-zero gradient
    # entries into differences of 2 lr
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    row_prompts = grpo.per_row(prompts, G)
    batch = grpo.micro_batches([row_prompts[i] for i in rows], [completions[i] for i in rows], rewards[rows],
                               advantages[rows], cfg, 0, {STOP}, world=world)
    metrics = grpo.update(model, optimizer, batch, cfg, ref_model, world=world)
    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # FSDP: the shards put together
    return {k: whole(v).detach().clone() for k, v in model.state_dict().items()}, metrics


def as_rank(rank, port):
    """In a started process: the environment torchrun would set for this rank of 2."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def rank_main(rank, port, out_dir):
    """One of 2 started ranks: distributed.init, then every case."""
    as_rank(rank, port)
    world, device = distributed.init("cpu")
    assert device == "cpu" and world.rank == rank and world.size == 2
    try:
        for i, case in enumerate(CASES):
            torch.save(grpo_step(case, world, world.shard(list(range(P)))), os.path.join(out_dir, f"{i}.{rank}.pt"))
            torch.save(grpo_step(case, dataclasses.replace(world, fsdp=True), world.shard(list(range(P)))),
                       os.path.join(out_dir, f"{i}.{rank}.fsdp.pt"))
    finally:
        distributed.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_step_of_one_process_on_the_whole_batch(tmp_path):
    # forked, not spawned: the children need not import torch again (seconds each on a busy 2-core machine)
    mp.start_processes(rank_main, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for i, case in enumerate(CASES):
        (w0, m0), (w1, m1) = (torch.load(tmp_path / f"{i}.{rank}.pt") for rank in (0, 1))
        want, want_metrics = grpo_step(case, distributed.SINGLE, range(P))
        half, _ = grpo_step(case, distributed.SINGLE, range(P // 2))  # rank 0's rows alone
        assert all(torch.equal(w0[k], w1[k]) for k in w0), f"{case}: the ranks' weights differ"
        for k in want:
            torch.testing.assert_close(w0[k], want[k], rtol=0, atol=1e-6, msg=f"{case}: {k}")
        if case != "rank 1 keeps no rows":  # the other rank's rows matter
            assert max((want[k] - half[k]).abs().max().item() for k in want) > 1e-3
        assert m0 == m1 and m0.keys() == want_metrics.keys()
        for k, v in want_metrics.items():
            assert m0[k] == pytest.approx(v, rel=1e-6, abs=1e-7), f"{case}: {k}"
        assert m0["num_tokens"] == want_metrics["num_tokens"] > 0 and m0["skipped"] == 0
        # FSDP2: each rank holds half of every weight, the backward sums the gradients into the halves; put
        # together, the weights after the step are the same, and so are the metrics
        for rank in (0, 1):
            w, m = torch.load(tmp_path / f"{i}.{rank}.fsdp.pt")
            for k in want:
                torch.testing.assert_close(w[k], want[k], rtol=0, atol=1e-6, msg=f"{case}, FSDP: {k}")
            assert m.keys() == want_metrics.keys()
            for k, v in want_metrics.items():
                assert m[k] == pytest.approx(v, rel=1e-6, abs=1e-7), f"{case}, FSDP: {k}"


# -----------------------------------------------------------------------------
# train.py under torchrun


def stop_main(rank, port, out_dir):
    """One of 2 ranks of a real train.setup: after RL steps 1, 2, 3 each asks save_or_stop whether to stop; a
    signal reaches rank 1 alone, before step 2 ends (the list is what train.main's signal handler appends to)."""
    as_rank(rank, port)
    stop_requested = []
    try:
        run, _ = train.setup(TINY + ["--prompts_per_step=2", f"--out_dir={out_dir}"], stop_requested)
        optimizer, _ = run.adamw(1e-3, 0.999)
        for step in (1, 2, 3):
            if rank == 1 and step == 2:
                stop_requested.append(signal.SIGUSR1)
            if run.save_or_stop("rl", step, optimizer):
                break
        torch.save({"step": step, "stop_requested": [int(s) for s in stop_requested]},
                   os.path.join(out_dir, f"stop.{rank}.pt"))
    finally:
        distributed.close()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    mp.start_processes(stop_main, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"stop.{rank}.pt") for rank in (0, 1))
    assert rank0["step"] == rank1["step"] == 2
    assert rank1["stop_requested"] == [signal.SIGUSR1] and rank0["stop_requested"] == [signal.SIGTERM]
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)  # saved once, by rank 0
    assert (state["phase"], state["step"]) == ("rl", 2)

RUN = TINY + ["--warmup_steps=30", "--warmup_lr=1e-2", "--prompts_per_step=4", "--group_size=4", "--lr=3e-3",
              "--eval_every=1", "--save_every=100",
              "--eval_batch_size=2"]  # each rank's greedy batches are then one process's: the same padding
WALL_CLOCK = ("time", "tokens_per_s", "step_time")


def without_wall_clock(rows):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def test_torchrun_train_logs_once_evaluates_as_one_process_and_resumes_in_one(tmp_path):
    two, one, same = tmp_path / "two", tmp_path / "one", tmp_path / "same"
    result = torchrun("train.py", RUN + ["--rl_steps=2", f"--out_dir={two}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done in") == 1 and result.stdout.count("rl 2/2 |") == 1  # rank 0 alone prints
    rows = read_metrics(two)
    assert [(r["phase"], r["step"]) for r in rows] == [("warmup", s) for s in range(30)] + [
        ("eval", 0), ("rl", 0), ("eval", 1), ("rl", 1), ("eval", 2)]
    with open(two / "samples.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0] * 8 + [1] * 8  # both ranks' rows, once
    for r in (r for r in rows if r["phase"] == "rl"):  # dapo's normaliser: every token of all 16 rows
        assert r["num_tokens"] == round(r["response_length"] * 16) and r["skipped"] == 0
    # the whole run is one process's: the same demonstrations and rollouts (each rank samples its rows of the
    # step's batch as one process does), the same normalisers, so the same metrics rows and final weights
    train.main(RUN + ["--rl_steps=2", f"--out_dir={one}"])
    single = without_wall_clock(read_metrics(one))
    assert [(r["phase"], r["step"]) for r in single] == [(r["phase"], r["step"]) for r in rows]
    for want, have in zip(single, without_wall_clock(rows)):
        assert have.keys() == want.keys()
        for key, value in want.items():
            assert have[key] == (value if key == "eval_accuracy" or not isinstance(value, float) else
                                 pytest.approx(value, rel=1e-4, abs=1e-6)), f"{want['phase']} {want['step']}: {key}"
    assert single[29]["loss"] < single[0]["loss"] - 1 and len({r["loss"] for r in single if r["phase"] == "rl"}) == 2
    # the weights to float rounding: summing the ranks' gradients groups the additions differently, and AdamW's
    # division by sqrt(v) magnifies that rounding in entries whose gradient is near zero (measured: the whole
    # model 8e-6 apart relative to its norm, the worst tensor 5e-5, after 30 warm-up and 2 RL steps)
    one_w, two_w = (load_safetensors(out / "final" / "model.safetensors") for out in (one, two))
    squared = lambda tensors: sum((t.double() ** 2).sum() for t in tensors)
    assert (squared(one_w[k] - two_w[k] for k in one_w) / squared(one_w.values())).sqrt() < 1e-5
    for key, tensor in one_w.items():
        assert (two_w[key] - tensor).norm() <= 1e-4 * tensor.norm(), key
    # held-out greedy evaluation split between the ranks: one process's numbers on the same model
    train.main(RUN + ["--rl_steps=0", f"--warmup_from={two}/warmup", f"--out_dir={same}"])
    evals = [without_wall_clock(r for r in read_metrics(out) if r["phase"] == "eval" and r["step"] == 0)
             for out in (two, same)]
    assert evals[0] == evals[1] and len(evals[0]) == 1
    assert 0 < evals[0][0]["eval_response_length"] < 32  # some replies stop: lengths the split must keep
    # saved by 2 ranks, resumed by 1 (the checkpoint holds no per-rank state)
    train.main(RUN + ["--rl_steps=3", f"--out_dir={two}", "--resume"])
    resumed = read_metrics(two)
    assert resumed[:34] == rows[:34]  # the rows before the checkpoint's step (rl 2) are kept as they were
    assert [(r["phase"], r["step"]) for r in resumed[30:]] == [
        ("eval", 0), ("rl", 0), ("eval", 1), ("rl", 1), ("eval", 2), ("rl", 2), ("eval", 3)]
    assert os.path.isfile(two / "final" / "model.safetensors")


def test_torchrun_fsdp_trains_as_one_process_and_resumes_exactly(tmp_path):
    """--fsdp: each rank holds half of every weight, gradient and AdamW moment; the warm-up, rollouts, updates and
    evaluations are one process's, the saved final/ is a whole Hugging Face model, and a run stopped at RL step 2
    and resumed under FSDP ends where one process's uninterrupted 3-step run ends."""
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    result = torchrun("train.py", RUN + ["--rl_steps=2", "--fsdp=true", f"--out_dir={fsdp}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1/N of the model (FSDP2)" in result.stdout
    result = torchrun("train.py", RUN + ["--rl_steps=3", "--fsdp=true", "--resume", f"--out_dir={fsdp}"])
    assert result.returncode == 0, result.stderr[-3000:]
    train.main(RUN + ["--rl_steps=3", f"--out_dir={one}"])
    want, have = (without_wall_clock(read_metrics(out)) for out in (one, fsdp))
    assert [(r["phase"], r["step"]) for r in have] == [(r["phase"], r["step"]) for r in want]
    for w, h in zip(want, have):
        for key, value in w.items():
            assert h[key] == (value if key == "eval_accuracy" or not isinstance(value, float) else
                              pytest.approx(value, rel=1e-4, abs=1e-6)), f"{w['phase']} {w['step']}: {key}"
    one_w, fsdp_w = (load_safetensors(out / "final" / "model.safetensors") for out in (one, fsdp))
    assert one_w.keys() == fsdp_w.keys()  # whole tensors under the Hugging Face names, not shards
    squared = lambda tensors: sum((t.double() ** 2).sum() for t in tensors)
    assert (squared(one_w[k] - fsdp_w[k] for k in one_w) / squared(one_w.values())).sqrt() < 1e-5
    for key, tensor in one_w.items():
        assert fsdp_w[key].shape == tensor.shape and (fsdp_w[key] - tensor).norm() <= 1e-4 * tensor.norm(), key


def test_fsdp_where_it_cannot_run_stops_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="^error: --fsdp shards the model across torchrun's ranks"):
        train.main(TINY + ["--fsdp=true", f"--out_dir={tmp_path / 'run'}"])
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    for flag in ("--lora_rank=4", "--optimizer_offload=true"):
        with pytest.raises(SystemExit, match="^error: --fsdp is for full fine-tuning with AdamW on the GPUs"):
            train.main(TINY + ["--fsdp=true", flag, f"--out_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match="^error: --compile is not tested with --fsdp's hooks"):
        train.main(TINY + ["--fsdp=true", "--compile=true", f"--out_dir={tmp_path / 'run'}"])
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_a_batch_that_does_not_divide_among_the_ranks_stops_with_one_line(tmp_path, monkeypatch):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # what torchrun sets
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    for flag in ("--prompts_per_step=3", "--warmup_batch_size=5"):
        with pytest.raises(SystemExit) as stop:
            train.main(TINY + [flag, f"--out_dir={out}"])
        assert str(stop.value).startswith(f"error: {flag} does not divide among 2 ranks")
        assert "\n" not in str(stop.value)
    assert not dist.is_initialized() and not out.exists()  # before any work: no process group, no run directory

# -----------------------------------------------------------------------------
# eval.py under torchrun


def test_torchrun_eval_gives_the_results_of_one_process(tmp_path):
    from countdown import Problem, save_problems
    # test_eval's bigram chain: "<answer>2+3</answer>" often enough that 2 3 -> 5 is solved at some k, not always
    follows = {"\n": "<", "a": "n", "n": "s", "s": "w", "w": "e", "e": "r", "r": ">", "2": "+", "+": "3", "3": "<",
               "/": "a"}
    chain = {ch: {nxt: 1.0} for ch, nxt in follows.items()}
    chain.update({"<": {"a": 0.5, "/": 0.5}, ">": {"2": 0.8, "EOS": 0.2}})
    knobs = {"template": "compact", "max_new_tokens": 24}
    a, b = save_model(tmp_path / "a", bigram_model(chain), knobs), save_model(tmp_path / "b", random_model(), knobs)
    save_problems(tmp_path / "p.jsonl", [Problem((2, 3), 5), Problem((3, 2), 5), Problem((2, 3), 6),
                                         Problem((4, 5), 9), Problem((3, 2), 5), Problem((2, 3), 5)])
    # 4 samples per problem, 4 rows per call: 6 sampling calls and 2 greedy calls, split between the ranks
    args = ["--compare", a, b, f"--problems_file={tmp_path / 'p.jsonl'}", "--n_samples=4", "--batch_size=4",
            "--threads=1"]
    result = torchrun("eval.py", args + [f"--out_dir={tmp_path / 'two'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1
    import eval as ev
    ev.main(args + [f"--out_dir={tmp_path / 'one'}"])
    one, two = (json.load(open(tmp_path / d / "results.json")) for d in ("one", "two"))
    assert {k: v for k, v in one.items() if k != "config"} == {k: v for k, v in two.items() if k != "config"}
    assert 0 < one["models"]["a"]["pass_at_k"]["1"] < one["models"]["a"]["pass_at_k"]["4"]  # not all 0 or 1
    assert open(tmp_path / "one" / "generations.jsonl").read() == open(tmp_path / "two" / "generations.jsonl").read()
