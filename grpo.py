"""GRPO (Group Relative Policy Optimization) in one file: advantages, micro-batches, token log-probs, loss, update.

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
     With num_iterations > 1 old log-probs are computed once before the first update and the clip
     (clip_eps_low / clip_eps_high; DAPO's clip-higher is 0.28) matters.
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
    Under torchrun they count every rank's rows, so the gradients summed over ranks do not depend on the
    number of ranks either.
  - The loss includes each completion's stop token, so the model learns to stop.
  - Token log-probs never materialise the float32 [N, V] logits (token_logprobs: chunks, recomputed in backward).

train.py's RL loop shows the use: group_advantages, then micro_batches, then update (backward + optimizer.step).
Shapes: N rollout rows, B rows of one micro-batch, T tokens per row, P prompt columns, L completion columns,
C model dim, V vocab, G group size.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

import distributed
from cli import opt
from model import compute_dtype


@dataclass
class GRPOConfig:
    group_size: int = opt(8, "G completions per prompt")
    temperature: float = opt(1.0, "sampling temperature; log-probs are computed at this temperature too")
    top_p: float = opt(1.0, "nucleus sampling for rollouts (training log-probs ignore it, as TRL)")
    max_new_tokens: int = opt(480, "completion budget of every sampled or demonstrated reply; dr_grpo's L_max")
    clip_eps_low: float = opt(0.2, "ratio clipped below at 1 - clip_eps_low")
    clip_eps_high: float = opt(0.2, "ratio clipped above at 1 + clip_eps_high (DAPO clip-higher: 0.28)")
    beta: float = opt(0.0, "KL (k3) coefficient; 0 = no reference model")
    scale_rewards: str = opt("group", "group | batch | none: what std divides r - mean(group)")
    adv_eps: float = opt(1e-4, "added to the std so that uniform groups give A = 0, not 0/0")
    loss_agg: str = opt("dapo", "dapo | grpo | dr_grpo: how per-token losses are averaged")
    num_iterations: int = opt(1, "optimizer steps per rollout batch (PPO epochs, mu)")
    micro_batch_size: int = opt(8, "rows per forward/backward; does not change the result, only memory")
    max_grad_norm: float = opt(1.0, "clip the global grad norm to this; 0 disables clipping")
    drop_uniform_groups: bool = opt(False, "DAPO dynamic sampling: drop groups whose rewards are all equal")
    mask_truncated: bool = opt(False, "DAPO overlong filtering: no loss on completions without a stop id")
    logprob_chunk: int = opt(512, "tokens per chunk of the chunked log-softmax ([chunk, V] float32 alive)")

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

# -----------------------------------------------------------------------------
# 1. Groups and advantages


def per_row(items, group_size):
    """One item per rollout row, in the layout model.generate(..., num_samples=G) defines: prompt 0's G rows,
    then prompt 1's, and so on, so row i belongs to items[i // G]."""
    return [item for item in items for _ in range(group_size)]


def group_advantages(rewards, group_size, scale_rewards="group", eps=1e-4):
    """rewards [N] (rows in per_row's layout) -> advantages [N]. Std is the population std (ddof=0)."""
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards: expected len(prompts) * group_size ({group_size}), one per "
                         f"rollout row")
    grouped = rewards.view(-1, group_size)                               # [N/G, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)                # GRPO baseline: the group mean
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, correction=0, keepdim=True) + eps)   # DeepSeekMath eq. (outcome)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std(correction=0) + eps)            # Lite PPO: one std for the batch
    return centred.reshape(-1)                                           # "none": Dr. GRPO, r - mean


def uniform_groups(rewards, group_size):
    """rewards [N] -> [N/G] bool: the groups whose rewards are all equal (A = 0 for every row)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(1) == grouped.amin(1)


def is_truncated(completion, stop_ids):
    """A completion that ran out of budget: it does not end with a stop id (generate keeps the stop id)."""
    return len(completion) == 0 or completion[-1] not in stop_ids

# -----------------------------------------------------------------------------
# 2. The rollout batch, cut into micro-batches


def token_loss_weights(lengths, loss_agg, max_new_tokens, num_rows=None, num_tokens=None):
    """lengths: loss tokens of every row of the WHOLE rollout batch -> per-token weight of each row, so that
    loss = sum over rows and tokens of weight * l, however the rows are later split into micro-batches. With data
    parallelism lengths are this rank's rows, and num_rows, num_tokens those of all ranks together (the batch)."""
    num_rows = len(lengths) if num_rows is None else num_rows
    num_tokens = sum(lengths) if num_tokens is None else num_tokens
    if loss_agg == "dapo":     # DAPO: sum over all tokens / tokens in the batch
        return [1.0 / num_tokens for _ in lengths]
    if loss_agg == "grpo":     # DeepSeekMath: mean over each sequence's tokens, then mean over sequences
        return [1.0 / (num_rows * n) for n in lengths]
    return [1.0 / (num_rows * max_new_tokens) for _ in lengths]    # Dr. GRPO: sum / (N_seq * L_max)


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


@dataclass
class MicroBatch:
    tokens: torch.Tensor            # [B, P+L] prompt (left-padded) + completion (right-padded)
    attention_mask: torch.Tensor    # [B, P+L] 1 = real token
    completion_mask: torch.Tensor   # [B, L] True = a loss token (the stop id included)
    prompt_len: int                 # P: completion token j sits at column P + j
    advantages: torch.Tensor        # [B] A_i of each row
    weights: torch.Tensor           # [B, L] w_i,t of every loss token (0 elsewhere), from the whole batch
    old_logprobs: torch.Tensor = None   # [B, L] pi_old, frozen by update() when num_iterations > 1
    ref_logprobs: torch.Tensor = None   # [B, L] pi_ref, by update() when there is a reference model
    filler: bool = False                # FSDP: a one-token row of zero weight, so every rank runs as many passes


def micro_batches(row_prompts, completions, rewards, advantages, cfg, pad_id, stop_ids, device="cpu",
                  world=distributed.SINGLE):
    """The rows that get a loss, cut into micro-batches of cfg.micro_batch_size rows. row_prompts,
    completions: one per rollout row (per_row's layout); rewards, advantages: [N]. Dynamic sampling and overlong
    filtering (the GRPOConfig switches) remove whole rows; normalisers come from the rows kept, before any split.
    Under torchrun (world) these are this rank's rows, whole groups, and the normalisers count the rows kept on
    every rank: the ranks' losses then add up to the loss of the whole batch."""
    if not len(row_prompts) == len(completions) == len(rewards) == len(advantages):
        raise ValueError(f"got {len(row_prompts)} prompt rows, {len(completions)} completions, {len(rewards)} "
                         f"rewards: expected one of each per rollout row")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf; fix the reward function (GRPO needs finite scalars)")
    if max(map(len, completions)) > cfg.max_new_tokens:
        raise ValueError(f"a completion is longer than max_new_tokens={cfg.max_new_tokens}; sample with the same "
                         f"GRPOConfig you train with")
    uniform = uniform_groups(rewards, cfg.group_size)                                  # [N/G]
    keep = [i for i, c in enumerate(completions) if len(c) > 0
            and not (cfg.drop_uniform_groups and uniform[i // cfg.group_size])
            and not (cfg.mask_truncated and is_truncated(c, stop_ids))]
    lengths = [len(completions[i]) for i in keep]
    num_rows, num_tokens = world.sum([len(lengths), sum(lengths)])   # over all ranks: the batch's normalisers
    weights = dict(zip(keep, token_loss_weights(lengths, cfg.loss_agg, cfg.max_new_tokens, int(num_rows),
                                                int(num_tokens))))
    keep.sort(key=lambda i: len(row_prompts[i]) + len(completions[i]))  # similar lengths: less padding
    batch = []
    for start in range(0, len(keep), cfg.micro_batch_size):
        rows = keep[start:start + cfg.micro_batch_size]
        tokens, attention_mask, completion_mask, P = build_batch(
            [row_prompts[i] for i in rows], [completions[i] for i in rows], pad_id, device)
        row_weights = torch.tensor([weights[i] for i in rows], device=device)[:, None]     # [B, 1]
        batch.append(MicroBatch(tokens, attention_mask, completion_mask, P, advantages[rows].to(device),
                                completion_mask * row_weights))
    if world.fsdp:  # each forward and backward is a collective there: as many micro-batches on every rank
        tokens, attention_mask, completion_mask, P = build_batch([[pad_id]], [[pad_id]], pad_id, device)
        filler = MicroBatch(tokens, attention_mask, completion_mask, P, torch.zeros(1, device=device),
                            torch.zeros(1, 1, device=device), filler=True)   # its loss is 0, its gradient zeros
        batch += [filler] * (world.max(len(batch)) - len(batch))
    return batch

# -----------------------------------------------------------------------------
# 3. Token log-probabilities of the sampled completions


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


def completion_logprobs(model, tokens, attention_mask, completion_mask, prompt_len, temperature,
                        vocab_limit=None, chunk_size=512):
    """-> (logprobs [B, L], entropy [B, L]), zero where completion_mask is False. Ids < vocab_limit
    (model.vocab_limit when None) only: the ids the sampler can draw."""
    hidden = model.hidden_states(tokens, attention_mask=attention_mask)               # [B, T, C]
    hidden = hidden[:, prompt_len - 1:-1]                                             # [B, L, C] predicts col P+j
    targets = tokens[:, prompt_len:]                                                  # [B, L]
    # [V', C] the sampled ids only, cast once here (bf16 under autocast) rather than once per chunk and again in
    # each chunk's recompute: autocast caches casts of whole weights, not of a slice
    weight = model.lm_head.weight[:vocab_limit or model.vocab_limit].to(compute_dtype(model))
    flat_logprobs, flat_entropy = token_logprobs(hidden[completion_mask], weight, targets[completion_mask],
                                                 temperature, chunk_size)            # [N], [N]
    logprobs = flat_logprobs.new_zeros(completion_mask.shape)                         # [B, L]
    logprobs[completion_mask] = flat_logprobs
    entropy = flat_entropy.new_zeros(completion_mask.shape)                           # [B, L]
    entropy[completion_mask] = flat_entropy
    return logprobs, entropy

# -----------------------------------------------------------------------------
# 4. The loss and the update


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_eps_low, clip_eps_high):
    """logprobs, old_logprobs [B, L]; advantages [B] -> (per-token loss [B, L], clip active [B, L] bool)."""
    # rho = pi / pi_old; the log-ratio clamped to +-20 (as verl), so a far-drifted token cannot overflow exp
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20, 20))
    A = advantages[:, None]                                                           # [B, 1]
    clipped_ratio = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    loss = -torch.minimum(ratio * A, clipped_ratio * A)                               # PPO clip (Schulman 2017)
    # the clipped branch is the minimum (and has zero gradient) exactly in these two cases
    clipped = ((A > 0) & (ratio > 1 + clip_eps_high)) | ((A < 0) & (ratio < 1 - clip_eps_low))
    return loss, clipped


def k3_kl(logprobs, ref_logprobs):
    """Per-token KL(pi || pi_ref) estimate k3 = exp(x) - x - 1 with x = ref_logp - logp (Schulman 2020)."""
    x = (ref_logprobs - logprobs).clamp(-20, 20)  # as verl: a finite KL when the policy has drifted very far
    return torch.exp(x) - x - 1


def policy_loss(model, mb, cfg, vocab_limit=None):
    """One micro-batch's exact share of the batch loss, sum_i,t w_i,t l_i,t (the docstring's equations)
    -> (loss, {clip_frac, kl, entropy}: sums over its loss tokens, detached)."""
    logprobs, entropy = completion_logprobs(model, mb.tokens, mb.attention_mask, mb.completion_mask,
                                            mb.prompt_len, cfg.temperature, vocab_limit, cfg.logprob_chunk)
    # with one update per rollout, old == current: ratio exactly 1, gradient = REINFORCE's -A grad(logp)
    old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
    loss_tokens, clipped = clipped_policy_loss(logprobs, old, mb.advantages, cfg.clip_eps_low,
                                               cfg.clip_eps_high)                                  # [B, L]
    kl = torch.zeros((), device=logprobs.device)
    if mb.ref_logprobs is not None:
        kl = k3_kl(logprobs, mb.ref_logprobs)                                                      # [B, L]
        loss_tokens = loss_tokens + cfg.beta * kl
    loss = (loss_tokens * mb.weights).sum()
    mask = mb.completion_mask
    return loss, {"clip_frac": (clipped & mask).sum(), "kl": (kl.detach() * mask).sum(),
                  "entropy": (entropy * mask).sum()}


def update(model, optimizer, batch, cfg, ref_model=None, vocab_limit=None, autocast=contextlib.nullcontext(),
           world=distributed.SINGLE):
    """cfg.num_iterations optimizer steps on one rollout batch, each: every micro-batch's loss.backward(), the
    gradient summed over ranks (world; nothing in one process), then grad clipping and optimizer.step(). A
    non-finite loss or gradient is never applied. -> metrics of the whole batch (all ranks): loss, clip_frac, kl,
    entropy, grad_norm (averaged over the steps taken), num_tokens, skipped (1 = no step).
    autocast (e.g. torch.autocast(device, torch.bfloat16)) is entered around each forward pass, never around a
    step: autocast keeps its bf16 copy of each weight until its outermost block exits, so a block around
    optimizer.step() would run every later step on the weights as they were before it."""
    if cfg.beta > 0 and ref_model is None:
        raise ValueError(f"beta={cfg.beta} > 0 needs ref_model (a frozen copy of the initial policy)")
    num_tokens = int(world.sum([sum(int(mb.completion_mask.sum()) for mb in batch if not mb.filler)])[0])
    if num_tokens == 0:  # every row was filtered out: no step
        return {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "num_tokens": 0,
                "skipped": 1}

    def logprobs_of(policy, mb):  # [B, L] log-probs at the sampling temperature
        return completion_logprobs(policy, mb.tokens, mb.attention_mask, mb.completion_mask, mb.prompt_len,
                                   cfg.temperature, vocab_limit, cfg.logprob_chunk)[0]
    with torch.no_grad(), autocast:  # pi_old is the policy that sampled: frozen once, before the first step
        for mb in batch:
            mb.old_logprobs = logprobs_of(model, mb) if cfg.num_iterations > 1 else None
            mb.ref_logprobs = logprobs_of(ref_model, mb) if ref_model is not None else None
    # sums stay on the device: one host sync per step (the grad norm), not several per micro-batch
    device = next(model.parameters()).device  # a rank may have no rows (all filtered out) and still take part
    totals = {name: torch.zeros((), device=device) for name in ("loss", "clip_frac", "kl", "entropy")}
    grad_norms, skipped = [], 0
    optimizer.zero_grad(set_to_none=True)
    for iteration in range(cfg.num_iterations):
        for mb in batch:
            with autocast:  # the forward and the loss only (backward runs in the dtypes the forward chose)
                loss, sums = policy_loss(model, mb, cfg, vocab_limit)
            loss.backward()
            if mb.filler:
                continue
            totals["loss"] += loss.detach()
            for name, value in sums.items():
                totals[name] += value / num_tokens
        world.sum_grads(model.parameters())  # each rank's share of the batch gradient -> the batch gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        grad_norms.append(grad_norm.item())  # the norm before clipping
        loss = world.sum([totals["loss"].item()])[0]  # every rank takes the same decision
        if not (math.isfinite(grad_norms[-1]) and math.isfinite(loss)):
            optimizer.zero_grad(set_to_none=True)   # never let NaN/inf reach the weights
            skipped = 1
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sums = world.sum([total.item() for total in totals.values()])   # the ranks' shares add up to the batch's
    metrics = {name: total / len(grad_norms) for name, total in zip(totals, sums)}   # per-step averages
    return {**metrics, "grad_norm": sum(grad_norms) / len(grad_norms), "num_tokens": num_tokens, "skipped": skipped}
