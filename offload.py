"""AdamW with its state and its update on the CPU (--optimizer_offload): full fine-tuning on a smaller card.

AdamW keeps two moments per trainable weight, in float32 twice the weights' own memory: 24.7 GB for Qwen2.5-3B,
what puts its full fine-tuning past a 48 GB card. Here the GPU keeps the weights and the gradients; the moments,
and a float32 copy of the weights that the update is applied to, live in host memory (pinned, so that copies
run asynchronously). One optimizer step:

    1. every gradient GPU -> its pinned host buffer (non-blocking copies, queued together, then one wait)
    2. torch.optim.AdamW.step() on the host copies (the same update as on the GPU, by the CPU's cores)
    3. every updated weight host -> GPU (non-blocking: the GPU's next work is queued behind the copies and the
       host goes on at once, so the copies overlap the start of the next rollout)

The cost is host memory (4 bytes per weight for the copy, 8 for the moments, 4 for the pinned gradients: 49 GB
for 3B) and the transfers and CPU update once per step (the README's GPU section). Gradient clipping runs
before, on the GPU's gradients, as without offload. state_dict() is the inner AdamW's: a checkpoint saved with
offload resumes without it and the other way round.
"""
import torch


class OffloadedAdamW:
    """torch.optim.AdamW over host copies of `params`, driven like the optimizer it wraps: param_groups (set
    "lr" there), zero_grad(), step(), state_dict(), load_state_dict()."""

    def __init__(self, params, **adamw_kwargs):
        self.params = list(params)
        self.on_cuda = any(p.is_cuda for p in self.params)  # pinned host memory only exists with CUDA
        host = lambda p: torch.empty(p.shape, dtype=torch.float32, pin_memory=self.on_cuda)
        self.host_params = [host(p).copy_(p.detach()).requires_grad_() for p in self.params]
        self.host_grads = [host(p) for p in self.params]
        self.inner = torch.optim.AdamW(self.host_params, **adamw_kwargs)   # state made on the host, lazily
        self.param_groups = self.inner.param_groups

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    @torch.no_grad()
    def step(self):
        for p, hp, g in zip(self.params, self.host_params, self.host_grads):  # 1. gradients to the host
            hp.grad = None if p.grad is None else g.copy_(p.grad, non_blocking=True)  # None: AdamW skips it
        if self.on_cuda:
            torch.cuda.synchronize()  # the host reads the gradients next
        self.inner.step()                                                     # 2. AdamW on the host
        for p, hp in zip(self.params, self.host_params):                     # 3. the new weights back
            p.copy_(hp, non_blocking=True)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
