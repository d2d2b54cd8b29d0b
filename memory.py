"""GPU memory plan for one RL step: what each term costs, the two peaks, the largest micro-batch that fits.
An estimate (allocator slack and kernel workspaces come on top), printed by train.py before the first RL step.
"""
import torch


def count_params(mc):
    """Parameters of a model config, from its shapes (no model needed)."""
    kv = mc.n_kv_heads * mc.head_dim
    per_layer = mc.dim * (mc.dim + 2 * kv) + (mc.dim + 2 * kv) + mc.dim * mc.dim + 3 * mc.dim * mc.ffn_dim + 2 * mc.dim
    embeddings = mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2)
    return embeddings + mc.n_layers * per_layer + mc.dim


def estimate_memory(mc, weight_bytes, rollout_rows, prompt_len, gcfg, micro_batch):
    """GPU bytes per term for one RL step."""
    P, T, L = count_params(mc), prompt_len + gcfg.max_new_tokens, mc.n_layers
    return {
        "weights": P * weight_bytes,                        # one copy of every parameter
        "gradients": P * weight_bytes,                      # one gradient per parameter, same dtype
        "optimizer": 2 * P * weight_bytes,                  # AdamW's exp_avg and exp_avg_sq
        "reference": P * 2 if gcfg.beta > 0 else 0,         # frozen bf16 copy of the start for the KL term
        # K and V for every layer, kv head and position of every rollout row, in the weights' dtype
        "kv_cache": 2 * L * mc.n_kv_heads * mc.head_dim * T * rollout_rows * weight_bytes,
        # with checkpointing: each block's input (B*T*C, fp32 residual) + one block recomputed (~ 6C + 4F per token,
        # bf16) + a [chunk, V] float32 log-softmax and its gradient
        "activations": micro_batch * T * (L * mc.dim * 4 + (6 * mc.dim + 4 * mc.ffn_dim) * 2 * 2)
                       + 3 * gcfg.logprob_chunk * mc.vocab_size * 4,
    }


def print_memory_estimate(model, rollout_rows, prompt_len, gcfg, gpu_memory_gb):
    """Print the terms, the two peaks (rollout: no gradients, all KV caches; update: gradients and one
    micro-batch of activations) and the largest power-of-two micro_batch_size whose update peak fits in 90%."""
    mc, weight_bytes = model.config, next(model.parameters()).element_size()
    on_gpu = next(model.parameters()).is_cuda  # else plan for a GPU of gpu_memory_gb
    budget_bytes = torch.cuda.get_device_properties(0).total_memory if on_gpu else gpu_memory_gb * 2**30

    def peaks(micro_batch):
        t = estimate_memory(mc, weight_bytes, rollout_rows, prompt_len, gcfg, micro_batch)
        static = t["weights"] + t["optimizer"] + t["reference"]
        return t, static + t["kv_cache"], static + t["gradients"] + t["activations"]
    terms, rollout_peak, update_peak = peaks(gcfg.micro_batch_size)
    print(f"memory estimate ({count_params(mc) / 1e9:.2f}B params, {weight_bytes}-byte weights, "
          f"{rollout_rows} rollout rows of <= {prompt_len + gcfg.max_new_tokens} tokens, "
          f"budget {budget_bytes / 2**30:.0f} GiB):")
    for name, value in terms.items():
        print(f"  {name:<12}{value / 2**30:8.2f} GiB")
    print(f"  peak during rollouts {rollout_peak / 2**30:.1f} GiB, during the update {update_peak / 2**30:.1f} GiB "
          f"(micro_batch_size={gcfg.micro_batch_size})")
    fits = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if peaks(b)[2] < 0.9 * budget_bytes]
    print(f"  largest micro_batch_size that fits: {fits[-1] if fits else 'none'}"
          + ("" if rollout_peak < 0.9 * budget_bytes else "; rollouts do NOT fit: fewer prompts_per_step"))
