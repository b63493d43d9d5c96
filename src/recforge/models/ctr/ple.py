"""PLE: Progressive Layered Extraction.

Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020. Each of ``levels`` extraction layers holds
``specific_experts`` experts per task and ``shared_experts`` shared experts (MLPs). Task ``k``'s
gate (linear, softmax) mixes its own experts and the shared ones; in every layer but the last, a
shared gate mixes all experts of the layer into the shared path. The first layer's experts read
the concatenated field embeddings; later layers read the previous layer's output of their task
(task experts) or of the shared path (shared experts): progressive routing. One tower MLP per
task over the last layer's output gives its logit. With one layer this is the paper's CGC.
Defaults for the CTR family (2 layers, 1 task expert per task and 1 shared expert per layer, as in
the common implementations, experts 256-128, towers 64, batch normalisation), not the paper's
production setting.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.ctr.base import mlp, mlp_out_dim
from recforge.models.ctr.multitask import MultiTaskCTRModel, softmax_mix, tower


class ExtractionLayer(nn.Module):
    """One extraction layer; ``forward(inputs)`` maps ``n_tasks + 1`` inputs (tasks, then the
    shared path) to ``n_tasks`` outputs, plus the shared path's unless ``last``."""

    def __init__(self, in_dim: int, n_tasks: int, model, last: bool):
        super().__init__()

        def expert():
            return mlp(in_dim, model.expert_hidden, model.dropout, model.batch_norm, model.activation)

        ns, nh = int(model.specific_experts), int(model.shared_experts)
        self.specific = nn.ModuleList(nn.ModuleList(expert() for _ in range(ns)) for _ in range(n_tasks))
        self.shared = nn.ModuleList(expert() for _ in range(nh))
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, ns + nh) for _ in range(n_tasks))
        self.shared_gate = None if last else nn.Linear(in_dim, n_tasks * ns + nh)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        shared = [e(inputs[-1]) for e in self.shared]
        specific = [[e(inputs[k]) for e in experts] for k, experts in enumerate(self.specific)]
        out = [softmax_mix(g(inputs[k]), torch.stack(specific[k] + shared, 1)) for k, g in enumerate(self.task_gates)]
        if self.shared_gate is not None:
            every = [h for hs in specific for h in hs] + shared
            out.append(softmax_mix(self.shared_gate(inputs[-1]), torch.stack(every, 1)))
        return out


class PLENet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        d, k, n = self.embedding.total_dim, model.n_labels, int(model.levels)
        h = mlp_out_dim(d, model.expert_hidden)
        self.layers = nn.ModuleList(ExtractionLayer(d if i == 0 else h, k, model, last=i == n - 1) for i in range(n))
        self.towers = nn.ModuleList(tower(h, model.tower_hidden, model) for _ in range(k))
        self.n_tasks = k

    def forward(self, batch):
        x = torch.cat(self.embedding(batch), -1)
        paths = [x] * (self.n_tasks + 1)
        for layer in self.layers:
            paths = layer(paths)
        return torch.cat([t(paths[k]) for k, t in enumerate(self.towers)], -1)


class PLE(MultiTaskCTRModel):
    name = "ple"

    def __init__(self, levels: int = 2, specific_experts: int = 1, shared_experts: int = 1,
                 expert_hidden: list[int] = (256, 128), tower_hidden: list[int] = (64,), dropout: float = 0.0,
                 batch_norm: bool = True, activation: str = "relu", **base):
        super().__init__(**base)
        if int(levels) < 1 or int(shared_experts) < 1 or int(specific_experts) < 0:
            raise ConfigError(f"levels={levels}, shared_experts={shared_experts}, specific_experts="
                              f"{specific_experts}: PLE needs at least one layer and one shared expert per layer "
                              "(task experts may be 0)")
        self.levels, self.specific_experts, self.shared_experts = int(levels), int(specific_experts), int(shared_experts)
        self.expert_hidden, self.tower_hidden = list(expert_hidden), list(tower_hidden)
        self.dropout, self.batch_norm, self.activation = dropout, batch_norm, activation

    def make_net(self):
        return PLENet(self)
