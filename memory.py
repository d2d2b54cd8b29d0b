"""The memory plan of one RL step: every term that allocates, the two peaks (rollouts, update), what fits.

train.py prints it before the first RL step on a GPU, and `train.py --dry_run` prints it from config.json alone
(no weights read). The plan is checked against a measurement: LiveBytes below counts every tensor torch makes
(tests/test_memory.py, at small shapes on CPU); bench.py --gpu compares it with torch.cuda.max_memory_allocated.
Allocator slack and kernel workspaces come on top, so a plan "fits" when it stays under 90% of the card.
"""
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import static_cache_len

GiB = 2**30


def count_params(mc):
    """Parameters of a model config, from its shapes (no model needed)."""
    embeddings = mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2)
    return embeddings + mc.n_layers * (adapted_params(mc) // mc.n_layers + 2 * mc.dim) + mc.dim


def adapted_params(mc):
    """The weights and biases of every block's q/k/v/o/gate/up/down Linear: what LoRA freezes and adapts."""
    kv = mc.n_kv_heads * mc.head_dim
    return mc.n_layers * (mc.dim * (mc.dim + 2 * kv) + (mc.dim + 2 * kv) + mc.dim * mc.dim + 3 * mc.dim * mc.ffn_dim)


def count_lora_params(mc, rank):
    """LoRA's A (r, in) and B (out, r) for each of those Linears: r * (in + out) each."""
    C, kv, F = mc.dim, mc.n_kv_heads * mc.head_dim, mc.ffn_dim
    return mc.n_layers * rank * ((C + C) + 2 * (C + kv) + (C + C) + 2 * (C + F) + (F + C))


@dataclass
class Plan:
    """What one RL step holds, in bytes. Rollouts: the weights, AdamW state, the reference model, autocast's bf16
    copies of the weights, the KV cache and the sampler's [rows, V] buffers. Update: the same without the cache,
    plus gradients and one micro-batch's activations."""
    weights: int
    optimizer: int
    reference: int
    cast_weights: int      # autocast's bf16 copy of every weight a matmul reads (bf16-mixed only)
    kv_cache: int          # all rollout rows, plus the prefill's P-row cache that select() copies from
    sampling: int          # the [rows, V] float32 logits and probabilities (and sort buffers for top-p)
    gradients: int
    saved_activations: int  # one micro-batch's: each block's input when checkpointing, else all of them
    block_working: int      # one block's forward or recompute and backward, with attention scores if written
    logprob_head: int       # the chunked log-softmax's [chunk, V] buffers and the [V, C] head gradient
    head_cast: int = 0      # LoRA under bf16 autocast: the frozen lm_head's bf16 copy, made anew at every decode
    #                         step and every micro-batch (autocast caches copies of trainable weights only)
    gathered_rollout: int = 0  # FSDP: every weight gathered for the whole of generate (distributed.unsharded)
    gathered_update: int = 0   # FSDP: two units gathered at a time (the one running, the next prefetched), and the
    #                            unsharded gradient of one unit before its reduce-scatter
    kept_decode_cache: int = 0  # --decode=static|compiled: the static loop's cache (model.DecodeBuffers), kept from
    #                             one rollout to the next, so held in the update too (also counted in kv_cache)

    @property
    def static(self):
        return self.weights + self.optimizer + self.reference

    @property
    def rollout_peak(self):
        return self.static + self.gathered_rollout + self.cast_weights + self.kv_cache + max(self.sampling,
                                                                                              self.head_cast)

    @property
    def update_peak(self):  # backward meets the head first, then one block at a time: the larger of the two
        return self.static + self.gathered_update + self.cast_weights + self.head_cast + self.gradients \
            + self.kept_decode_cache + self.saved_activations + max(self.block_working, self.logprob_head)


def plan_rl_step(mc, gcfg, rollout_rows, prompt_len, micro_batch, precision="bf16-mixed", device_type="cuda",
                 checkpointing=True, vocab_limit=None, lora_rank=0, optimizer_offload=False, fsdp_ranks=1,
                 decode="eager"):
    """The Plan of one RL step: rollout_rows = prompts_per_step * group_size rows of <= prompt_len +
    max_new_tokens tokens; weights in float32 (bf16 for precision "bf16"); the reference in bf16 on CUDA;
    vocab_limit < vocab_size (Qwen's padding rows) adds the head gradient's full-size copy.
    lora_rank > 0 (train.py's LoRA): gradients and AdamW state for the float32 adapters only; the adapted Linears'
    frozen weights in bf16 under bf16 autocast (no cast copies of them); the reference is the same frozen base (no
    copy); no embedding or head gradient. Activations flow through the whole network as before.
    optimizer_offload (offload.py): no AdamW state on the GPU (offload_host_bytes: what the host holds instead).
    fsdp_ranks = N > 1 (--fsdp): a rank holds 1/N of the weights, gradients, AdamW state and reference, and the
    gathered weights above; rollout_rows are then this rank's rows.
    decode "static" or "compiled" (model.generate): the prompts' prefill cache, then the kept cache of all rows,
    model.static_cache_len columns, held in the update as well."""
    P, L, C, F, V = count_params(mc), mc.n_layers, mc.dim, mc.ffn_dim, mc.vocab_size
    H, kv = mc.n_heads, mc.n_kv_heads * mc.head_dim
    T, B, G = prompt_len + gcfg.max_new_tokens, micro_batch, gcfg.group_size
    w = 2 if precision == "bf16" else 4                      # bytes per weight, gradient and AdamW moment
    a = 4 if precision == "fp32" else 2                      # bytes per activation a matmul writes
    norms = (2 * L + 1) * C
    cast = (P - norms - (0 if mc.tie_embeddings else V * C)) * 2 if precision == "bf16-mixed" else 0
    kv_rows = rollout_rows + rollout_rows // G               # the prefill cache of the P prompts, then all rows
    top_p = gcfg.top_p < 1
    # one block's working set: normed input (float32), q/k/v, attention output, gate/up/silu/product; its backward
    # half as much again (measured). Checkpointing keeps only each block's float32 input; without it every block's.
    block = B * T * (4 * C + a * (3 * C + 2 * kv) + a * 4 * F)
    saved = B * T * C * 4 * L if checkpointing else L * block
    # SDPA's math kernel writes B x H x T x T scores (and their softmax) for a mask with grouped kv heads on CUDA;
    # model.grouped_query_attention folds the heads so that the memory-efficient kernel takes it instead, but
    # until bench.py --gpu has confirmed that on a GPU the scores stay counted. CPU's flash kernel takes masks.
    scores = B * H * T * T * a * 2 if device_type == "cuda" else 0
    chunk = min(gcfg.logprob_chunk, B * gcfg.max_new_tokens)
    # the head's gradient in the matmul's dtype, its float32 cast, the full-size [V, C] copy a slice's backward
    # writes when vocab_limit < V, and the embedding's dense [V, C] gradient, added to the one accumulated so far
    head = V * C * (a + (4 if a == 2 else 0) + (4 if (vocab_limit or V) < V else 0) + 4)
    if lora_rank:
        R, frozen = count_lora_params(mc, lora_rank), adapted_params(mc)
        weights = (P - frozen) * w + frozen * (2 if precision != "fp32" else 4) + R * 4   # adapters in float32
        trainable, trainable_bytes, reference = R, 4, 0
        cast = R * 2 if precision == "bf16-mixed" else 0  # the adapters' (the frozen Linears are bf16 already)
        head_cast = V * C * 2 if precision == "bf16-mixed" else 0
        head = 0  # embedding and lm_head are frozen: no [V, C] gradients
    else:
        weights, trainable, trainable_bytes, head_cast = P * w, P, w, 0
        reference = P * (2 if device_type == "cuda" else w) if gcfg.beta > 0 else 0
    N = fsdp_ranks
    # K and V, every layer, kv head and position: the eager loop's cache, or the static loop's kept one
    kept = 0 if decode == "eager" else 2 * L * kv * a * static_cache_len(T, mc.max_seq_len) * rollout_rows
    unit = max(V * C + (0 if mc.tie_embeddings else V * C), adapted_params(mc) // L) * w  # the root, or a block
    return Plan(
        weights=weights // N,
        # AdamW's exp_avg and exp_avg_sq, in the weights' dtype (on the host with offload)
        optimizer=0 if optimizer_offload else 2 * trainable * trainable_bytes // N,
        reference=reference // N,
        cast_weights=cast,
        kv_cache=2 * L * kv * a * (T * kv_rows if decode == "eager" else prompt_len * (rollout_rows // G)) + kept,
        sampling=rollout_rows * V * (4 * 4 + (20 if top_p else 0)),
        gradients=trainable * trainable_bytes // N,
        saved_activations=saved,
        block_working=3 * block // 2 + scores,
        # the chunked log-softmax: a chunk's backward holds 6 [chunk, V] float32 buffers (logits, shifted, exp,
        # probabilities, product, scattered gradient; measured, LoRA) until the head's gradient is formed, then
        # 3 of them with it (full fine-tuning)
        logprob_head=max(6 * chunk * V * 4, 3 * chunk * V * 4 + head), head_cast=head_cast,
        gathered_rollout=P * w if N > 1 else 0, gathered_update=3 * unit if N > 1 else 0, kept_decode_cache=kept)


def offload_host_bytes(mc, lora_rank=0):
    """Host memory --optimizer_offload takes: float32 weights, two moments and pinned gradients per trainable."""
    return 16 * (count_lora_params(mc, lora_rank) if lora_rank else count_params(mc))


def fitting_micro_batch(mc, gcfg, rollout_rows, prompt_len, budget, **kw):
    """The largest power-of-two micro_batch_size whose update peak stays under 90% of budget bytes, or 0."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= rollout_rows]
    fits = [b for b in sizes if plan_rl_step(mc, gcfg, rollout_rows, prompt_len, b, **kw).update_peak < 0.9 * budget]
    return fits[-1] if fits else 0


def print_plan(mc, gcfg, rollout_rows, prompt_len, budget, **kw):
    """Print the plan's terms and peaks for a card of `budget` bytes, and what to change when it does not fit."""
    plan = plan_rl_step(mc, gcfg, rollout_rows, prompt_len, gcfg.micro_batch_size, **kw)
    lora = f" (LoRA rank {kw['lora_rank']}: {count_lora_params(mc, kw['lora_rank']) / 1e6:.1f}M trainable)" \
        if kw.get("lora_rank") else " (full fine-tuning)"
    if kw.get("optimizer_offload"):
        lora += f", AdamW on the host ({offload_host_bytes(mc, kw.get('lora_rank', 0)) / GiB:.1f} GiB of host memory)"
    print(f"memory plan: {count_params(mc) / 1e9:.2f}B params{lora}, {kw.get('precision', 'bf16-mixed')}, "
          f"{rollout_rows} rollout rows of <= {prompt_len + gcfg.max_new_tokens} tokens, micro_batch_size "
          f"{gcfg.micro_batch_size}, for a {budget / GiB:.0f} GiB card:")
    for name, value in vars(plan).items():
        print(f"  {name:<18}{value / GiB:8.2f} GiB")
    print(f"  peak during rollouts {plan.rollout_peak / GiB:.1f} GiB, during the update {plan.update_peak / GiB:.1f} "
          f"GiB; 90% of the card is {0.9 * budget / GiB:.1f} GiB")
    fixed = plan.static + plan.gathered_update + plan.cast_weights + plan.head_cast + plan.gradients \
        + plan.kept_decode_cache + plan.logprob_head
    best = fitting_micro_batch(mc, gcfg, rollout_rows, prompt_len, budget, **kw)
    if fixed > 0.9 * budget:
        print(f"  does NOT fit whatever the batch: what the card holds at any batch (weights, gradients, AdamW "
              f"state if there, the head's buffers) is {fixed / GiB:.1f} "
              f"GiB; use a smaller model, --lora_rank=16" + ("" if kw.get("optimizer_offload") else
                                                              " or --optimizer_offload"))
    elif plan.rollout_peak > 0.9 * budget:
        print("  rollouts do NOT fit: lower --prompts_per_step, --group_size or --max_new_tokens (the KV cache is "
              f"{plan.kv_cache / GiB:.1f} GiB)")
    elif plan.update_peak > 0.9 * budget:
        print(f"  the update does NOT fit: --micro_batch_size={best} does (it changes memory, never the result)"
              if best else "  the update does NOT fit even at --micro_batch_size=1: lower --max_new_tokens")
    else:
        print(f"  fits; the largest micro_batch_size that fits is {best}")


def print_run_plan(cfg, gcfg, mc, prompt_len, precision, vocab_limit=None, ranks=1):
    """For train.py's run (cfg: its Config), print the plan of one RL step for the card (--gpu_memory_gb, else the
    visible GPU, else 80 GB) and, for comparison, for 24, 48 and 80 GB cards. Under torchrun, for one rank's share
    of the rollouts."""
    if cfg.gpu_memory_gb:
        budget = cfg.gpu_memory_gb * GiB
    elif torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        budget = 80 * GiB
    rows = cfg.prompts_per_step * gcfg.group_size // ranks
    kw = dict(precision=precision, checkpointing=cfg.gradient_checkpointing, vocab_limit=vocab_limit,
              lora_rank=cfg.lora_rank, optimizer_offload=cfg.optimizer_offload,
              fsdp_ranks=ranks if cfg.fsdp else 1, decode=cfg.decode)
    print_plan(mc, gcfg, rows, prompt_len, budget, **kw)
    rollout_peak = plan_rl_step(mc, gcfg, rows, prompt_len, gcfg.micro_batch_size, **kw).rollout_peak
    for card in (24, 48, 80):
        best = fitting_micro_batch(mc, gcfg, rows, prompt_len, card * GiB, **kw)
        ok = rollout_peak < 0.9 * card * GiB and best
        print(f"  on a {card} GB card: " + (f"fits at micro_batch_size <= {best}" if ok else "does not fit"))
    print_gpu_counts(mc, gcfg, cfg.prompts_per_step, prompt_len, **kw)


def print_gpu_counts(mc, gcfg, prompts_per_step, prompt_len, **kw):
    """The peak per GPU on 1, 2, 4 and 8 GPUs, each taking its share of the rollouts: with DDP (the whole model on
    every GPU) and, for full fine-tuning, with --fsdp (1/N of it)."""
    print("  peak per GPU on N GPUs, DDP (whole model each) / --fsdp (1/N each):")
    for n in (1, 2, 4, 8):
        if prompts_per_step % n:
            continue
        rows = prompts_per_step * gcfg.group_size // n

        def peak(ranks):
            plan = plan_rl_step(mc, gcfg, rows, prompt_len, gcfg.micro_batch_size, **{**kw, "fsdp_ranks": ranks})
            return max(plan.rollout_peak, plan.update_peak) / GiB
        fsdp = f"{peak(n):.1f} GiB" if n > 1 and not kw.get("lora_rank") and not kw.get("optimizer_offload") \
            else "-"
        print(f"    {n} GPU{'s' if n > 1 else ' '}: {peak(1):6.1f} GiB / {fsdp}")

# -----------------------------------------------------------------------------
# The measurement the plan is checked against


class LiveBytes(TorchDispatchMode):
    """Inside `with LiveBytes() as live:`, live.now and live.peak are the bytes of every tensor storage that torch
    ops made in the block and that is still alive (each storage counted once, released when it is freed).
    Tensors made before the block (weights, optimizer state) are not counted: add them."""

    def __enter__(self):
        self.now, self.peak, self.alive = 0, 0, set()
        return super().__enter__()

    def _release(self, key, nbytes):
        self.now -= nbytes
        self.alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new (it may predate the block)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if storage.nbytes() and key not in self.alive:
                self.alive.add(key)
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._release, key, storage.nbytes())
        return out
