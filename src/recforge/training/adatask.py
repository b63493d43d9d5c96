"""AdaTask: Adam with per-task moment estimates on the parameters the tasks share.

Yang et al., "AdaTask: A Task-Aware Adaptive Learning Rate Approach to Multi-Task Learning",
AAAI 2023. With one Adam for all tasks, the accumulated squared gradient of a shared parameter is
dominated by the task with the largest gradients, which then also dominates the shared parameter's
update. AdaTask keeps, for every parameter and every task ``k``, the first and second moments of
that task's gradient ``g_k`` alone and updates

    θ ← θ - lr Σ_k m̂_k / (sqrt(v̂_k) + eps)

(bias-corrected as in Adam). A parameter that only one task reaches (a tower, a gate) receives a
zero gradient from the other tasks: their moments stay at zero and their term vanishes, so the
update is plain Adam for that task. Parameters a task does not reach at all (``None`` gradient)
skip that task's moments. ``weight_decay`` is L2 added to every task's gradient, as Adam's is.

The per-task gradients come from one backward pass per task; :meth:`step` takes them as a list
over tasks of lists over parameters (see :class:`recforge.models.ctr.multitask.MultiTaskCTRModel`).
"""

from __future__ import annotations


import torch


class AdaTask(torch.optim.Optimizer):
    def __init__(self, params, n_tasks: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if n_tasks < 1:
            raise ValueError("AdaTask needs at least one task")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.n_tasks = int(n_tasks)

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, task_grads: list[list[torch.Tensor | None]]):  # type: ignore[override]
        """``task_grads[k][i]``: the gradient of task ``k``'s loss for the ``i``-th parameter of
        :meth:`params` (None where the task does not reach it)."""
        if len(task_grads) != self.n_tasks:
            raise ValueError(f"AdaTask.step: {len(task_grads)} task gradients for {self.n_tasks} tasks")
        i = 0
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                grads = [task_grads[k][i] for k in range(self.n_tasks)]
                i += 1
                if all(g is None for g in grads):
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float64)
                    st["m"] = torch.zeros((self.n_tasks, *p.shape), dtype=p.dtype, device=p.device)
                    st["v"] = torch.zeros((self.n_tasks, *p.shape), dtype=p.dtype, device=p.device)
                    st["t"] = torch.zeros(self.n_tasks, dtype=torch.float64)  # steps each task took here
                st["step"] += 1
                update = torch.zeros_like(p)
                for k, g in enumerate(grads):
                    if g is None:
                        continue
                    if wd:
                        g = g + wd * p
                    st["t"][k] += 1
                    t = float(st["t"][k])
                    m, v = st["m"][k], st["v"][k]
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                    update.addcdiv_(m, denom, value=1 / (1 - b1**t))
                p.add_(update, alpha=-lr)
        return None
