"""The CUDA path's precision and input handling, proven on CPU: CPU bf16 autocast has the same cast cache as CUDA
autocast (a leaf weight's bf16 copy is kept until the outermost autocast block exits; under inference_mode it
is not kept at all), so each test here fails on the code the GPU audit read (issue 14, items 1-3 and 6-8)."""
import copy
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import countdown
import grpo
import model as model_module
import train
from hf_io import load_qwen, save_hf
from model import ModelConfig, Transformer, generate, inverse_cdf
from test_train import write_tiny_qwen

CONFIG = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


class WeightCasts(TorchDispatchMode):
    """Counts dtype conversions (aten.to, aten._to_copy) whose input is the storage of one of the given parameters."""

    def __init__(self, params):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr(): name for name, p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and isinstance(args[0], torch.Tensor) \
                and args[0].untyped_storage().data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


class DtypesMade(TorchDispatchMode):
    """Records the dtype of every tensor an op returns."""

    def __enter__(self):
        self.dtypes = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes |= {t.dtype for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor)}
        return out


def rollout_batch(model, cfg, seed=0):
    torch.manual_seed(seed)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    completions = generate(model, prompts, cfg.max_new_tokens, temperature=1.0, seed=seed, num_samples=cfg.group_size)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * len(prompts))[:len(completions)]  # signal in every group
    advantages = grpo.group_advantages(rewards, cfg.group_size)
    return grpo.micro_batches(grpo.per_row(prompts, cfg.group_size), completions, rewards, advantages, cfg,
                              pad_id=0, stop_ids=())


# --- item 1: several optimizer steps on one rollout batch under bf16 autocast


def test_every_step_under_bf16_autocast_uses_the_weights_the_step_before_wrote():
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=6, num_iterations=3, clip_eps_low=0.01, clip_eps_high=0.01,
                          micro_batch_size=5)
    torch.manual_seed(0)
    start = Transformer(CONFIG)

    def three_steps(how):
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
        batch = rollout_batch(model, cfg)
        if how == "per forward":  # the fix: update enters autocast around each forward
            metrics = grpo.update(model, optimizer, batch, cfg, autocast=bf16())
        else:
            # the reference: no cast cache at all, so every use casts the weights as they are now; or the audited
            # code path: one cached block around all three steps
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=how == "one block"):
                metrics = grpo.update(model, optimizer, batch, cfg)
        return metrics, torch.cat([p.detach().flatten() for p in model.parameters()])

    metrics, weights = three_steps("per forward")
    reference_metrics, reference_weights = three_steps("no cache")
    stale_metrics, stale_weights = three_steps("one block")
    assert metrics["clip_frac"] > 0.05  # steps 2 and 3 see the moved weights, so the ratio leaves [0.99, 1.01]
    assert metrics["clip_frac"] == pytest.approx(reference_metrics["clip_frac"], abs=1e-6)
    torch.testing.assert_close(weights, reference_weights, rtol=0, atol=1e-6)
    assert (stale_weights - reference_weights).abs().max() > 1e-3  # what the test guards against


# --- items 2 and 3: the rollout's KV cache and weight casts under bf16 autocast


def test_the_kv_cache_is_bf16_under_autocast(monkeypatch):
    made = []

    class RecordingCache(model_module.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(model_module, "KVCache", RecordingCache)
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with bf16():
        generate(model, [[1, 2, 3], [4]], max_new_tokens=4, temperature=0)
    generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0)
    assert [c.keys[0].dtype for c in made] == [torch.bfloat16, torch.float32]
    assert all(k.dtype == torch.bfloat16 for k in made[0].keys + made[0].values)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_decode_steps_do_not_cast_the_weights_again(top_p):
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    params = list(model.named_parameters())

    def casts(max_new_tokens):
        with bf16(), WeightCasts(params) as counter:
            rows = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens, temperature=1.0, top_p=top_p, seed=0)
        assert all(len(r) == max_new_tokens for r in rows)  # no stop ids: every step ran
        return counter.count

    short, long = casts(2), casts(12)
    assert short == long  # each weight is cast once per autocast block, not once per decode step
    assert short <= len(params)


def test_the_chunked_log_probs_cast_the_output_weights_once():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 12))
    completion_mask = torch.ones(3, 8, dtype=torch.bool)
    head = [("lm_head.weight", model.lm_head.weight)]
    with WeightCasts(head) as counter:
        with bf16():
            logprobs, _ = grpo.completion_logprobs(model, tokens, None, completion_mask, 4, 1.0, chunk_size=4)
        logprobs.sum().backward()  # each of the 6 chunks is recomputed in backward
    assert counter.count == 1
    # and the values are the plain log-softmax of the same bf16 product
    with bf16():
        logits = model(tokens)[:, 3:-1].float()
    expected = logits.log_softmax(-1).gather(-1, tokens[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.detach(), expected, rtol=0, atol=2e-2)

# --- item 6: the sampler without float64 (Apple's MPS), and clamped exponentials


def test_inverse_cdf_in_float32_picks_what_float64_picks_and_never_a_zero_mass_id():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 3000, generator=generator) ** 4
    probs[:, ::3] = 0.0  # masked ids
    u = torch.rand(64, 1, generator=generator, dtype=torch.float64)
    picks64 = inverse_cdf(probs, u)
    with DtypesMade() as made:
        picks32 = inverse_cdf(probs, u.float())
    assert torch.float64 not in made.dtypes  # what Apple's MPS lacks
    assert torch.equal(picks32, picks64)
    # brute force: the first id whose cumulative mass exceeds u * total
    cdf = probs.double().cumsum(-1)
    assert torch.equal(picks64, (cdf <= u * cdf[:, -1:]).sum(-1, keepdim=True))
    edge = torch.full((64, 1), 1 - 2**-24)  # the largest float32 below 1: must not run past the last real id
    assert (probs.gather(-1, inverse_cdf(probs, edge)) > 0).all()


def test_far_drifted_log_ratios_keep_the_loss_and_kl_finite():
    logprobs = torch.tensor([[-0.5, -30.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.7, -0.1, -100.0]])  # log-ratios 0.2, -29.9, +100
    loss, clipped = grpo.clipped_policy_loss(logprobs, old, torch.tensor([-1.0]), 0.2, 0.2)
    kl = grpo.k3_kl(logprobs, old)
    (loss.sum() + kl.sum()).backward()
    assert torch.isfinite(loss).all() and torch.isfinite(kl).all() and torch.isfinite(logprobs.grad).all()
    # in range the formulas are untouched: exp(0.2) * 1 and k3 = e^-0.2 + 0.2 - 1 by hand
    assert loss[0, 0].item() == pytest.approx(1.2214027, rel=1e-6)
    assert kl[0, 0].item() == pytest.approx(0.8187308 + 0.2 - 1, rel=1e-5)

# --- item 6: a CUDA device with an index is still CUDA


def test_cuda_with_an_index_counts_as_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.pick_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        cli.pick_device("cuda:2")
    cfg, _ = train.resolve_config({}, "cuda:1")
    assert cfg.run_preset == "gpu"

# --- item 7: a model loaded from a Qwen directory knows which rows are real ids


def test_a_loaded_qwen_model_never_samples_its_padding_rows(tmp_path):
    write_tiny_qwen(tmp_path)
    n_ids = len(json.load(open(tmp_path / "vocab.json"))) + 3  # 258 tokens + 3 added specials, ids 0..260
    model = load_qwen(tmp_path)
    assert model.config.vocab_size == 272 and model.vocab_limit == n_ids
    with torch.no_grad():
        model.lm_head.weight[n_ids:] = 50.0 * model.norm.weight.sign()  # padding rows would win every draw
    rows = generate(model, [[1, 2, 3]], 20, temperature=1.0, top_p=0.95, seed=0, num_samples=8)
    assert max(max(r) for r in rows) < n_ids
    tokens = torch.tensor([[1, 2, 3] + rows[0][:5]])
    logprobs, _ = grpo.completion_logprobs(model, tokens, None, torch.ones(1, 5, dtype=torch.bool), 3, 1.0)
    with torch.no_grad():
        expected = model(tokens)[0, 2:-1, :n_ids].log_softmax(-1).gather(-1, tokens[0, 3:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs[0].detach(), expected)
    os.remove(tmp_path / "vocab.json")  # no tokenizer beside the weights: every row counts
    os.remove(tmp_path / "merges.txt")
    os.remove(tmp_path / "tokenizer_config.json")
    assert load_qwen(tmp_path).vocab_limit == 272

# --- item 8: bad input to train.py is one line and a non-zero exit, before any work, and loses nothing


def broken_qwen(directory, how):
    write_tiny_qwen(directory)
    if how == "truncated weights":
        path = os.path.join(directory, "model.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif how == "llama config":
        config = json.load(open(os.path.join(directory, "config.json")))
        json.dump({**config, "model_type": "llama"}, open(os.path.join(directory, "config.json"), "w"))
    elif how == "missing shard":
        save_hf(load_qwen(directory), directory, max_shard_bytes=20_000)
        shards = sorted(f for f in os.listdir(directory) if f.startswith("model-0"))
        assert len(shards) > 2
        os.remove(os.path.join(directory, shards[1]))
    elif how == "no config.json":
        os.remove(os.path.join(directory, "config.json"))


@pytest.mark.parametrize("how, message", [
    ("truncated weights", "file is truncated"), ("llama config", "model_type='llama'"),
    ("missing shard", "shard 'model-00002-of-"), ("no config.json", "no config.json")])
def test_a_broken_qwen_directory_is_one_line_before_any_work(tmp_path, how, message):
    broken_qwen(tmp_path / "model", how)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"phase": "rl", "step": 0}\n')  # an earlier run's log
    with pytest.raises(SystemExit) as stop:
        train.main(["--init=qwen", f"--model_dir={tmp_path / 'model'}", f"--out_dir={out}", "--device=cpu"])
    assert str(stop.value).startswith("error: ") and message in str(stop.value) and "\n" not in str(stop.value)
    assert (out / "metrics.jsonl").read_text() == '{"phase": "rl", "step": 0}\n'


@pytest.mark.parametrize("args, message", [
    (["--device=foo"], "--device=foo: expected auto, cpu, cuda, cuda:N or mps"),
    (["--device=cuda:0"] if not torch.cuda.is_available() else ["--device=cuda:999"], "--device=cuda"),
    (["--eval_size=100000000"], "100000000 held-out problems asked")])
def test_bad_device_or_eval_size_is_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit) as stop:
        train.main([f"--out_dir={tmp_path}"] + args)
    assert str(stop.value).startswith("error: ") and message in str(stop.value)


def test_the_held_out_size_check_never_refuses_a_size_that_exists():
    # brute force: every (multiset of 3 numbers in 1..20, target in 1..100) and its hash bucket
    import itertools
    space = list(itertools.combinations_with_replacement(range(1, 21), 3))
    assert len(space) == 1540  # C(22, 3)
    in_test = sum(countdown.problem_bucket(nums, t) < countdown.TEST_BUCKETS for nums in space for t in range(1, 101))
    knobs = dict(n_nums=3, num_range=(1, 20), target_range=(1, 100))
    bound = 154_000 * countdown.TEST_BUCKETS / countdown.N_BUCKETS * 1.1 + 100
    assert in_test < bound  # what exists (solvable or not) is never refused
    with pytest.raises(ValueError, match="held-out problems asked, but at this difficulty only ~7700 exist"):
        countdown.test_set(int(bound) + 1, **knobs)

# --- issue 15, item 2: masked grouped-query attention without the math kernel's GQA fallback


def reference_attention(q, k, v, attn_mask):
    """The textbook form: each query head h reads kv head h // G, softmax(q k^T / sqrt(D) + mask) v."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~attn_mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("T, cached", [(9, 0), (1, 12), (4, 6)])  # training / prefill, decode, chunk after a cache
def test_folded_grouped_query_attention_equals_the_textbook_form(T, cached):
    generator = torch.Generator().manual_seed(T)
    B, H, H_kv, D = 3, 8, 2, 16
    q = torch.randn(B, H, T, D, generator=generator)
    k, v = (torch.randn(B, H_kv, cached + T, D, generator=generator) for _ in range(2))
    real = torch.rand(B, cached + T, generator=generator) > 0.3
    real[:, -T:] = True
    q_cols, k_cols = torch.arange(cached, cached + T)[:, None], torch.arange(cached + T)[None]
    attn_mask = ((k_cols <= q_cols)[None] & real[:, None])[:, None]          # (B, 1, T, T_k)
    expected = reference_attention(q, k, v, attn_mask)
    folded = model_module.grouped_query_attention(q, k, v, attn_mask, False, fold=True)
    plain = model_module.grouped_query_attention(q, k, v, attn_mask, False, fold=False)
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)


def test_the_folded_path_gives_the_same_ragged_rollouts_and_log_probs(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]  # ragged: every forward has a padding mask
    before = generate(model, prompts, 12, temperature=0.8, seed=3, num_samples=2)
    tokens = torch.randint(1, CONFIG.vocab_size, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :4] = False
    logits_before = model(tokens, attention_mask=mask)
    plain = model_module.grouped_query_attention
    monkeypatch.setattr(model_module, "grouped_query_attention",
                        lambda q, k, v, attn_mask, is_causal, fold: plain(q, k, v, attn_mask, is_causal, fold=True))
    assert generate(model, prompts, 12, temperature=0.8, seed=3, num_samples=2) == before
    torch.testing.assert_close(model(tokens, attention_mask=mask)[mask], logits_before[mask], rtol=0, atol=1e-5)
