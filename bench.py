"""
Benchmark model.py's sampler and loader (a script, not a test).

    python bench.py              # batch 1, 16, 64; 128 new tokens; HF comparison and load-memory check
    python bench.py --quick      # batch 1 and 16, 32 new tokens: a minute on a laptop CPU

Workload: a random 512-dim, 8-layer Qwen2 (8 heads, 2 kv heads) with Qwen's 151,936-row vocabulary, float32 on
CPU and bfloat16 on CUDA. Prompts of --prompt-len tokens, temperature 1.0 sampling, no stop ids (every row makes
exactly --new-tokens tokens). Prefill and decode are timed apart: prefill = generate(max_new_tokens=1), decode =
the extra time of generate(max_new_tokens=N) over that, per generated token.
When transformers is installed, the same weights run through Qwen2ForCausalLM.generate (do_sample, top_k off) and
the ratio ours/theirs is printed. Finally load_qwen's peak resident memory is measured in a fresh subprocess and
divided by the checkpoint's size on disk (1.0 = the weights held exactly once).
Timings on a shared machine are noisy: each number is the best of --repeats runs.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from cli import opt, parse, pick_device
from hf_io import save_hf
from model import ModelConfig, Transformer, generate


@dataclass
class BenchConfig:
    quick: bool = opt(False, "batch 1 and 16, 32 new tokens, one repeat")
    batch_sizes: tuple = opt((1, 16, 64), "comma-separated batch sizes")
    new_tokens: int = opt(128, "tokens generated per row")
    prompt_len: int = opt(64, "prompt length in tokens")
    repeats: int = opt(2, "timing repeats (the best is kept)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default); on a CPU shared with other jobs use 1, since "
                          "oversubscribed OpenMP threads can make every matmul 10-50x slower")
    no_hf: bool = opt(False, "skip the transformers comparison")
    no_load: bool = opt(False, "skip the load_qwen memory measurement")


try:
    args = BenchConfig(**parse(sys.argv[1:], [BenchConfig], __doc__.strip().split("\n\n")[1]))
except ValueError as e:
    raise SystemExit(f"bench.py: {e}") from None
if args.quick:
    args.batch_sizes, args.new_tokens, args.repeats = (1, 16), 32, 1

if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(pick_device("auto"))
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
config = ModelConfig(vocab_size=151936, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                     rope_theta=1e6, max_seq_len=4096)
torch.manual_seed(0)
model = Transformer(config).to(device=device, dtype=dtype).eval()
n_params = sum(p.numel() for p in model.parameters())
print(f"device {device} ({torch.get_num_threads()} threads), {dtype}, {n_params / 1e6:.1f}M parameters, prompt "
      f"{args.prompt_len} tokens, {args.new_tokens} new tokens")


def timed(fn):
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPU work runs asynchronously
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(runs, batch):
    """runs: {name: run(n) generating n tokens for `batch` rows}. The runs take turns, so a burst of load from
    other jobs hits all of them alike; the best of --repeats is kept. -> {name: (prefill tok/s, decode tok/s,
    total seconds)}"""
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            best[name][0] = min(best[name][0], timed(lambda: run(1)))
            best[name][1] = min(best[name][1], timed(lambda: run(args.new_tokens)))
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
    runs = {"ours": lambda n: generate(model, prompts.tolist(), n, temperature=1.0, seed=0)}
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
    if "HF" in result:
        (_, ours_decode, ours_total), (_, hf_decode, hf_total) = result["ours"], result["HF"]
        line += f" | ours/HF: total {hf_total / ours_total:.2f}x, decode {ours_decode / hf_decode:.2f}x"
    print(line, flush=True)

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
