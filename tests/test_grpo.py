"""Tests for grpo.py: every formula against hand-worked numbers or a plain, unchunked recomputation.

Most tests use TinyLM, a stand-in with the model.py interface (hidden_states + lm_head.weight) that is
exactly padding-invariant, so batch layout cannot hide errors; the last tests use the real Transformer.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import grpo
from grpo import GRPOConfig
from model import generate

STOP, PAD, VOCAB = 10, 0, 11


class TinyLM(nn.Module):
    """Causal stand-in: hidden state at t = tanh(mix(masked mean of embeddings up to t) + embedding at t)."""

    def __init__(self, seed=0, vocab=VOCAB, dim=8):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.vocab_limit = vocab  # the ids the sampler may draw (Transformer has it too)
        self.poison = 1.0  # set to NaN to make every output non-finite

    def hidden_states(self, tokens, kv_cache=None, attention_mask=None):
        x = self.embed_tokens(tokens)                                        # [B, T, C]
        m = torch.ones_like(tokens) if attention_mask is None else attention_mask
        m = m[..., None].to(x.dtype)
        mean = (x * m).cumsum(1) / m.cumsum(1).clamp(min=1)                  # padding never enters
        return torch.tanh(self.mix(mean) + x) * self.poison


# two distinct prompts, G = 4, unequal completion lengths; rows 2 and 5 have no stop id (truncated)
PROMPTS = [[1, 2, 3], [4, 5]]
COMPLETIONS = [[1, 2, STOP], [3, STOP], [4, 5, 6, 7], [2, STOP],
               [5, 5, STOP], [6, 7, 8, 9, 1], [STOP], [3, 3, 3, STOP]]
REWARDS = [1.0, 0.0, 0.1, 1.0, 0.0, 1.0, 0.0, 0.0]


def grpo_step(model, optimizer, prompts, completions, rewards, cfg, ref_model=None, vocab_limit=None):
    """train.py's RL step from rewards on: advantages, micro-batches, update."""
    G, rewards = cfg.group_size, torch.tensor(rewards, dtype=torch.float32)
    advantages = grpo.group_advantages(rewards, G, cfg.scale_rewards, cfg.adv_eps)
    batch = grpo.micro_batches(grpo.per_row(prompts, G), completions, rewards, advantages, cfg, PAD, [STOP])
    return grpo.update(model, optimizer, batch, cfg, ref_model, vocab_limit)


def run_step(model=None, prompts=PROMPTS, completions=COMPLETIONS, rewards=REWARDS, ref_model=None, **cfg_kwargs):
    """One GRPO step with plain SGD(lr=1) and no grad clipping: -(weight change) == the gradient."""
    model = model if model is not None else TinyLM()
    cfg = GRPOConfig(**{"group_size": 4, "max_new_tokens": 6, "max_grad_norm": 0.0, **cfg_kwargs})
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = grpo_step(model, opt, prompts, completions, rewards, cfg, ref_model=ref_model)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return metrics, before - after


def test_group_advantages_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    eps = 1e-4
    # group 1: mean 0.5, population std 0.5; group 2 is uniform, so its A is 0 in every mode
    group = grpo.group_advantages(rewards, 4, "group", eps)
    a = 0.5 / (0.5 + eps)
    assert torch.allclose(group, torch.tensor([a, -a, a, -a, 0, 0, 0, 0]), atol=1e-7)
    # batch: mean 1.25; squared deviations .0625*2 + 1.5625*2 + .5625*4 = 5.5; var 5.5/8 = .6875
    batch = grpo.group_advantages(rewards, 4, "batch", eps)
    b = 0.5 / (math.sqrt(0.6875) + eps)
    assert torch.allclose(batch, torch.tensor([b, -b, b, -b, 0, 0, 0, 0]), atol=1e-7)
    none = grpo.group_advantages(rewards, 4, "none", eps)
    assert torch.allclose(none, torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]))
    # ddof=0 (population std): one success in four has mean .25, var (.5625 + 3*.0625)/4 = .1875,
    # so A = .75/sqrt(.1875) = sqrt(3) (Bessel's ddof=1 would give .75/.5 = 1.5)
    one_of_four = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, "group", eps=0.0)
    assert torch.allclose(one_of_four, torch.tensor([3 ** 0.5, -(3 ** -0.5), -(3 ** -0.5), -(3 ** -0.5)]))


def aggregate(logprobs, old, advantages, lengths, loss_agg, max_new_tokens, eps=(0.2, 0.2)):
    mask = torch.arange(logprobs.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    loss, _ = grpo.clipped_policy_loss(logprobs, old, advantages, *eps)
    w = torch.tensor(grpo.token_loss_weights(lengths, loss_agg, max_new_tokens))[:, None] * mask
    return (loss * w).sum()


@pytest.mark.parametrize("loss_agg", ["dapo", "grpo", "dr_grpo"])
def test_ratio_one_loss_is_minus_mean_advantage_equal_lengths(loss_agg):
    logprobs = -torch.rand(3, 5)
    advantages = torch.tensor([1.5, -0.5, 2.0])
    loss = aggregate(logprobs, logprobs.detach(), advantages, [5, 5, 5], loss_agg, max_new_tokens=5)
    assert torch.allclose(loss, -advantages.mean())


def test_ratio_one_aggregation_unequal_lengths_by_hand():
    # lengths 1 and 3, A = (2, -1), max_new_tokens 4, all ratios 1 so every token's loss is -A
    logprobs = -torch.rand(2, 3)
    A, lengths = torch.tensor([2.0, -1.0]), [1, 3]
    by_hand = {"dapo": -(1 * 2 + 3 * -1) / 4,               # token mean over 4 tokens: 0.25
               "grpo": -(2 + -1) / 2,                        # per-sequence mean then mean: -0.5
               "dr_grpo": -(1 * 2 + 3 * -1) / (2 * 4)}       # sum / (2 sequences * 4): 0.125
    for loss_agg, expected in by_hand.items():
        assert aggregate(logprobs, logprobs.detach(), A, lengths, loss_agg, 4).item() == pytest.approx(expected)


def test_clip_zeroes_gradient_exactly_where_formula_says():
    # (ratio, A, clipped?) with eps_low 0.2, eps_high 0.28 (asymmetric, DAPO clip-higher)
    cases = [(1.5, 1.0, True), (1.5, -1.0, False), (0.5, 1.0, False), (0.5, -1.0, True),
             (1.1, 1.0, False), (1.1, -1.0, False), (1.25, 1.0, False), (1.3, 1.0, True),
             (0.79, -1.0, True), (0.81, -1.0, False), (0.79, 1.0, False)]
    ratios = torch.tensor([[c[0] for c in cases]])
    A = torch.tensor([c[1] for c in cases])
    old = -torch.rand(1, len(cases))
    logprobs = (old + ratios.log()).requires_grad_()
    # one case per row (advantages are per row), each row one token long
    loss, clipped = grpo.clipped_policy_loss(logprobs.view(-1, 1), old.view(-1, 1), A, 0.2, 0.28)
    loss.sum().backward()
    expected_clipped = torch.tensor([c[2] for c in cases])
    assert torch.equal(clipped.view(-1), expected_clipped)
    # unclipped: d(-rho A)/d logp = -rho A; clipped: the constant branch, gradient exactly 0
    expected_grad = torch.where(expected_clipped, torch.zeros(()), -ratios.view(-1) * A)
    assert torch.allclose(logprobs.grad.view(-1), expected_grad, atol=1e-6)
    assert (logprobs.grad.view(-1)[expected_clipped] == 0).all()
    # loss values: clipped tokens pay the clipped ratio, e.g. -(1.28 * 1) and -(0.8 * -1)
    assert loss.view(-1)[0].item() == pytest.approx(-1.28)
    assert loss.view(-1)[3].item() == pytest.approx(0.8)


def test_k3_kl():
    logprobs = -torch.rand(4, 6)
    assert torch.equal(grpo.k3_kl(logprobs, logprobs), torch.zeros(4, 6))
    other = logprobs - torch.rand(4, 6) * 2 + 0.5
    assert (grpo.k3_kl(logprobs, other) > 0).all()
    # pi = 0.5, pi_ref = 0.25: x = log 0.5, k3 = 0.5 - log 0.5 - 1 = 0.19315
    value = grpo.k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert value.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-7)


def test_chunked_token_logprobs_match_plain_log_softmax():
    torch.manual_seed(1)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (13,))
    T = 0.7
    logprobs, entropy = grpo.token_logprobs(hidden, weight, targets, temperature=T, chunk_size=4)  # 4+4+4+1
    plain = torch.log_softmax(hidden @ weight.T / T, dim=-1)                   # [N, V]
    expected = plain.gather(-1, targets[:, None]).squeeze(-1)
    assert (logprobs - expected).abs().max() < 1e-5
    assert (entropy - -(plain.exp() * plain).sum(-1)).abs().max() < 1e-5
    # temperature really is applied: T=1 differs
    unscaled = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    assert (logprobs - unscaled).abs().max() > 1e-2
    # the checkpointed backward gives the plain gradient
    g = torch.randn(13)
    grads = torch.autograd.grad((logprobs * g).sum(), (hidden, weight))
    plain_grads = torch.autograd.grad((expected * g).sum(), (hidden, weight))
    for a, b in zip(grads, plain_grads):
        assert (a - b).abs().max() < 1e-5
    assert not entropy.requires_grad


def test_chunked_token_logprobs_keep_no_logits_for_backward():
    """The point of chunking + recompute: autograd stores the inputs (hidden, weight, targets), never the
    [N, V] float32 logits (the bytes saved for backward are counted per storage)."""
    N, V, C = 64, 1000, 8
    hidden, weight = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grpo.token_logprobs(hidden, weight, targets, chunk_size=16)
    inputs_bytes = (N * C + V * C) * 4 + N * 8
    assert sum(saved.values()) <= inputs_bytes < N * V * 4


def test_build_batch_masks_and_completion_logprobs_ignore_padding():
    model = TinyLM(vocab=13)   # ids 11, 12 play Qwen's padding rows: never sampled, cut by vocab_limit
    prompts, completions = [[1, 2, 3], [4]], [[5, STOP], [6, 7, 8, STOP]]
    tokens, attention_mask, completion_mask, P = grpo.build_batch(prompts, completions, PAD)
    assert P == 3
    assert tokens.tolist() == [[1, 2, 3, 5, STOP, PAD, PAD], [PAD, PAD, 4, 6, 7, 8, STOP]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert completion_mask.tolist() == [[True, True, False, False], [True, True, True, True]]  # stop included
    logprobs, _ = grpo.completion_logprobs(model, tokens, attention_mask, completion_mask, P, 0.5,
                                           vocab_limit=11, chunk_size=3)
    for i, (p, c) in enumerate(zip(prompts, completions)):   # each row alone, no padding, full log_softmax
        row = torch.tensor([p + c])
        logits = model.lm_head(model.hidden_states(row))[0, len(p) - 1:-1, :11] / 0.5
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        assert (logprobs[i, :len(c)] - expected).abs().max() < 1e-5
        assert (logprobs[i, len(c):] == 0).all()


def reinforce_grad(model, prompts, completions, advantages, weights, temperature):
    """Independent gradient of -sum_i w_i A_i sum_t logp_i,t, one unpadded row at a time."""
    model.zero_grad()
    total = 0.0
    for i, c in enumerate(completions):
        p = prompts[i // 4]
        logits = model.lm_head(model.hidden_states(torch.tensor([p + c])))[0, len(p) - 1:-1] / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).sum()
        total = total - weights[i] * advantages[i] * logp
    total.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return grad


def test_one_iteration_is_reinforce_with_group_baseline():
    """With num_iterations=1 the ratio is exactly 1: loss ~ 0, no clipping, gradient = REINFORCE's."""
    model = TinyLM()
    advantages = grpo.group_advantages(torch.tensor(REWARDS), 4).tolist()
    expected = reinforce_grad(copy.deepcopy(model), PROMPTS, COMPLETIONS, advantages,
                              [1 / 24] * 8, temperature=0.7)          # dapo: 24 completion tokens in total
    metrics, update = run_step(model, temperature=0.7, micro_batch_size=3)
    assert torch.allclose(update, expected, atol=1e-6)
    # every token's loss is -A (ratio 1); the token mean weights each row's A by its length
    loss_by_hand = -sum(len(c) * a for c, a in zip(COMPLETIONS, advantages)) / 24
    assert metrics["loss"] == pytest.approx(loss_by_hand, rel=1e-5)
    assert metrics["clip_frac"] == 0 and metrics["num_tokens"] == 24
    assert metrics["skipped"] == 0 and metrics["grad_norm"] == pytest.approx(expected.norm().item(), rel=1e-5)


@pytest.mark.parametrize("loss_agg", ["dapo", "grpo", "dr_grpo"])
def test_micro_batching_does_not_change_loss_or_gradient(loss_agg):
    """TRL/verl bug: per-micro-batch normalisers made the result depend on the split. Unequal lengths,
    two iterations (so old log-probs and the clip are exercised), and a KL term against a reference."""
    ref = TinyLM(seed=1)
    results = [run_step(TinyLM(), ref_model=ref, loss_agg=loss_agg, micro_batch_size=mbs, num_iterations=2,
                        beta=0.1, clip_eps_low=0.01, clip_eps_high=0.01) for mbs in (8, 3, 1)]
    (m0, u0) = results[0]
    assert m0["clip_frac"] > 0 and m0["kl"] > 0   # the clip and KL paths really ran
    for m, u in results[1:]:
        assert torch.allclose(u, u0, atol=1e-6)
        for key in ("loss", "clip_frac", "kl", "entropy", "grad_norm"):
            assert m[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key


def test_drop_uniform_groups():
    rewards = [1.0, 0.0, 0.1, 1.0, 0.5, 0.5, 0.5, 0.5]        # group 2 is uniform: A = 0
    assert grpo.uniform_groups(torch.tensor(rewards), 4).tolist() == [False, True]
    metrics_keep, update_keep = run_step(rewards=rewards)
    metrics_drop, update_drop = run_step(rewards=rewards, drop_uniform_groups=True)
    assert metrics_keep["num_tokens"] == 24 and metrics_drop["num_tokens"] == 11
    # dapo: group 2 adds no gradient, only tokens to the normaliser -> update scales by 24 / 11
    assert torch.allclose(update_drop, update_keep * 24 / 11, atol=1e-6)
    # all groups uniform and dropped: no step at all
    metrics, update = run_step(rewards=[0.0] * 8, drop_uniform_groups=True)
    assert metrics["skipped"] == 1 and metrics["num_tokens"] == 0 and (update == 0).all()


def test_mask_truncated():
    """Rows 2 and 5 have no stop id: with mask_truncated their tokens carry no loss, so what they
    contain cannot change the update (they still shape their groups' advantages)."""
    other = [list(c) for c in COMPLETIONS]
    other[2], other[5] = [9, 9], [1, 1, 1]
    masked_a, update_a = run_step(mask_truncated=True)
    masked_b, update_b = run_step(completions=other, mask_truncated=True)
    assert masked_a["num_tokens"] == 24 - 4 - 5
    assert [grpo.is_truncated(c, {STOP}) for c in COMPLETIONS] == [False, False, True, False,
                                                                   False, True, False, False]
    assert torch.allclose(update_a, update_b, atol=1e-7)
    _, plain_a = run_step()
    _, plain_b = run_step(completions=other)
    assert not torch.allclose(plain_a, plain_b, atol=1e-4)


def test_non_finite_loss_skips_step_and_keeps_weights():
    model = TinyLM()
    model.poison = float("nan")
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = GRPOConfig(group_size=4, max_new_tokens=6)
    metrics = grpo_step(model, opt, PROMPTS, COMPLETIONS, REWARDS, cfg)
    assert metrics["skipped"] == 1 and not math.isfinite(metrics["loss"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert len(opt.state) == 0 and all(p.grad is None for p in model.parameters())


def test_per_row_layout_and_bad_inputs():
    assert grpo.per_row(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    with pytest.raises(ValueError, match="group_size"):
        run_step(completions=COMPLETIONS[:7], rewards=REWARDS[:7])
    with pytest.raises(ValueError, match="NaN"):
        run_step(rewards=REWARDS[:7] + [float("nan")])
    with pytest.raises(ValueError, match="ref_model"):
        run_step(beta=0.1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_step(max_new_tokens=4)
    with pytest.raises(ValueError, match="loss_agg"):
        GRPOConfig(loss_agg="bnpo")


# ----------------------------------------------------------------------------- the real Transformer

def tiny_transformer(seed=0):
    model_module = pytest.importorskip("model")
    torch.manual_seed(seed)
    config = model_module.ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                      max_seq_len=64)
    return model_module.Transformer(config)


def test_transformer_left_padding_and_micro_batching_give_the_same_update():
    """Prompts of different lengths are left-padded differently in each micro-batch split."""
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]
    completions = COMPLETIONS + [[9, 9, STOP], [STOP], [4, 4], [5, STOP]]
    rewards = REWARDS + [1.0, 0.0, 0.0, 0.1]
    updates = [run_step(tiny_transformer(), prompts, completions, rewards, micro_batch_size=mbs,
                        loss_agg="grpo", num_iterations=2, temperature=0.8)[1] for mbs in (12, 5, 1)]
    assert updates[0].abs().max() > 1e-4
    for update in updates[1:]:
        assert torch.allclose(update, updates[0], atol=1e-6)


def rollout(model, prompts, cfg, seed):
    return generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    stop_ids=[STOP], seed=seed, num_samples=cfg.group_size, vocab_limit=12)


def test_rollout_rows_follow_per_row_layout():
    """generate(num_samples=G) returns rows in per_row's layout: row i continues prompts[i // G]. Checked by
    greedy decoding (all G samples of a prompt then agree) of two prompts with different continuations."""
    model = tiny_transformer()
    cfg = GRPOConfig(group_size=4, max_new_tokens=5, temperature=1.0)
    prompts = [[1, 2, 3], [4, 5]]
    completions = rollout(model, prompts, cfg, seed=3)
    assert len(completions) == 8
    assert all(1 <= len(c) <= 5 and max(c) < 12 for c in completions)
    assert all(len(c) == 5 or c[-1] == STOP for c in completions)   # stopped rows keep their stop id
    assert completions == rollout(model, prompts, cfg, seed=3)
    greedy = generate(model, prompts, 5, temperature=0.0, stop_ids=[STOP], num_samples=4, vocab_limit=12)
    alone = [generate(model, [p], 5, temperature=0.0, stop_ids=[STOP], vocab_limit=12)[0] for p in prompts]
    assert alone[0] != alone[1]
    assert greedy == grpo.per_row(alone, 4)


def test_grpo_learns_a_toy_task():
    """End to end: reward 1 if the completion contains token 7. Rollout + grpo_step for 25 steps must raise
    the share of such completions from about 1/5 to almost always."""
    model = tiny_transformer()
    cfg = GRPOConfig(group_size=8, max_new_tokens=4, micro_batch_size=16, num_iterations=2)
    prompts = [[1, 2], [3], [4, 5, 6], [2, 2]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def success_rate(seed):
        samples = rollout(model, prompts * 8, cfg, seed=seed)
        return sum(7 in c for c in samples) / len(samples)

    before = success_rate(seed=1000)
    for step in range(25):
        completions = rollout(model, prompts, cfg, seed=step)
        rewards = [float(7 in c) for c in completions]
        metrics = grpo_step(model, optimizer, prompts, completions, rewards, cfg, vocab_limit=12)
        assert metrics["skipped"] == 0
    after = success_rate(seed=1000)
    print(f"toy task success rate {before:.2f} -> {after:.2f}")
    assert after > max(0.9, before + 0.3), (before, after)
