"""--optimizer_offload (offload.OffloadedAdamW): the same AdamW steps as torch.optim.AdamW on the same gradients
(lr changed through param_groups, weight decay, a parameter without gradient), a state that resumes in either
optimizer, the same train.py run with and without it, and a memory plan without AdamW's state on the GPU."""
import pytest
import torch

import grpo
import train
from hf_io import load_safetensors
from memory import offload_host_bytes, plan_rl_step
from model import ModelConfig, Transformer
from offload import OffloadedAdamW
from test_memory import write_config
from test_train import TINY, read_metrics


def gradient_steps(optimizer, model, steps, seed=0):
    """`steps` optimizer steps on made-up gradients (the same for any optimizer), lr lowered half-way."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            if name != "norm.weight":  # one parameter without a gradient: AdamW skips it, and so must offload
                p.grad = torch.randn(p.shape, generator=g) * 1e-2
        if step == steps // 2:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
        optimizer.step()


def test_offloaded_adamw_takes_torch_adamws_steps_and_shares_its_state():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16)
    plain, offloaded = Transformer(config), Transformer(config)
    offloaded.load_state_dict(plain.state_dict())
    kw = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    opt_plain = torch.optim.AdamW(plain.parameters(), **kw)
    opt_off = OffloadedAdamW(offloaded.parameters(), **kw)
    gradient_steps(opt_plain, plain, 6)
    gradient_steps(opt_off, offloaded, 6)
    for (name, a), b in zip(plain.named_parameters(), offloaded.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(offloaded.norm.weight, torch.ones(16))  # no gradient: not even weight decay touched it
    assert not torch.equal(offloaded.layers[0].input_layernorm.weight, torch.ones(16))
    # the state of either resumes in the other, and the runs stay equal
    resumed_plain = torch.optim.AdamW(offloaded.parameters(), **kw)
    resumed_plain.load_state_dict(opt_off.state_dict())
    opt_off2 = OffloadedAdamW(plain.parameters(), **kw)
    opt_off2.load_state_dict(opt_plain.state_dict())
    gradient_steps(resumed_plain, offloaded, 2, seed=1)
    gradient_steps(opt_off2, plain, 2, seed=1)
    for (name, a), b in zip(plain.named_parameters(), offloaded.parameters()):
        assert torch.equal(a, b), name
    assert opt_off.inner.state[opt_off.host_params[0]]["exp_avg"].device.type == "cpu"


def test_a_run_with_optimizer_offload_is_the_run_without(tmp_path):
    # the warm-up and RL both step the offloaded AdamW; KL and two iterations make every loss term move
    args = TINY + ["--warmup_steps=30", "--warmup_lr=1e-2", "--rl_steps=3", "--prompts_per_step=4",
                   "--group_size=4", "--lr=3e-3", "--beta=0.02", "--num_iterations=2", "--eval_every=3"]
    runs = {}
    for name, flags in (("plain", []), ("offload", ["--optimizer_offload=true"])):
        out = tmp_path / name
        train.main(args + flags + [f"--out_dir={out}"])
        runs[name] = ([{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "step_time")}
                       for r in read_metrics(out)], load_safetensors(out / "final" / "model.safetensors"))
    (rows, weights), (rows_off, weights_off) = runs["plain"], runs["offload"]
    assert rows == rows_off and any(r.get("kl", 0) > 0 for r in rows)  # RL moved the policy off the reference
    for key in weights:
        assert torch.equal(weights[key], weights_off[key]), key


def test_the_plan_with_offload_drops_adamw_state_and_fits_3b_full_fine_tuning_on_48_gb(tmp_path, capsys):
    qwen3b = ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768)
    P = 3_085_938_688
    gcfg = grpo.GRPOConfig(group_size=8, max_new_tokens=1024, micro_batch_size=8, beta=0.001)
    full, off = (plan_rl_step(qwen3b, gcfg, 128, 150, 8, optimizer_offload=o) for o in (False, True))
    assert full.optimizer == 8 * P and off.optimizer == 0  # two float32 moments per weight, by hand
    assert full.update_peak - off.update_peak == 8 * P and full.gradients == off.gradients == 4 * P
    assert offload_host_bytes(qwen3b) == 16 * P  # float32 copy, two moments, pinned gradients
    write_config(tmp_path / "qwen")
    for flags, verdict in (([], "on a 48 GB card: does not fit"), (["--optimizer_offload=true"],
                                                                    "on a 48 GB card: fits")):
        with pytest.raises(SystemExit):
            train.main(["--init=qwen", f"--model_dir={tmp_path / 'qwen'}", "--dry_run", "--gpu_memory_gb=48"]
                       + flags)
        out = capsys.readouterr().out
        assert verdict in out
    assert "AdamW on the host (46.0 GiB of host memory)" in out
