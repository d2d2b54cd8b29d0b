"""GRPO (Group Relative Policy Optimization) in one file: rollouts, advantages, token log-probs, loss, update.

For every prompt q we sample a group of G completions o_1..o_G from the current policy, score each with a
scalar reward r_i, and push up the log-probability of tokens in better-than-average completions:

    A_i      = (r_i - mean(r_group)) / (std(r_group) + adv_eps)       group-relative advantage (DeepSeekMath)
    rho_i,t  = exp(logp_i,t - old_logp_i,t)                            importance ratio vs the sampling policy
    l_i,t    = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_i,t     PPO clip (+ KL)
    k3_i,t   = exp(ref_logp - logp) - (ref_logp - logp) - 1           Schulman's low-variance KL estimator
    loss     = sum_i,t w_i,t l_i,t                                     w from `loss_agg` (below)

What is ON by default, and the GRPOConfig field that changes each term:
  1. Std-scaled advantages, per group (scale_rewards="group"). "batch" divides by the std of the whole batch
     (Lite PPO); "none" keeps r - mean (Dr. GRPO: no difficulty bias). The std is the population std
     (ddof=0), as in GRPO-Zero and nano-aha-moment; TRL and verl use ddof=1, which shrinks A by
     sqrt((G-1)/G). Population std gives a group's advantages unit RMS, whatever G is.
  2. Token-level aggregation over the whole rollout batch (loss_agg="dapo"): w = 1 / (loss tokens in the
     batch). Every token weighs the same, so there is no length bias; the Countdown anchors (GRPO-Zero,
     nano-aha-moment) and TRL (since v0.22) use it. "grpo" is the paper's per-sequence mean then mean
     (w = 1/(N_seq |o_i|); favours short right answers and long wrong ones); "dr_grpo" uses the constant
     w = 1/(N_seq * max_new_tokens) (no length bias, but the step size then shrinks with response length).
  3. One update per rollout (num_iterations=1). Then old_logp = logp.detach(), the ratio is exactly 1, the
     clip never fires and the loss value is just -sum w A (zero when lengths are equal): this is plain
     REINFORCE with a group-mean baseline, gradient -sum w A grad(logp). Watch reward and grad_norm.
     With num_iterations > 1 old log-probs are computed once before the first update and the clip (clip_eps_low / clip_eps_high; DAPO's clip-higher is 0.28) matters.
  4. No KL term (beta=0.0) and so no reference model at all. beta > 0 needs ref_model and adds beta*k3.
  5. Off: DAPO dynamic sampling (drop_uniform_groups=True drops groups whose rewards are all equal; they
     have A = 0 and would only dilute the token normaliser; nothing is resampled to refill the batch).
  6. Off: DAPO overlong filtering (mask_truncated=True: completions without a stop id get no loss; they
     still count in their group's mean and std). Rows removed by 5 or 6 count in no normaliser.

Known bugs this file avoids:
  - Log-probs, ratios, KL and entropy use log_softmax(logits / temperature) restricted to ids < vocab_limit:
    the distribution that was actually sampled (TRL #4159). top_p is not applied (as in TRL).
  - Normalisers (token count, sequence count) are computed for the whole rollout batch before the
    micro-batch loop, so the loss and the gradient do not depend on micro_batch_size (TRL and verl
    have both normalised per micro-batch at times; TRL PR #6024 fixed one such mis-scaling).
  - The loss includes each completion's stop token, so the model learns to stop.
Token log-probs never materialise a float32 [B, T, V]: logits are made logprob_chunk tokens at a time
and recomputed in backward (activation checkpointing), so the [N, V] logits are never all alive at once.

Use: completions = rollout(model, prompts, cfg, stop_ids, vocab_limit, seed)
     metrics = grpo_step(model, optimizer, prompts, completions, rewards, cfg, pad_id, stop_ids,
                         ref_model=None, correct=None, vocab_limit=vocab_limit)
Shapes: B rows (sequences), T tokens per row, P prompt columns, L completion columns, C model dim,
V vocab, N loss tokens, G group size.
"""
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from model import generate


@dataclass
class GRPOConfig:
    group_size: int = 8              # G completions per prompt
    temperature: float = 1.0         # sampling temperature; log-probs are computed at this temperature too
    top_p: float = 1.0               # nucleus sampling for rollouts (training log-probs ignore it, as TRL)
    max_new_tokens: int = 480        # completion budget (train.py's longest demonstration: 459); dr_grpo's constant
    clip_eps_low: float = 0.2        # ratio clipped below at 1 - clip_eps_low
    clip_eps_high: float = 0.2       # ratio clipped above at 1 + clip_eps_high (DAPO clip-higher: 0.28)
    beta: float = 0.0                # KL (k3) coefficient; 0 = no reference model
    scale_rewards: str = "group"     # "group" | "batch" | "none": what std divides r - mean(group)
    adv_eps: float = 1e-4            # added to the std so that uniform groups give A = 0, not 0/0
    loss_agg: str = "dapo"           # "dapo" | "grpo" | "dr_grpo": how per-token losses are averaged
    num_iterations: int = 1          # optimizer steps per rollout batch (PPO epochs, mu)
    micro_batch_size: int = 8        # rows per forward/backward; does not change the result, only memory
    max_grad_norm: float = 1.0       # clip the global grad norm to this; 0 disables clipping
    drop_uniform_groups: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal
    mask_truncated: bool = False     # DAPO overlong filtering: no loss on completions without a stop id
    logprob_chunk: int = 512         # tokens per chunk of the chunked log-softmax ([chunk, V] float32 alive)

    def __post_init__(self):
        choices = {"scale_rewards": ("group", "batch", "none"), "loss_agg": ("dapo", "grpo", "dr_grpo")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs >= 2 completions per prompt")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: RL samples need temperature > 0")
        for name in ("max_new_tokens", "num_iterations", "micro_batch_size", "logprob_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)} must be >= 1")


def rollout(model, prompts, cfg, stop_ids, vocab_limit=None, seed=None):
    """Sample cfg.group_size completions per prompt -> list of len(prompts)*G token lists, grouped
    contiguously (prompt 0's G rows first). Each row keeps its first stop id, if it produced one."""
    with torch.no_grad():
        return generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p, stop_ids=stop_ids, seed=seed, num_samples=cfg.group_size,
                        vocab_limit=vocab_limit)


def group_advantages(rewards, group_size, scale_rewards="group", eps=1e-4):
    """rewards [N] (groups contiguous) -> advantages [N]. Std is the population std (ddof=0)."""
    grouped = rewards.view(-1, group_size)                               # [N/G, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)                # GRPO baseline: the group mean
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, correction=0, keepdim=True) + eps)   # DeepSeekMath eq. (outcome)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std(correction=0) + eps)            # Lite PPO: one std for the batch
    return centred.reshape(-1)                                           # "none": Dr. GRPO, r - mean


def _chunk_logprobs(hidden, weight, targets, temperature):
    """hidden [n, C], weight [V, C], targets [n] -> (log-prob of target [n], entropy [n] detached)."""
    logits = (hidden @ weight.T).float() / temperature                  # [n, V] the sampled distribution
    logsumexp = torch.logsumexp(logits, dim=-1)                          # [n]
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - logsumexp   # log_softmax at the target
    with torch.no_grad():
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(-1)   # H = lse - E_p[logit]
    return logprobs, entropy


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=512):
    """hidden [N, C], weight [V, C], targets [N] -> (logprobs [N] float32, entropy [N] float32).
    Equal to log_softmax(hidden @ weight.T / temperature).gather(targets), chunk_size tokens at a time.
    Each chunk is checkpointed: backward recomputes its [chunk, V] logits instead of storing them."""
    pieces = [checkpoint(_chunk_logprobs, hidden[i:i + chunk_size], weight, targets[i:i + chunk_size],
                         temperature, use_reentrant=False) for i in range(0, targets.numel(), chunk_size)]
    if not pieces:  # no tokens at all
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def build_batch(prompts, completions, pad_id, device="cpu"):
    """One row per (prompt, completion) pair: left-padded prompt, then completion, then right padding.
    -> tokens [B, P+L], attention_mask [B, P+L] (1 = real), completion_mask [B, L] bool, P.
    Every completion starts at column P, so completion token j is predicted by the hidden state at P-1+j."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: GRPO needs at least one prompt token to predict the first completion token")
    P, L = max(len(p) for p in prompts), max(max(len(c) for c in completions), 1)
    tokens = torch.full((len(prompts), P + L), pad_id, dtype=torch.long)              # [B, P+L]
    attention_mask = torch.zeros(len(prompts), P + L, dtype=torch.long)              # [B, P+L]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, P - len(p):P + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, P - len(p):P + len(c)] = 1
    completion_mask = attention_mask[:, P:].bool()                                   # [B, L]
    return tokens.to(device), attention_mask.to(device), completion_mask.to(device), P


def completion_logprobs(model, tokens, attention_mask, completion_mask, prompt_len, temperature,
                        vocab_limit=None, chunk_size=512):
    """-> (logprobs [B, L], entropy [B, L]), zero where completion_mask is False."""
    hidden = model.hidden_states(tokens, attention_mask=attention_mask)               # [B, T, C]
    hidden = hidden[:, prompt_len - 1:-1]                                             # [B, L, C] predicts col P+j
    targets = tokens[:, prompt_len:]                                                  # [B, L]
    weight = model.lm_head.weight[:vocab_limit]                                       # [V, C] sampled ids only
    flat_logprobs, flat_entropy = token_logprobs(hidden[completion_mask], weight, targets[completion_mask],
                                                 temperature, chunk_size)            # [N], [N]
    logprobs = flat_logprobs.new_zeros(completion_mask.shape)                         # [B, L]
    logprobs[completion_mask] = flat_logprobs
    entropy = flat_entropy.new_zeros(completion_mask.shape)                           # [B, L]
    entropy[completion_mask] = flat_entropy
    return logprobs, entropy


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_eps_low, clip_eps_high):
    """logprobs, old_logprobs [B, L]; advantages [B] -> (per-token loss [B, L], clip active [B, L] bool)."""
    ratio = torch.exp(logprobs - old_logprobs)                                        # rho = pi / pi_old
    A = advantages[:, None]                                                           # [B, 1]
    clipped_ratio = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    loss = -torch.minimum(ratio * A, clipped_ratio * A)                               # PPO clip (Schulman 2017)
    # the clipped branch is the minimum (and has zero gradient) exactly in these two cases
    clipped = ((A > 0) & (ratio > 1 + clip_eps_high)) | ((A < 0) & (ratio < 1 - clip_eps_low))
    return loss, clipped


def k3_kl(logprobs, ref_logprobs):
    """Per-token KL(pi || pi_ref) estimate k3 = exp(x) - x - 1 with x = ref_logp - logp (Schulman 2020)."""
    x = ref_logprobs - logprobs
    return torch.exp(x) - x - 1


def token_loss_weights(lengths, loss_agg, max_new_tokens):
    """lengths: loss tokens of every row of the WHOLE rollout batch -> per-token weight of each row, so that
    loss = sum over rows and tokens of weight * l, however the rows are later split into micro-batches."""
    num_rows, num_tokens = len(lengths), sum(lengths)
    if loss_agg == "dapo":     # DAPO: sum over all tokens / tokens in the batch
        return [1.0 / num_tokens for _ in lengths]
    if loss_agg == "grpo":     # DeepSeekMath: mean over each sequence's tokens, then mean over sequences
        return [1.0 / (num_rows * n) for n in lengths]
    return [1.0 / (num_rows * max_new_tokens) for _ in lengths]    # Dr. GRPO: sum / (N_seq * L_max)


def grpo_step(model, optimizer, prompts, completions, rewards, cfg, pad_id, stop_ids, ref_model=None,
              correct=None, vocab_limit=None):
    """One GRPO update from one rollout batch. prompts: the distinct prompts; completions/rewards/correct:
    len(prompts) * G rows grouped as rollout() returns them. Runs cfg.num_iterations optimizer steps
    (each: all micro-batches' backward, grad clip, optimizer.step()). Returns a dict of metrics; kl is
    0.0 without a ref_model; "skipped" is 1 when no step was taken (non-finite loss/grad, or no rows left)."""
    G, stop_ids = cfg.group_size, set(stop_ids)
    if len(completions) != len(prompts) * G or len(rewards) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts, {len(completions)} completions, {len(rewards)} rewards; "
                         f"expected len(completions) == len(rewards) == len(prompts) * group_size ({G})")
    if not prompts or (correct is not None and len(correct) != len(completions)):
        raise ValueError("need at least one prompt, and one `correct` flag per completion when given")
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError("rewards contain NaN/inf; fix the reward function (GRPO needs finite scalars)")
    if cfg.beta > 0 and ref_model is None:
        raise ValueError(f"beta={cfg.beta} > 0 needs ref_model (a frozen copy of the initial policy)")
    # the loss covers each completion up to and including its first stop id; no stop id = truncated
    ends = [next((j + 1 for j, t in enumerate(c) if t in stop_ids), len(c)) for c in completions]
    completions = [list(c[:n]) for c, n in zip(completions, ends)]
    truncated = [len(c) == 0 or c[-1] not in stop_ids for c in completions]
    if max(len(c) for c in completions) > cfg.max_new_tokens:
        raise ValueError(f"a completion is longer than max_new_tokens={cfg.max_new_tokens}; use the same "
                         f"GRPOConfig for rollout() and grpo_step()")
    if vocab_limit is not None and max(max(c, default=0) for c in completions) >= vocab_limit:
        raise ValueError(f"a completion holds an id >= vocab_limit={vocab_limit}; pass the vocab_limit "
                         f"that rollout() sampled with")
    rewards_t = torch.tensor(rewards, dtype=torch.float32)                            # [N]
    advantages = group_advantages(rewards_t, G, cfg.scale_rewards, cfg.adv_eps)      # [N]
    uniform = (rewards_t.view(-1, G).amax(1) == rewards_t.view(-1, G).amin(1))        # [N/G] all-equal groups
    metrics = {
        "reward_mean": rewards_t.mean().item(), "reward_std": rewards_t.std(correction=0).item(),
        "accuracy": sum(map(bool, correct)) / len(correct) if correct is not None
                    else (rewards_t == 1.0).float().mean().item(),
        "response_length": sum(map(len, completions)) / len(completions),
        "truncated_frac": sum(truncated) / len(truncated), "zero_adv_frac": uniform.float().mean().item(),
        "loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "num_tokens": 0,
        "skipped": 0}

    # choose the rows that get a loss: dynamic sampling and overlong filtering remove whole rows
    keep = [i for i in range(len(completions)) if len(completions[i]) > 0
            and not (cfg.drop_uniform_groups and uniform[i // G])
            and not (cfg.mask_truncated and truncated[i])]
    if not keep:
        metrics["skipped"] = 1
        return metrics
    # normalisers from the WHOLE batch, fixed before any micro-batching (the loss is a plain sum below)
    weights = dict(zip(keep, token_loss_weights([len(completions[i]) for i in keep], cfg.loss_agg,
                                                cfg.max_new_tokens)))
    # similar lengths in the same micro-batch waste less compute on padding
    keep.sort(key=lambda i: len(prompts[i // G]) + len(completions[i]))
    device = model.lm_head.weight.device
    micro_batches = []
    for start in range(0, len(keep), cfg.micro_batch_size):
        rows = keep[start:start + cfg.micro_batch_size]
        tokens, attention_mask, completion_mask, P = build_batch(
            [prompts[i // G] for i in rows], [completions[i] for i in rows], pad_id, device)
        mb = dict(tokens=tokens, attention_mask=attention_mask, completion_mask=completion_mask, P=P,
                  advantages=advantages[rows].to(device),                                       # [b]
                  weights=completion_mask * torch.tensor([weights[i] for i in rows], device=device)[:, None])
        micro_batches.append(mb)

    def logprobs_of(m, mb):  # -> (logprobs [b, L], entropy [b, L]) under the sampling temperature
        return completion_logprobs(m, mb["tokens"], mb["attention_mask"], mb["completion_mask"], mb["P"],
                                   cfg.temperature, vocab_limit, cfg.logprob_chunk)

    with torch.no_grad():
        for mb in micro_batches:
            # pi_old is the policy that sampled: frozen once, before the first of several updates
            mb["old"] = logprobs_of(model, mb)[0] if cfg.num_iterations > 1 else None
            mb["ref"] = logprobs_of(ref_model, mb)[0] if ref_model is not None else None

    num_tokens = sum(int(mb["completion_mask"].sum()) for mb in micro_batches)
    metrics["num_tokens"] = num_tokens
    optimizer.zero_grad(set_to_none=True)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    # sums stay on the device: one host sync per iteration (the grad norm), not several per micro-batch
    totals = {name: torch.zeros((), device=device) for name in ("loss", "clip_frac", "kl", "entropy")}
    grad_norms = []
    for iteration in range(cfg.num_iterations):
        for mb in micro_batches:
            logprobs, entropy = logprobs_of(model, mb)
            # with one update, old == current: ratio exactly 1, gradient = REINFORCE's -A grad(logp)
            old = mb["old"] if mb["old"] is not None else logprobs.detach()
            loss_tokens, clipped = clipped_policy_loss(logprobs, old, mb["advantages"], cfg.clip_eps_low,
                                                       cfg.clip_eps_high)                      # [b, L]
            if mb["ref"] is not None:
                kl = k3_kl(logprobs, mb["ref"])                                            # [b, L]
                loss_tokens = loss_tokens + cfg.beta * kl
                totals["kl"] += (kl.detach() * mb["completion_mask"]).sum() / num_tokens
            loss = (loss_tokens * mb["weights"]).sum()    # this micro-batch's exact share of the batch loss
            loss.backward()
            totals["loss"] += loss.detach()
            totals["clip_frac"] += (clipped & mb["completion_mask"]).sum() / num_tokens
            totals["entropy"] += (entropy * mb["completion_mask"]).sum() / num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)   # norm before clipping
        grad_norms.append(grad_norm.item())
        if not (math.isfinite(grad_norms[-1]) and torch.isfinite(totals["loss"]).item()):
            optimizer.zero_grad(set_to_none=True)   # never let NaN/inf reach the weights
            metrics["skipped"] = 1
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, total in totals.items():              # per-iteration averages
        metrics[name] = total.item() / len(grad_norms)
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics
