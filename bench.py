"""
Benchmark model.py's sampler and loader (a script, not a test).

    python bench.py              # batch 1, 16, 64; 128 new tokens; HF comparison and load-memory check
    python bench.py --quick      # batch 1 and 16, 32 new tokens: a minute on a laptop CPU
    python bench.py --gpu        # the GPU acceptance check (below); --gpu --device=cpu runs it at a tiny shape
    python bench.py --train_model   # train.py's default model: eager, static and compiled decode, batch 1-128

Workload: a random 512-dim, 8-layer Qwen2 (8 heads, 2 kv heads) with Qwen's 151,936-row vocabulary, float32 on
CPU and bfloat16 on CUDA. Prompts of --prompt-len tokens, temperature 1.0 sampling, no stop ids (every row makes
exactly --new-tokens tokens). Prefill and decode are timed apart: prefill = generate(max_new_tokens=1), decode =
the extra time of generate(max_new_tokens=N) over that, per generated token.
When transformers is installed, the same weights run through Qwen2ForCausalLM.generate (do_sample, top_k off) and
the ratio ours/theirs is printed. Finally load_qwen's peak resident memory is measured in a fresh subprocess and
divided by the checkpoint's size on disk (1.0 = the weights held exactly once).
Timings on a shared machine are noisy: each number is the best of --repeats runs.

--gpu: one RL step (16 prompts x 8 samples, 150 + 1,024 tokens, beta 0.001, micro-batch 8, bf16-mixed, two
optimizer steps on the batch) of a random-weight Qwen2.5-3B-shaped model, and one table: memory.plan_rl_step's
rollout and update peaks against torch.cuda.max_memory_allocated (LiveBytes on CPU), the KV cache's dtype and
size, and whether the second optimizer step saw the first one's weights (its weights against a run with
autocast's cast cache off); then the update peak with --optimizer_offload (AdamW on the host) and both peaks with
--lora_rank=16, on the same weights. Then the throughput table below for Qwen2.5-0.5B- and 3B-shaped models in
bf16. On CPU the model and batch are tiny, so that the script cannot crash on its first GPU run.

Both modes also measure the device's two ceilings (a large copy's bandwidth, a large matmul's rate) and print each
decode step against its roofline (every matmul weight and the KV cache read once, or its FLOPs, whichever takes
longer), and the training step's tokens/s and MFU.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import grpo
import model as model_module
from cli import opt, parse, pick_device
from hf_io import save_hf
from lora import add_lora, without_adapters
from memory import LiveBytes, plan_rl_step
from model import ModelConfig, Transformer, generate
from offload import OffloadedAdamW


@dataclass
class BenchConfig:
    quick: bool = opt(False, "batch 1 and 16, 32 new tokens, one repeat")
    batch_sizes: tuple = opt((1, 16, 64), "comma-separated batch sizes")
    new_tokens: int = opt(128, "tokens generated per row")
    prompt_len: int = opt(64, "prompt length in tokens")
    repeats: int = opt(2, "timing repeats (the best is kept)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default); on a CPU shared with other jobs use 1, since "
                          "oversubscribed OpenMP threads can make every matmul 10-50x slower")
    decode: tuple = opt(("eager",), "generate's decode loops timed side by side: eager, static, compiled")
    no_hf: bool = opt(False, "skip the transformers comparison")
    no_load: bool = opt(False, "skip the load_qwen memory measurement")
    gpu: bool = opt(False, "the GPU acceptance check instead (see above)")
    train_model: bool = opt(False, "instead: the throughput table of train.py's default model (the byte vocabulary; "
                                   "prompts of 40 tokens, 256 new) at batch 1, 16, 64, 128, decode eager, static and "
                                   "compiled (one compile serves every batch size; not timed)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (--gpu only)")


def peak_of(fn, device):
    """-> (fn's result, the peak bytes allocated while it ran, on top of what was allocated before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated(device) - before
    with LiveBytes() as live:
        result = fn()
    return result, live.peak


# -----------------------------------------------------------------------------
# The roofline: the device's two ceilings, measured in the same run, against what one step needs


def timed(fn, device):
    """fn()'s wall time in seconds; GPU work runs asynchronously, so it is synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def best_time(fn, device, repeats=5):
    """The best of `repeats` timings of fn() in seconds, after one untimed call."""
    fn()
    return min(timed(fn, device) for _ in range(repeats))


def device_limits(device, dtype):
    """-> (bytes/s of a large copy, FLOP/s of a large matmul), in dtype: measured, not read off a data sheet."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 512 MiB of bf16 on a GPU, 128 MiB of float32 on CPU
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / best_time(lambda: dst.copy_(src), device)  # read + write
    k = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(k, k, device=device).to(dtype), torch.randn(k, k, device=device).to(dtype)
    return bandwidth, 2 * k ** 3 / best_time(lambda: a @ b, device)


def matmul_weights(model):
    """The weights every token multiplies by (each Linear once: a tied head counts the embedding once)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def decode_step_cost(model, batch, context):
    """One decode step of `batch` rows over `context` cached positions -> (bytes read, FLOPs). Bytes: every matmul
    weight once (the embedding lookup reads `batch` rows only) and the whole KV cache. FLOPs: 2 per weight per
    row, plus q.k and p.v, 4 x n_heads x head_dim x context per layer and row."""
    c, weights = model.config, matmul_weights(model)
    itemsize = model_module.compute_dtype(model).itemsize
    kv_bytes = 2 * c.n_layers * batch * context * c.n_kv_heads * c.head_dim * itemsize
    flops = batch * (2 * sum(w.numel() for w in weights) + 4 * c.n_layers * c.n_heads * c.head_dim * context)
    return sum(w.numel() * itemsize for w in weights) + kv_bytes, flops


def training_flops_per_token(model, seq_len):
    """PaLM's model FLOPs per token (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, with N the matmul
    weights, L layers, H heads of width Q and T the sequence length (forward and backward; a checkpointed
    block's recompute is not counted, so it lowers the MFU)."""
    c = model.config
    return 6 * sum(w.numel() for w in matmul_weights(model)) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def training_tokens_per_s(model, rows, seq_len, autocast, device):
    """Forward, cross-entropy and backward of `rows` x `seq_len` random tokens (the warm-up's step without the
    optimizer) -> tokens/s, best of 3."""
    tokens = torch.randint(0, model.config.vocab_size, (rows, seq_len + 1), device=device)

    def step():
        with autocast:
            logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    model.train()
    rate = rows * seq_len / best_time(step, device, repeats=3)
    model.zero_grad(set_to_none=True)
    return rate


def roofline_row(model, batch, context, decode_tok_s, limits):
    """'step ms | roofline ms (bound) | % of it' for a decode measured at decode_tok_s generated tokens/s."""
    step = batch / decode_tok_s
    nbytes, flops = decode_step_cost(model, batch, context)
    memory_time, compute_time = nbytes / limits[0], flops / limits[1]
    bound = "bandwidth" if memory_time >= compute_time else "compute"
    return (f"{step * 1e3:.3f} ms | {max(memory_time, compute_time) * 1e3:.4f} ms ({bound}) | "
            f"{100 * max(memory_time, compute_time) / step:.1f}%")


def throughput_table(mc, device, batch_sizes, modes, prompt_len, new_tokens, limits, compiled_batches):
    """Decode and prefill tokens/s of a random-weight model of config mc at each batch size and decode mode
    (compiled only at compiled_batches: on CUDA each batch size records its own CUDA graphs), each decode step
    against its roofline, and the training step's tokens/s and MFU."""
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = Transformer(mc).to(device=device, dtype=torch.bfloat16 if on_cuda else torch.float32).eval()
    n = sum(w.numel() for w in matmul_weights(model))
    print(f"\n{n / 1e6:.3g}M matmul weights ({mc.dim} dim, {mc.n_layers} layers), "
          f"{model_module.compute_dtype(model)}, prompts of {prompt_len} tokens, {new_tokens} new")
    print("| batch | decode | prefill tok/s | decode tok/s | decode step | roofline step | of roofline |\n"
          "|---|---|---|---|---|---|---|")
    for batch in batch_sizes:
        prompts = torch.randint(0, mc.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
        for mode in modes:
            if mode == "compiled" and batch not in compiled_batches:
                continue
            run = lambda n_new: generate(model, prompts.tolist(), n_new, temperature=1.0, seed=0, decode=mode)
            prefill = best_time(lambda: run(1), device, repeats=2)
            full = best_time(lambda: run(new_tokens), device, repeats=2)
            decode_tok_s = batch * (new_tokens - 1) / max(full - prefill, 1e-9)
            context = prompt_len + new_tokens // 2  # the mean cached length over the decode
            print(f"| {batch} | {mode} | {batch * prompt_len / prefill:.0f} | {decode_tok_s:.1f} | "
                  f"{roofline_row(model, batch, context, decode_tok_s, limits)} |")
    model = model.float()
    model.gradient_checkpointing = on_cuda  # as train.py's qwen defaults: a 3B step's activations then fit 80 GB
    print_training_step(model, (8, 512) if on_cuda else (4, 64), device, limits)


def print_training_step(model, shape, device, limits):
    """train.py's training step (float32 weights, bf16 autocast on CUDA) at rows x length = shape: tokens/s and
    MFU against the matmul peak measured in limits."""
    rows, seq_len = shape
    on_cuda = device.type == "cuda"
    rate = training_tokens_per_s(model, rows, seq_len, torch.autocast(device.type, torch.bfloat16, enabled=on_cuda),
                                 device)
    mfu = rate * training_flops_per_token(model, seq_len) / limits[1]
    print(f"training step ({rows} x {seq_len} tokens, forward + backward): {rate:.0f} tokens/s, MFU {100 * mfu:.2f}% "
          f"of the measured {'bf16' if on_cuda else 'float32'} matmul peak")


# --gpu --device=cpu: a shape small enough for the test suite, so that the script cannot crash on its first GPU run
TINY_CPU_SHAPE = ModelConfig(vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352,
                             max_seq_len=512)


def gpu_acceptance(device):
    on_cuda = device.type == "cuda"
    mc = ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
                     qkv_bias=True, tie_embeddings=True, max_seq_len=32768) if on_cuda else \
        TINY_CPU_SHAPE
    P, G, prompt_len, new = (16, 8, 150, 1024) if on_cuda else (2, 4, 20, 12)
    gcfg = grpo.GRPOConfig(group_size=G, max_new_tokens=new, micro_batch_size=8 if on_cuda else 4, beta=0.001,
                           num_iterations=2, clip_eps_low=1e-3, clip_eps_high=1e-3)
    autocast = torch.autocast(device.type, torch.bfloat16)
    torch.manual_seed(0)
    prompts = torch.randint(0, 151643 if on_cuda else 2000, (P, prompt_len)).tolist()
    rewards = torch.tensor([1.0, 0.0] * (P * G // 2))
    caches = []

    class RecordingCache(model_module.KVCache):  # keeps each rollout's cache, to read its dtype and size
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)
    model_module.KVCache = RecordingCache
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)

    def measured_peaks(policy, reference, optimizer, held):
        """One RL step's (rollout peak, update peak, update metrics) in bytes, measured on the second step (the
        first allocates AdamW's state); held(): the tensors kept between steps on the device (weights, the
        reference's, AdamW's state there), counted once each."""
        def rollout():
            with autocast:
                return generate(policy, prompts, new, temperature=1.0, seed=0, num_samples=G)

        def update():
            batch = grpo.micro_batches(grpo.per_row(prompts, G), completions, rewards,
                                       grpo.group_advantages(rewards, G), gcfg, pad_id=0, stop_ids=(), device=device)
            return grpo.update(policy, optimizer, batch, gcfg, reference, autocast=autocast)
        completions = rollout()
        update()
        static = nbytes({t.data_ptr(): t for t in held()}.values())
        completions, rollout_extra = peak_of(rollout, device)
        metrics, update_extra = peak_of(update, device)
        return static + rollout_extra, static + update_extra, metrics

    rows = []
    plan_kw = dict(device_type=device.type)
    # full fine-tuning: float32 weights and AdamW state on the device, a bf16 reference (float32 on CPU)
    torch.manual_seed(0)
    policy = Transformer(mc).to(device)
    policy.gradient_checkpointing = True
    reference = Transformer(mc).to(device, torch.bfloat16 if on_cuda else torch.float32).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=on_cuda)  # large enough to move bf16 casts
    weights = lambda: list(policy.parameters()) + list(reference.parameters())
    adamw_state = lambda: [t for s in optimizer.state.values() for t in s.values() if t.dim()]
    rollout_peak, update_peak, metrics = measured_peaks(policy, reference, optimizer,
                                                        lambda: weights() + adamw_state())
    plan = plan_rl_step(mc, gcfg, P * G, prompt_len, gcfg.micro_batch_size, **plan_kw)
    cache = caches[-1]
    rows += [("rollout peak (full fine-tuning)", plan.rollout_peak, rollout_peak),
             ("update peak (full fine-tuning)", plan.update_peak, update_peak),
             (f"KV cache ({cache.keys[0].dtype})", plan.kv_cache * P * G // (P * G + P),
              nbytes(cache.keys + cache.values))]
    # --optimizer_offload: the same model, AdamW's state and update on the host
    del optimizer
    optimizer = OffloadedAdamW(policy.parameters(), lr=1e-4)
    _, update_peak, _ = measured_peaks(policy, reference, optimizer, weights)
    plan = plan_rl_step(mc, gcfg, P * G, prompt_len, gcfg.micro_batch_size, optimizer_offload=True, **plan_kw)
    rows.append(("update peak (--optimizer_offload)", plan.update_peak, update_peak))
    # --lora_rank=16: train.py's LoRA (frozen base in bf16 under bf16 autocast), the base as the reference
    del optimizer, reference
    policy = add_lora(policy, 16, 32.0, torch.bfloat16)
    if on_cuda:
        torch.cuda.empty_cache()
    adapters = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4, fused=on_cuda)
    reference = without_adapters(policy)  # the policy's own frozen tensors: counted once
    rollout_peak, update_peak, _ = measured_peaks(policy, reference, optimizer, lambda: weights() + adamw_state())
    plan = plan_rl_step(mc, gcfg, P * G, prompt_len, gcfg.micro_batch_size, lora_rank=16, **plan_kw)
    rows += [("rollout peak (--lora_rank=16)", plan.rollout_peak, rollout_peak),
             ("update peak (--lora_rank=16)", plan.update_peak, update_peak)]
    print_memory_table(rows, metrics)
    kernel_and_decode_checks(policy, prompts, autocast, device)


def print_memory_table(rows, metrics):
    """The table's memory rows (name, planned bytes, measured bytes) and item 1's check."""
    print(f"| {'check':<40} | {'planned':>13} | {'measured':>13} |\n|{'-' * 42}|{'-' * 15}|{'-' * 15}|")
    for name, planned, measured in rows:
        print(f"| {name:<40} | {planned / 2**20:9.1f} MiB | {measured / 2**20:9.1f} MiB |")
    print(f"| {'2 optimizer steps per batch: clip_frac':<40} | {'> 0':>13} | {metrics['clip_frac']:13.4f} |")


def kernel_and_decode_checks(policy, prompts, autocast, device):
    """Masked attention on the intended SDPA kernel, and on CUDA the compiled decode against the eager loop."""
    on_cuda = device.type == "cuda"
    # masked attention (ragged rows, training) on the intended SDPA kernel only: a fallback raises here
    backend = SDPBackend.EFFICIENT_ATTENTION if on_cuda else SDPBackend.FLASH_ATTENTION
    tokens = torch.randint(0, 2000, (2, 64), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :10] = False
    try:
        with sdpa_kernel([backend]), autocast, torch.no_grad():
            policy.hidden_states(tokens, attention_mask=mask)
        kernel = "ok"
    except RuntimeError as e:
        kernel = "FAILED: " + str(e).strip().splitlines()[0][:60]
    print(f"| {'masked GQA attention on ' + backend.name:<40} | {'ok':>13} | {kernel:>13} |")
    # the static-shape decode step compiled (CUDA graphs on CUDA): the eager loop's greedy tokens, and its speed
    if on_cuda:
        short = [p[:32] for p in prompts]
        with autocast:
            times = {}
            for mode in ("eager", "compiled", "compiled"):  # the first compiled call compiles
                t0 = time.perf_counter()
                tokens = generate(policy, short, 256, temperature=0.0, decode=mode)
                torch.cuda.synchronize()
                times[mode] = (time.perf_counter() - t0, tokens)
        same = "yes" if times["eager"][1] == times["compiled"][1] else "NO"
        print(f"| {'compiled decode: eager greedy tokens':<40} | {'yes':>13} | {same:>13} |")
        # CUDA graph trees skip a graph (and log why) when it writes into a non-static input: the cache's buffers
        # are marked static (model.DecodeBuffers), so there should be no skip
        from torch._dynamo.utils import counters
        skips = counters["inductor"]["cudagraph_skips"]
        print(f"| {'compiled decode: CUDA graph skips':<40} | {0:>13} | {skips:>13} |")
        print(f"| {'decode tok/s, eager -> compiled':<40} | {'faster':>13} | "
              f"{16 * 256 / times['eager'][0]:5.0f} -> {16 * 256 / times['compiled'][0]:5.0f} |")


try:
    args = BenchConfig(**parse(sys.argv[1:], [BenchConfig], __doc__.strip().split("\n\n")[1]))
except ValueError as e:
    raise SystemExit(f"bench.py: {e}") from None
if not set(args.decode) <= {"eager", "static", "compiled"}:
    raise SystemExit(f"bench.py: --decode takes eager, static, compiled; got {','.join(args.decode)}")
if args.quick:
    args.batch_sizes, args.new_tokens, args.repeats = (1, 16), 32, 1
if args.gpu:
    try:
        gpu_device = torch.device(pick_device(args.device))
    except ValueError as e:
        raise SystemExit(f"bench.py: {e}") from None
    gpu_acceptance(gpu_device)
    on_cuda = gpu_device.type == "cuda"
    if on_cuda:
        torch.cuda.empty_cache()
    limits = device_limits(gpu_device, torch.bfloat16 if on_cuda else torch.float32)
    print(f"\nmeasured ceilings: copy {limits[0] / 1e9:.6g} GB/s, matmul {limits[1] / 1e9:.6g} GFLOP/s")
    if on_cuda:  # the two Qwen2.5 shapes in bf16; compiled (CUDA graphs) at the launch- and bandwidth-bound ends
        for name in ("qwen2.5-0.5b", "qwen2.5-3b"):
            throughput_table(model_module.PRESETS[name], gpu_device, (1, 16, 64, 128), ("eager", "compiled"), 64,
                             128, limits, compiled_batches=(1, 128))
    else:  # a tiny shape, static decode in place of compiled (the same loop without the compile)
        throughput_table(TINY_CPU_SHAPE, gpu_device, (1, 4), ("eager", "static"), 8, 8, limits, ())
    raise SystemExit(0)

if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(pick_device("auto"))
if args.train_model:
    import train
    limits = device_limits(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device {device} ({torch.get_num_threads()} threads); measured ceilings: copy {limits[0] / 1e9:.6g} "
          f"GB/s, matmul {limits[1] / 1e9:.6g} GFLOP/s")
    throughput_table(train.scratch_config(train.Config()), device, (1, 16, 64, 128), ("eager", "static", "compiled"),
                     40, 256, limits, compiled_batches=(1, 16, 64, 128))
    raise SystemExit(0)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
config = ModelConfig(vocab_size=151936, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                     rope_theta=1e6, max_seq_len=4096)
torch.manual_seed(0)
model = Transformer(config).to(device=device, dtype=dtype).eval()
n_params = sum(p.numel() for p in model.parameters())
print(f"device {device} ({torch.get_num_threads()} threads), {dtype}, {n_params / 1e6:.1f}M parameters, prompt "
      f"{args.prompt_len} tokens, {args.new_tokens} new tokens")
limits = device_limits(device, dtype)
print(f"measured ceilings: copy {limits[0] / 1e9:.6g} GB/s, matmul {limits[1] / 1e9:.6g} GFLOP/s")


def measure(runs, batch):
    """runs: {name: run(n) generating n tokens for `batch` rows}. The runs take turns, so a burst of load from
    other jobs hits all of them alike; the best of --repeats is kept. -> {name: (prefill tok/s, decode tok/s,
    total seconds)}"""
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            best[name][0] = min(best[name][0], timed(lambda: run(1), device))
            best[name][1] = min(best[name][1], timed(lambda: run(args.new_tokens), device))
    return {name: (batch * args.prompt_len / t1, batch * (args.new_tokens - 1) / max(tn - t1, 1e-9), tn)
            for name, (t1, tn) in best.items()}


checkpoint_dir = tempfile.mkdtemp(prefix="bench_ckpt_")
save_hf(model.float(), checkpoint_dir)  # float32 on disk; the same weights feed transformers and the load test
model.to(dtype)
hf_model = None
if not args.no_hf:
    try:
        import transformers
        hf_model = transformers.Qwen2ForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()
    except ImportError:
        print("transformers not installed: skipping the comparison")

for batch in args.batch_sizes:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, 151643, (batch, args.prompt_len), generator=g)
    runs = {"ours" if mode == "eager" else f"ours ({mode})":
            lambda n, mode=mode: generate(model, prompts.tolist(), n, temperature=1.0, seed=0, decode=mode)
            for mode in args.decode}
    if "compiled" in args.decode:
        runs["ours (compiled)"](args.new_tokens)  # compile before the clock starts (once per batch and cache size)
    if hf_model is not None:
        input_ids = prompts.to(device)

        def hf_run(n):
            with torch.inference_mode():
                hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  pad_token_id=0, eos_token_id=None)
        runs["HF"] = hf_run
    result = measure(runs, batch)
    line = f"batch {batch:3d}"
    for name, (prefill, decode, total) in result.items():
        line += f" | {name}: prefill {prefill:6.0f} tok/s, decode {decode:6.1f} tok/s, total {total:6.2f}s"
    if "HF" in result and "ours" in result:
        (_, ours_decode, ours_total), (_, hf_decode, hf_total) = result["ours"], result["HF"]
        line += f" | ours/HF: total {hf_total / ours_total:.2f}x, decode {ours_decode / hf_decode:.2f}x"
    print(line, flush=True)
    for name, (_, decode, _) in result.items():
        if name != "HF":  # each decode step against the roofline: step | roofline step (bound) | share
            context = args.prompt_len + args.new_tokens // 2
            print(f"    {name} decode step: {roofline_row(model, batch, context, decode, limits)} of roofline")
print_training_step(model.float(), (4, 128), device, limits)

if not args.no_load:
    # peak RSS of load_qwen in a fresh process (VmHWM: ru_maxrss would inherit the parent's peak across fork),
    # minus what python + torch + model.py already hold after loading a tiny checkpoint once (code paths warm)
    probe = ("import sys, torch, model, hf_io\n"
             "def hwm(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
             "hf_io.save_hf(model.Transformer(model.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2,"
             " n_kv_heads=1, ffn_dim=32)), sys.argv[2])\n"
             "hf_io.load_qwen(sys.argv[2])\n"
             "base = hwm()\n"
             "m = hf_io.load_qwen(sys.argv[1])\n"
             "print((hwm() - base) * 1024)\n")  # KiB -> bytes
    tiny_dir = os.path.join(tempfile.gettempdir(), f"bench_tiny_{os.getpid()}")
    peak = int(subprocess.run([sys.executable, "-c", probe, checkpoint_dir, tiny_dir],
                              capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split()[-1])
    size = sum(os.path.getsize(os.path.join(checkpoint_dir, f)) for f in os.listdir(checkpoint_dir))
    print(f"load_qwen peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint: "
          f"ratio {peak / size:.2f} (target <= 1.2)")
    shutil.rmtree(tiny_dir)
shutil.rmtree(checkpoint_dir)
