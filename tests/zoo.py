"""Hand-written models covering the shapes real models take (used by the converter tests)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FunctionalHead(nn.Module):
    """Dropout only through F.dropout in a helper method (timm's forward_head pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.drop_rate = 0.25
        self.fc = nn.Linear(16, 3)

    def forward_head(self, x):
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x):
        return self.forward_head(self.body(x))


class Residual(nn.Module):
    """A residual site (no single consumer) and a consumer behind flatten/reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop_res = nn.Dropout(0.1)
        self.drop_flat = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = self.conv(x)
        h = h + self.drop_res(h)
        return self.fc(self.drop_flat(h).flatten(1))


class SharedDropout(nn.Module):
    """One dropout module called at two places with two different consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(self.drop(x)))))


class Attention(nn.Module):
    """nn.MultiheadAttention with dropout, and a targeted Linear around it."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.att(x, x, x)[0])


class FusedSDPA(nn.Module):
    """Dropout passed into F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.p = 0.1
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, 16))


class Recurrent(nn.Module):
    """LSTM with inter-layer dropout (unsupported: reported) and a dropout module after it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, 2, dropout=0.2, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.drop(self.rnn(x)[0]))


class Nested(nn.Module):
    """ModuleList / ModuleDict nesting and channel-wise dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(6, 3, 1)) for _ in range(2)]
        )
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(3 * 6 * 6, 2))})

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.heads["a"](x)


class Tied(nn.Module):
    """Weight tying: the output layer shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(self.drop(self.emb(idx)))


class ControlFlow(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = torch.relu(self.fc1(x))
        return self.fc2(F.dropout(self.drop(x), 0.3, self.training))


def zoo():
    """``(name, factory, inputs_factory, convert_kwargs)`` for every zoo model."""
    img = lambda: (torch.randn(3, 3, 6, 6),)
    vec = lambda: (torch.randn(3, 8),)
    seq = lambda: (torch.randn(3, 5, 16),)
    return [
        ("functional_head", FunctionalHead, vec, {}),
        ("residual", Residual, img, {}),
        ("shared_dropout", SharedDropout, vec, {}),
        ("attention", Attention, seq, {}),
        ("attention_targets", Attention, seq, {"targets": [nn.Linear]}),
        ("fused_sdpa", FusedSDPA, seq, {}),
        ("recurrent", Recurrent, lambda: (torch.randn(3, 5, 8),), {}),
        ("nested", Nested, img, {}),
        ("tied", Tied, lambda: (torch.randint(0, 10, (3, 4)),), {}),
        ("control_flow", ControlFlow, lambda: (torch.randn(3, 8).abs(),), {"use_example_inputs": True}),
        ("transformer", lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True), 2,
                                                      enable_nested_tensor=False), seq, {"use_example_inputs": True}),
        ("double", lambda: Residual().double(), lambda: (torch.randn(3, 3, 6, 6, dtype=torch.float64),), {}),
    ]
