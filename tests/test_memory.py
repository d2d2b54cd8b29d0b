"""The memory plan (memory.py) against a measurement of the same RL step: LiveBytes counts the storage of every
tensor torch makes, at small shapes on CPU, for fp32 and bf16-mixed, with and without checkpointing, KL and
top-p. And `train.py --dry_run` on a config.json alone."""
import copy
import json
import os
import re

import pytest
import torch

import grpo
import model as model_module
import train
from lora import add_lora, without_adapters
from memory import GiB, LiveBytes, count_lora_params, count_params, plan_rl_step
from model import ModelConfig, Transformer, generate

CONFIG = ModelConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=512)


def test_live_bytes_by_hand():
    with LiveBytes() as live:
        a = torch.randn(1000, 1000)       # 4 MB
        b = a * 2                         # 8 MB live
        view = a[:10]                     # a view makes nothing new
        del b                             # back to 4
        c = a + 1                         # 8 again: the peak stays 8
        a.add_(1)                         # in place: nothing new
    assert live.peak == 8_000_000 and live.now == 8_000_000 and view.shape == (10, 1000) and c.shape == a.shape


def measured_peaks(precision, checkpointing, beta=0.0, top_p=1.0, micro_batch=4, lora_rank=0, decode="eager"):
    """One rollout and one update of 4 prompts x 4 samples, 20 + 60 tokens, each measured by LiveBytes on top of
    the tensors that exist between steps (weights, AdamW state, the reference; for decode static the cache the
    static loop keeps). lora_rank: as train.py does it (frozen Linears in bf16 under bf16-mixed, the reference on the
    same tensors)."""
    gcfg = grpo.GRPOConfig(group_size=4, max_new_tokens=60, micro_batch_size=micro_batch, logprob_chunk=64,
                           beta=beta, top_p=top_p)
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    model.gradient_checkpointing = checkpointing
    if lora_rank:
        add_lora(model, lora_rank, 2.0 * lora_rank, torch.bfloat16 if precision == "bf16-mixed" else None)
        ref_model = without_adapters(model) if beta else None
    else:
        ref_model = copy.deepcopy(model).requires_grad_(False) if beta else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed")
    prompts = [[1 + i] * 20 for i in range(4)]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * 4)

    def rollout():
        with autocast:
            return generate(model, prompts, 60, temperature=1.0, top_p=top_p, seed=0, num_samples=4, decode=decode)

    def batch_of(completions):
        return grpo.micro_batches(grpo.per_row(prompts, 4), completions, rewards, grpo.group_advantages(rewards, 4),
                                  gcfg, pad_id=0, stop_ids=())
    model_module.free_decode_buffers()
    grpo.update(model, optimizer, batch_of(rollout()), gcfg, ref_model, autocast=autocast)  # AdamW state exists
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    kept = model_module._decode_buffers
    between_steps = nbytes(model.parameters()) + 2 * nbytes(trainable) \
        + (nbytes(ref_model.parameters()) if ref_model and not lora_rank else 0) \
        + (nbytes([*kept.keys, *kept.values, kept.key_mask, kept.next_pos]) if kept else 0)  # LoRA shares weights
    with LiveBytes() as live:
        completions = rollout()
    rollout_peak = between_steps + live.peak
    batch = batch_of(completions)
    with LiveBytes() as live:
        grpo.update(model, optimizer, batch, gcfg, ref_model, autocast=autocast)
    plan = plan_rl_step(CONFIG, gcfg, 16, 20, micro_batch, precision=precision, device_type="cpu",
                        checkpointing=checkpointing, lora_rank=lora_rank, decode=decode)
    model_module.free_decode_buffers()
    return plan, rollout_peak, between_steps + live.peak


@pytest.mark.parametrize("precision, checkpointing, beta, top_p, micro_batch, lora_rank, decode", [
    ("fp32", True, 0.0, 1.0, 4, 0, "eager"), ("fp32", False, 0.0, 1.0, 4, 0, "eager"),
    ("bf16-mixed", True, 0.0, 1.0, 4, 0, "eager"), ("bf16-mixed", False, 0.0, 1.0, 4, 0, "eager"),
    ("bf16-mixed", True, 0.01, 0.9, 8, 0, "eager"), ("fp32", True, 0.0, 1.0, 16, 0, "eager"),
    ("bf16-mixed", True, 0.01, 1.0, 4, 8, "eager"), ("fp32", False, 0.0, 1.0, 4, 16, "eager"),
    ("bf16-mixed", True, 0.0, 1.0, 4, 0, "static")])
def test_the_plan_is_within_12_percent_of_the_measured_peaks(precision, checkpointing, beta, top_p, micro_batch,
                                                              lora_rank, decode):
    plan, rollout_peak, update_peak = measured_peaks(precision, checkpointing, beta, top_p, micro_batch, lora_rank,
                                                     decode)
    assert plan.rollout_peak == pytest.approx(rollout_peak, rel=0.12)
    assert plan.update_peak == pytest.approx(update_peak, rel=0.12)


def test_the_plan_of_qwen_3b_by_hand():
    qwen3b = ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768)
    assert count_params(qwen3b) == 3_085_938_688  # Qwen2.5-3B's published count
    gcfg = grpo.GRPOConfig(group_size=8, max_new_tokens=1024, micro_batch_size=8, beta=0.001)
    plan = plan_rl_step(qwen3b, gcfg, 128, 150, 8)
    P = 3_085_938_688
    assert (plan.weights, plan.gradients, plan.optimizer, plan.reference) == (4 * P, 4 * P, 8 * P, 2 * P)
    # K and V: 36 layers x 2 kv heads x 128 dims x 1174 positions x (128 rows + 16 prefill rows) x 2 bytes
    assert plan.kv_cache == 2 * 36 * 256 * 1174 * 144 * 2
    assert 5.7 < plan.cast_weights / GiB < 5.8  # every weight but the norms, once in bf16
    # --decode=compiled: the 16 prompts' prefill cache (150 positions), then the static loop's cache of 128 rows x
    # 1280 positions (1174 rounded up to 19 windows of 64, and one window more), kept between rollouts and so held
    # in the update as well
    static = plan_rl_step(qwen3b, gcfg, 128, 150, 8, decode="compiled")
    assert static.kv_cache == 2 * 36 * 256 * (150 * 16 + 1280 * 128) * 2
    assert static.update_peak - plan.update_peak == static.kept_decode_cache == 2 * 36 * 256 * 1280 * 128 * 2


def test_the_lora_plan_of_qwen_3b_by_hand():
    """Qwen2.5-3B's adapters at rank 16, from its published shapes: per layer q 2048->2048, k and v 2048->256
    (2 kv heads of 128), o 2048->2048, gate and up 2048->11008, down 11008->2048; r (in + out) each, 36 layers."""
    qwen3b = ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768)
    R = 36 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 256) + 2 * (2048 + 11008) + (11008 + 2048))
    assert R == 29_933_568 and count_lora_params(qwen3b, 16) == R
    with torch.device("meta"):  # the real adapters, no memory
        model = add_lora(Transformer(qwen3b), 16, 32.0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == R
    gcfg = grpo.GRPOConfig(group_size=8, max_new_tokens=1024, micro_batch_size=8, beta=0.001)
    plan = plan_rl_step(qwen3b, gcfg, 128, 150, 8, lora_rank=16)
    P = 3_085_938_688
    frozen_linears = 36 * (2048 * (2048 + 2 * 256) + (2048 + 2 * 256) + 2048 * 2048 + 3 * 2048 * 11008)
    # gradients and AdamW's two moments for the float32 adapters only; no second copy for the KL reference
    assert (plan.gradients, plan.optimizer, plan.reference) == (4 * R, 8 * R, 0)
    # the frozen Linears in bf16 (what autocast reads), embedding and norms in float32, the adapters in float32
    assert plan.weights == 2 * frozen_linears + 4 * (P - frozen_linears) + 4 * R
    assert plan.kv_cache == 2 * 36 * 256 * 1174 * 144 * 2  # as in full fine-tuning: rollouts are unchanged
    full = plan_rl_step(qwen3b, gcfg, 128, 150, 8)
    assert plan.saved_activations == full.saved_activations  # backward still runs through every block


def write_config(directory, **changes):
    config = ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768).to_hf()
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_dry_run_plans_qwen_3b_from_config_json_alone(tmp_path, capsys):
    write_config(tmp_path / "qwen")
    with pytest.raises(SystemExit) as stop:
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'qwen'}", "--dry_run", "--gpu_memory_gb=80",
                    f"--out_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and not (tmp_path / "run").exists()  # nothing written, no weights read
    assert "3.09B params" in out and "prompts of 256 tokens" in out and "fits; the largest micro_batch_size" in out
    assert "on a 24 GB card: does not fit" in out and "on a 80 GB card: fits" in out
    with pytest.raises(SystemExit):
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'qwen'}", "--dry_run", "--gpu_memory_gb=24"])
    assert "does NOT fit whatever the batch" in capsys.readouterr().out


def test_dry_run_plans_lora(tmp_path, capsys):
    write_config(tmp_path / "qwen")
    with pytest.raises(SystemExit) as stop:
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'qwen'}", "--dry_run", "--gpu_memory_gb=24",
                    "--lora_rank=16"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "LoRA rank 16: 29.9M trainable" in out
    assert "on a 24 GB card: fits" in out and "reference             0.00 GiB" in out
    with pytest.raises(SystemExit, match="^error: --lora_rank=-1 --lora_alpha=0.0: expected a rank >= 0"):
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'qwen'}", "--dry_run", "--lora_rank=-1"])


def test_dry_run_on_a_bad_config_is_one_line(tmp_path):
    write_config(tmp_path / "llama", model_type="llama")
    with pytest.raises(SystemExit, match="^error: unsupported config.json: model_type='llama'"):
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'llama'}", "--dry_run"])


def test_the_gpu_acceptance_script_runs_end_to_end_at_a_tiny_shape_on_cpu():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "bench.py", "--gpu", "--device=cpu"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in run.stdout.splitlines() if line.count("|") == 4}
    peaks = {name: [float(cell.split()[0]) for cell in cells] for name, cells in rows.items() if "peak" in name}
    for name in ("rollout peak (full fine-tuning)", "update peak (full fine-tuning)", "rollout peak (--lora_rank=16)",
                 "update peak (--lora_rank=16)"):
        planned, measured = peaks[name]
        assert planned == pytest.approx(measured, rel=0.2), name
    # offload takes AdamW's state off the device: planned and measured both drop by it (~8 bytes a weight)
    full, offload = peaks["update peak (full fine-tuning)"], peaks["update peak (--optimizer_offload)"]
    assert full[0] - offload[0] == pytest.approx(full[1] - offload[1], abs=0.11) and full[1] - offload[1] > 2
    assert "KV cache (torch.bfloat16)" in rows and float(rows["2 optimizer steps per batch: clip_frac"][1]) > 0
    # the throughput table's roofline, recomputed from the tiny shape's weights counted by hand: per layer q, o
    # 128 x 128, k, v 64 x 128, gate, up, down 3 x 128 x 352; 2 layers; the tied head 2,048 x 128
    out = run.stdout
    bandwidth, peak = (float(x) * 1e9 for x in re.search(r"copy ([\d.]+) GB/s, matmul ([\d.]+) GFLOP/s", out).groups())
    weights = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 352) + 2048 * 128                 # 630,784
    decode = re.findall(r"^\| (\d+) \| (eager|static) \| \d+ \| [\d.]+ \| ([\d.]+) ms \| ([\d.]+) ms \((\w+)\) \| "
                        r"([\d.]+)% \|$", out, re.M)
    assert sorted((int(b), mode) for b, mode, *_ in decode) == \
        [(1, "eager"), (1, "static"), (4, "eager"), (4, "static")]
    for batch, mode, step_ms, roofline_ms, bound, share in decode:
        batch, context = int(batch), 8 + 8 // 2   # the mean cached length: prompt 8, 8 new tokens
        nbytes = 4 * weights + 4 * 2 * 2 * batch * context * 2 * 32   # float32; K and V, 2 layers, 2 kv heads of 32
        flops = batch * (2 * weights + 4 * 2 * 4 * 32 * context)
        assert float(roofline_ms) == pytest.approx(1e3 * max(nbytes / bandwidth, flops / peak), rel=1e-3)
        assert bound == ("bandwidth" if nbytes / bandwidth > flops / peak else "compute")
        assert float(share) == pytest.approx(100 * float(roofline_ms) / float(step_ms), abs=0.1)
    rate, mfu = re.search(r"\(4 x 64 tokens, forward \+ backward\): (\d+) tokens/s, MFU ([\d.]+)%", out).groups()
    per_token = 6 * weights + 12 * 2 * 4 * 32 * 64   # PaLM's 6 N + 12 L H Q T
    assert float(mfu) == pytest.approx(100 * int(rate) * per_token / peak, rel=1e-3, abs=0.01)


def test_fsdp_plan_holds_a_shard_of_each_term_and_the_gathered_weights(tmp_path, capsys):
    qwen3b = ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768)
    P = 3_085_938_688
    gcfg = grpo.GRPOConfig(group_size=8, max_new_tokens=1024, micro_batch_size=8, beta=0.001)
    ddp, fsdp = (plan_rl_step(qwen3b, gcfg, 64, 150, 8, fsdp_ranks=n) for n in (1, 2))
    # half of the float32 weights, gradients and both moments, and of the bf16 reference, on each of 2 ranks
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer, fsdp.reference) == (2 * P, 2 * P, 4 * P, P)
    # the rollouts gather every weight; the update two units and one unsharded gradient: the largest unit is
    # the root, the 151,936 x 2048 embedding (tied head), bigger than a block's 77M weights
    assert fsdp.gathered_rollout == 4 * P and fsdp.gathered_update == 3 * 151936 * 2048 * 4
    assert ddp.gathered_rollout == ddp.gathered_update == 0 and fsdp.kv_cache == ddp.kv_cache
    assert fsdp.update_peak < ddp.update_peak - 20 * 2**30
    write_config(tmp_path / "qwen")
    with pytest.raises(SystemExit):
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'qwen'}", "--dry_run", "--gpu_memory_gb=48"])
    out = capsys.readouterr().out
    assert "2 GPUs:   64.1 GiB / 41.7 GiB" in out and "8 GPUs:   64.1 GiB / 23.1 GiB" in out
