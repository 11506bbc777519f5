"""``nn.DataParallel`` replicas of converted models compute with the replica's parameters.

``torch.nn.parallel.replicate`` needs CUDA devices, so :func:`replicate_like_torch` repeats its steps on the CPU
(torch 2.14's ``replicate``: ``_replicate_for_data_parallel`` on every module, then children, parameter copies as
non-leaf attributes and buffers set on each replica). Parameter copies are scaled by 2, so that a replica computing
with the original's parameters gives a different output than one computing with its own. The independent
reference is the unconverted model with its weights doubled, in eval mode (where every site is the identity).
"""

from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert import cpu_extension


def replicate_like_torch(network: nn.Module, copies: int, scale: float = 2.0) -> List[nn.Module]:
    """The replicas ``torch.nn.parallel.replicate`` makes, with parameter copies ``scale * p`` (non-leaf)."""
    modules = list(network.modules())
    index = {module: i for i, module in enumerate(modules)}
    replicas = [[module._replicate_for_data_parallel() for module in modules] for _ in range(copies)]
    for i, module in enumerate(modules):
        for replica_set in replicas:
            replica = replica_set[i]
            for key, child in module._modules.items():
                setattr(replica, key, None if child is None else replica_set[index[child]])
            for key, param in module._parameters.items():
                setattr(replica, key, None if param is None else param * scale)
            for key, buffer in module._buffers.items():
                setattr(replica, key, None if buffer is None else buffer.clone())
    return [replica_set[0] for replica_set in replicas]


class Routed(nn.Module):
    """A functional dropout call (a routed site) and an ``nn.MultiheadAttention`` (a runner)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.drop_rate = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.lin(x), p=self.drop_rate, training=self.training)
        return self.attention(h, h, h)[0]


def _doubled(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
    return reference.eval()


def test_replicas_of_routed_sites_use_their_own_parameters():
    torch.manual_seed(0)
    model = Routed()
    x = torch.randn(2, 5, 8)
    reference = _doubled(model)(x)
    converted = cd_convert.convert(model, dataset_size=100, example_inputs=(x,)).eval()
    kinds = {row.kind for row in cd_convert.report(converted).sites}
    assert kinds == {"functional", "fused"}, kinds
    for replica in replicate_like_torch(converted, 2):
        torch.testing.assert_close(replica(x), reference, rtol=0, atol=0)
    # The original still computes with its own parameters, and trains through a replica's copies.
    torch.testing.assert_close(converted(x), model.eval()(x), rtol=0, atol=0)
    replica = replicate_like_torch(converted.train(), 1)[0]
    replica(x).sum().backward()
    logits = [p for n, p in converted.named_parameters() if n.endswith("p_logit")]
    assert len(logits) == 2 and all(p.grad is not None and p.grad.abs() > 0 for p in logits)


def test_replicas_of_a_layer_in_fused_mode(built):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(32, 6)
    reference = _doubled(net)(x)
    converted = cd_convert.convert(net, targets=[nn.Linear], dataset_size=100)
    cpu_extension.enable()
    try:
        for _ in range(2):  # the first training call records K, the second enters fused mode
            converted.train()(x)
        layer = converted[2]
        assert "forward" in layer.__dict__  # in fused mode
        replica = replicate_like_torch(converted.eval(), 1)[0]
        assert "forward" not in replica[2].__dict__ and len(replica[2]._forward_pre_hooks) == 1
        assert not layer._forward_pre_hooks  # the original stays in fused mode: its dict was not touched
        torch.testing.assert_close(replica(x), reference, rtol=0, atol=0)
    finally:
        cpu_extension.disable()


class Residual(nn.Module):
    """A site with no consuming weight layer: its K is the width its first training call records."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.lin(x))


def test_width_recorded_by_a_replica_reaches_the_original():
    converted = cd_convert.convert(Residual(), dataset_size=100)  # traced: no dry run, K unknown until a forward
    assert converted.drop.units_seen is None
    replica = replicate_like_torch(converted.train(), 1)[0]
    replica(torch.randn(4, 8))
    assert converted.drop.units_seen == 8
    cd_convert.regularization(converted).backward()  # K is known to the regulariser of the original
