"""train.py end to end on tiny models: RL raises the reward, resume after SIGKILL is exact, the --init=qwen
path runs on a tiny Hugging Face layout checkpoint, and the command line parses, type-checks and lists every field."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import countdown
import grpo
import train
from hf_io import load_safetensors, save_hf
from model import ModelConfig, Transformer
from tokenizer import bytes_to_unicode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny from-scratch run on 2-number problems with small numbers: short answers a small model can learn to
# guess better and better, so RL has signal within seconds.
TINY = ["--dim=64", "--n_layers=2", "--n_nums=2", "--num_range=1,9", "--target_range=1,20", "--p_long=0",
        "--warmup_batch_size=8", "--warmup_seq_len=96", "--max_new_tokens=32", "--eval_size=4",
        "--eval_batch_size=16", "--threads=1", "--progress=false", "--seed=3"]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# Command line


def test_overrides_are_typed_and_fill_both_configs():
    overrides = train.parse_args(["--lr=0.5", "--rl_steps=7", "--num_range=2,30", "--n_nums=4", "--progress=false",
                                  "--group_size=3", "--beta=0.01", "--template=chat", "--resume"])
    assert overrides == {"lr": 0.5, "rl_steps": 7, "num_range": (2, 30), "n_nums": (4, 4), "progress": False,
                         "group_size": 3, "beta": 0.01, "template": "chat", "resume": True}
    cfg, gcfg = train.resolve_config(overrides, "cpu")
    assert (cfg.lr, cfg.rl_steps, cfg.num_range, cfg.n_nums) == (0.5, 7, (2, 30), (4, 4))
    assert (gcfg.group_size, gcfg.beta) == (3, 0.01)


def test_qwen_defaults_apply_before_the_command_line(tmp_path):
    cfg, gcfg = train.resolve_config({"init": "qwen", "model_dir": str(tmp_path), "lr": 2e-6}, "cpu")
    assert cfg.lr == 2e-6                                      # the command line wins
    assert cfg.warmup_steps == 0 and gcfg.max_new_tokens == 1024 and cfg.num_range == (1, 99)
    assert cfg.gradient_checkpointing


def test_field_names_are_unique_across_both_configs():
    ours = {f.name for f in dataclasses.fields(train.Config)}
    theirs = {f.name for f in dataclasses.fields(grpo.GRPOConfig)}
    assert not ours & theirs, "a --key would be ambiguous"


@pytest.mark.parametrize("arg, message", [
    ("--lr=fast", "expected float"),
    ("--rl_steps=1.5", "expected int"),
    ("--progress=maybe", "expected bool"),
    ("--num_range=1,x", "comma-separated"),
    ("--warmup_step=3", "did you mean --warmup_steps"),
    ("--no_such_thing=1", "unknown option --no_such_thing"),
    ("lr=1", "expected --key=value"),
])
def test_bad_arguments_get_a_clear_error(arg, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args([arg])


def test_main_turns_bad_input_into_one_line():
    with pytest.raises(SystemExit, match="error: unknown option --lrr; did you mean --lr"):
        train.main(["--lrr=1"])


def test_help_lists_every_field_with_its_default_and_help_and_the_presets(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for cls in (train.Config, grpo.GRPOConfig):
        for f in dataclasses.fields(cls):
            line = next((l for l in text.splitlines() if l.strip().startswith(f"--{f.name}=")), None)
            assert line is not None, f"--help does not list {f.name}"
            assert cli.show(f.default) in line and f.metadata["help"] in line
    presets = " ".join(text.split("Run presets (--run_preset):")[1].split())
    qwen = presets.split("qwen ")[1].split(" gpu ")[0]
    assert "--lr=1e-06" in qwen and "--max_new_tokens=1024" in qwen and "--n_nums=3,4" in qwen


def test_run_preset_is_chosen_by_path_and_can_be_named():
    assert train.resolve_config({}, "cpu")[0].run_preset == "cpu"
    cfg, _ = train.resolve_config({}, "cuda")
    assert cfg.run_preset == "gpu" and cfg.dim == 384
    cfg, gcfg = train.resolve_config({"run_preset": "gpu", "dim": 256}, "cpu")
    assert (cfg.dim, cfg.n_layers, gcfg.micro_batch_size) == (256, 6, 128)   # the command line still wins
    with pytest.raises(ValueError, match="--run_preset=big: choose auto, cpu, qwen, gpu"):
        train.resolve_config({"run_preset": "big"}, "cpu")


def test_the_other_argument_forms():
    assert train.parse_args(["--lr", "0.5", "--num-range", "2", "30", "--resume", "--progress=no"]) == \
        {"lr": 0.5, "num_range": (2, 30), "resume": True, "progress": False}
    with pytest.raises(ValueError, match="--lr needs a value"):
        train.parse_args(["--lr"])


def test_rollout_metrics_by_hand():
    """Two groups of two: rewards 1, 0.1 | 0, 0; one response is truncated (no stop id), one is long."""
    rewards = torch.tensor([1.0, 0.1, 0.0, 0.0])
    texts = ["<think>x</think><answer>1</answer>", "<answer>2</answer>", "", "<answer>"]
    completions = [[1, 2, 9], [3, 9], [9], [4, 4, 4, 4]]
    reasons = ["correct", "wrong_value", "no_answer", "no_answer"]
    m = train.rollout_metrics(rewards, reasons, texts, completions, stop_ids={9}, group_size=2,
                              is_long_form=countdown.is_long_form)
    assert m["reward_mean"] == pytest.approx(1.1 / 4)
    assert m["reward_std"] == pytest.approx(((1 - 0.275) ** 2 + (0.1 - 0.275) ** 2 + 2 * 0.275 ** 2) ** 0.5 / 2)
    assert (m["accuracy"], m["response_length"], m["truncated_frac"]) == (0.25, 2.5, 0.25)
    assert (m["zero_adv_frac"], m["long_frac"]) == (0.5, 0.25)


# -----------------------------------------------------------------------------
# A shortened default run: RL must raise the reward on training problems


def test_rl_raises_training_reward(tmp_path):
    """30 warm-up steps leave the answer format half-learnt (reward 0.1 for any answer tag, 1 if correct);
    20 GRPO steps must raise the mean reward of the fresh training problems well above where RL started."""
    out = str(tmp_path / "run")
    train.main(TINY + [f"--out_dir={out}", "--warmup_steps=30", "--warmup_lr=1e-2", "--rl_steps=20",
                       "--prompts_per_step=8", "--group_size=8", "--lr=3e-3", "--lr_warmup_steps=3",
                       "--eval_every=100", "--save_every=100"])
    rows = read_metrics(out)
    rl = [r for r in rows if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == list(range(20))
    first = sum(r["reward_mean"] for r in rl[:4]) / 4
    last = sum(r["reward_mean"] for r in rl[-4:]) / 4
    assert last > first + 0.04, (first, last)  # ~0.01 -> ~0.08 here; the per-step noise is ~0.005
    evals = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 20] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    for name in ("warmup", "final", "ckpt"):
        assert os.path.isfile(os.path.join(out, name, "model.safetensors"))
        assert json.load(open(os.path.join(out, name, "run_config.json")))["template"] == "compact"


# -----------------------------------------------------------------------------
# Resume after SIGKILL continues exactly


def launch(args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_is_exact(tmp_path):
    common = TINY + ["--warmup_steps=6", "--rl_steps=6", "--prompts_per_step=2", "--group_size=4", "--lr=3e-3",
                     "--eval_every=3", "--save_every=1", "--eval_size=4"]
    kill_resume_and_compare(tmp_path, common)


def test_a_lora_run_resumed_after_sigkill_is_exact_and_saves_merged_weights(tmp_path):
    """--lora_rank: ckpt/ holds merged weights plus the adapters in state.pt; the resumed run rebuilds the frozen
    base (out/warmup) with them and continues exactly. Rewards differ here (as in test_keep_steps...), so the
    adapters move; beta > 0 runs the KL against the base with adapters off."""
    common = TINY + ["--warmup_steps=30", "--warmup_lr=1e-2", "--rl_steps=4", "--prompts_per_step=8",
                     "--group_size=8", "--lr=1e-2", "--eval_every=4", "--save_every=1", "--lora_rank=4", "--beta=0.01"]
    straight, killed = kill_resume_and_compare(tmp_path, common)
    assert any(r.get("kl", 0) > 0 for r in read_metrics(straight))  # the adapters did move the policy
    final = load_safetensors(os.path.join(killed, "final", "model.safetensors"))
    warm = load_safetensors(os.path.join(killed, "warmup", "model.safetensors"))
    assert final.keys() == warm.keys() and not any("lora" in k for k in final)  # a plain Qwen2 directory
    frozen = [k for k in warm if not k.endswith("_proj.weight")]  # embedding, norms, q/k/v biases
    assert frozen and all(torch.equal(final[k], warm[k]) for k in frozen)
    assert not torch.equal(final["model.layers.0.mlp.down_proj.weight"], warm["model.layers.0.mlp.down_proj.weight"])
    state = torch.load(os.path.join(killed, "ckpt", "state.pt"), weights_only=False)
    assert sorted(state["lora"])[:2] == ["layers.0.mlp.down_proj.lora_A", "layers.0.mlp.down_proj.lora_B"]
    with pytest.raises(SystemExit, match="saved with LoRA adapters; resume it with the --lora_rank it was run"):
        train.main(common + [f"--out_dir={killed}", "--resume", "--lora_rank=0"])


def kill_resume_and_compare(tmp_path, common):
    """Run `common` straight through, and again killed (SIGKILL) after RL step 2's checkpoint, then --resume:
    the same metrics rows and final weights. -> the two run directories."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    reference = launch(common + [f"--out_dir={straight}"])
    process = launch(common + [f"--out_dir={killed}"])
    # wait until a checkpoint inside RL exists, then kill without warning (no chance to save)
    state_path, deadline = os.path.join(killed, "ckpt", "state.pt"), time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            state = torch.load(state_path, weights_only=False)
            if state["phase"] == "rl" and state["step"] >= 2:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(killed, "final")), "killed too late"
    resumed = launch(common + [f"--out_dir={killed}", "--resume"])
    for p in (reference, resumed):
        assert p.wait(timeout=180) == 0, p.stderr.read().decode()[-2000:]

    def comparable(out_dir):  # everything but wall-clock timings
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "step_time")}
                for r in read_metrics(out_dir)]
    a, b = comparable(straight), comparable(killed)
    assert [(r["phase"], r["step"]) for r in a] == [(r["phase"], r["step"]) for r in b]
    assert a == b
    weights_a = load_safetensors(os.path.join(straight, "final", "model.safetensors"))
    weights_b = load_safetensors(os.path.join(killed, "final", "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    return straight, killed


# -----------------------------------------------------------------------------
# --init=qwen on a tiny Hugging Face layout checkpoint with Qwen-style tokenizer files


def write_tiny_qwen(directory):
    """A 2-layer Qwen2 checkpoint (model.save_hf) and byte-level BPE files written by hand: vocab.json with the
    256 byte tokens plus two merges, merges.txt, and a tokenizer_config.json naming Qwen's special tokens.
    EOS is <|im_end|>, so the tokenizer counts as instruct and the chat template is chosen."""
    os.makedirs(directory, exist_ok=True)
    unicode_of = bytes_to_unicode()
    vocab = {unicode_of[b]: b for b in range(256)}
    merges = [("a", "n"), ("an", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = {str(len(vocab) + i): {"content": t, "special": True} for i, t in enumerate(specials)}
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    # 272 embedding rows > 261 token ids, like Qwen's padding rows: sampling must respect vocab_limit
    config = ModelConfig(vocab_size=272, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         rope_theta=1e6, max_seq_len=1024, tie_embeddings=True)
    torch.manual_seed(0)
    save_hf(Transformer(config), directory)


def test_qwen_init_runs_end_to_end(tmp_path, capsys):
    model_dir, out = str(tmp_path / "tiny-qwen"), str(tmp_path / "run")
    write_tiny_qwen(model_dir)
    train.main(["--init=qwen", f"--model_dir={model_dir}", f"--out_dir={out}", "--device=cpu", "--rl_steps=2",
                "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--micro_batch_size=2",
                "--eval_size=3", "--eval_every=1", "--threads=1", "--progress=false", "--lr=1e-3"])
    text = capsys.readouterr().out
    assert "memory plan" in text and "largest micro_batch_size that fits" in text
    assert "reference" in text  # beta = 0.001 by default on this path: a reference model is counted
    run_config = json.load(open(os.path.join(out, "final", "run_config.json")))
    assert run_config["template"] == "chat" and run_config["init"] == "qwen" and run_config["warmup_steps"] == 0
    rows = read_metrics(out)
    assert [(r["phase"], r["step"]) for r in rows] == [("eval", 0), ("rl", 0), ("eval", 1), ("rl", 1), ("eval", 2)]
    assert not os.path.exists(os.path.join(out, "warmup"))  # no warm-up phase for a pretrained model
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(out, "final", name)), name


# -----------------------------------------------------------------------------
# The rollouts kept for the training-time analyses (eval.py --analyze)


def test_kept_samples_and_their_analysis(tmp_path):
    import eval as ev
    from rewards import countdown_reward_details
    out = str(tmp_path / "run")
    train.main(TINY + [f"--out_dir={out}", "--warmup_steps=10", "--rl_steps=3", "--prompts_per_step=2",
                       "--group_size=4", "--keep_samples=3", "--eval_every=100", "--save_every=100"])
    with open(os.path.join(out, "samples.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for r in rows:  # each kept rollout carries what the reward made of it
        reward, reason = countdown_reward_details(r["response"], r["problem"]["nums"], r["problem"]["target"])
        assert r["reason"] == reason and r["reward"] == pytest.approx(reward)
    steps = ev.main(["--analyze", out, f"--out_dir={tmp_path / 'analysis'}"])
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        mine = [r for r in rows if r["step"] == s["step"]]
        assert s["n"] == 3 and s["accuracy"] == sum(r["reason"] == "correct" for r in mine) / 3
        assert s["length"] == pytest.approx(sum(r["length"] for r in mine) / 3)
        assert sum(s["reasons"].values()) == pytest.approx(1.0)
        assert s["long_frac"] == sum("</think>" in r["response"] for r in mine) / 3
    logged = {r["step"]: r for r in read_metrics(out) if r["phase"] == "rl"}
    assert [s["entropy"] for s in steps] == [logged[s]["entropy"] for s in range(3)]  # every rollout's, not 3
    assert [s["long_frac_all"] for s in steps] == [logged[s]["long_frac"] for s in range(3)]
    assert all(s["entropy"] > 0 for s in steps)
    assert os.path.isfile(tmp_path / "analysis" / "analysis.json")


def test_keep_steps_saves_the_policy_of_those_rl_steps(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + [f"--out_dir={out}", "--warmup_steps=30", "--warmup_lr=1e-2", "--rl_steps=3",
                       "--prompts_per_step=8", "--group_size=8", "--lr=3e-3", "--keep_steps=0,2", "--eval_every=100",
                       "--save_every=100"])  # as in test_rl_raises_training_reward: rewards differ, RL moves
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_0", "step_2"]
    load = lambda name: load_safetensors(os.path.join(out, name, "model.safetensors"))  # noqa: E731
    step0, warm, step2, final = load("step_0"), load("warmup"), load("step_2"), load("final")
    assert all(torch.equal(step0[k], warm[k]) for k in warm)          # RL step 0 is the warm-up model
    assert not all(torch.equal(step2[k], final[k]) for k in final)   # step 2 is before the last update
    with pytest.raises(SystemExit, match="--keep_steps=a: expected RL step numbers"):
        train.main(TINY + [f"--out_dir={out}", "--keep_steps=a"])


def test_warmup_from_starts_rl_where_the_earlier_run_did(tmp_path):
    """RL from an earlier run's warmup/ is that run's RL: the same rows of metrics and the same final weights."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    rl = ["--rl_steps=2", "--prompts_per_step=4", "--group_size=4", "--lr=3e-3", "--eval_every=100", "--save_every=100"]
    train.main(TINY + [f"--out_dir={first}", "--warmup_steps=20", "--warmup_lr=1e-2"] + rl)
    train.main(TINY + [f"--out_dir={second}", f"--warmup_from={first}/warmup"] + rl)
    rows = [[{k: v for k, v in r.items() if k not in ("time", "step_time", "tokens_per_s")}
             for r in read_metrics(out) if r["phase"] != "warmup"] for out in (first, second)]
    assert rows[0] == rows[1] and len(rows[0]) == 4  # eval at 0, two RL steps, eval at 2
    assert not any(r["phase"] == "warmup" for r in read_metrics(second))
    a, b = (load_safetensors(os.path.join(out, "final", "model.safetensors")) for out in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="that model learned task countdown with .*'num_range': \\(1, 9\\)"):
        train.main(TINY + [f"--out_dir={tmp_path / 'third'}", f"--warmup_from={first}/warmup", "--num_range=1,12"])
    with pytest.raises(SystemExit, match="expected the warmup/ directory of an earlier train.py run"):
        train.main(TINY + [f"--out_dir={tmp_path / 'third'}", f"--warmup_from={tmp_path}"])


def test_the_static_decode_loop_gives_the_same_run(tmp_path, monkeypatch):
    """--decode=static reaches model.generate: the same rollouts, so the same metrics, as the eager loop."""
    import model
    calls, static = [], model.decode_static
    monkeypatch.setattr(model, "decode_static", lambda *a, **k: calls.append(1) or static(*a, **k))
    rl = ["--warmup_steps=10", "--rl_steps=2", "--prompts_per_step=2", "--group_size=4", "--eval_every=100",
          "--save_every=100"]
    rows = []
    for decode in ("eager", "static"):
        out = str(tmp_path / decode)
        train.main(TINY + [f"--out_dir={out}", f"--decode={decode}"] + rl)
        assert len(calls) == (2 if decode == "static" else 0)  # the static run's two rollouts took that loop
        rows.append([{k: v for k, v in r.items() if k not in ("time", "step_time", "tokens_per_s")}
                     for r in read_metrics(out) if r["phase"] == "rl"])
    assert rows[0] == rows[1] and len(rows[0]) == 2
    with pytest.raises(SystemExit, match="--decode=fast: choose eager, static, compiled"):
        train.main(TINY + [f"--out_dir={tmp_path / 'bad'}", "--decode=fast"])
