"""Where real training runs: torch.compile, mixed precision, DistributedDataParallel, CUDA."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import cd_convert

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _compile_available() -> bool:
    """Whether torch.compile can run here: Dynamo supports this Python and Inductor finds a C++ compiler."""
    try:
        from torch._inductor import cpp_builder

        return bool(torch._dynamo.is_dynamo_supported()) and bool(cpp_builder.get_cpp_compiler())
    except Exception:  # any failure to import or to find a compiler means no compile here
        return False


needs_compile = pytest.mark.skipif(not _compile_available(), reason="torch.compile is unavailable here")


def _same_noise_as_eager():
    """A context in which compiled code draws its random numbers from PyTorch's generator, as eager code does.

    By default Inductor generates its own (Philox) random numbers, so compiled and eager masks differ for one
    seed; ``fallback_random`` makes it call ``torch.rand`` instead. In float64 the eager sites call ``torch.rand``
    too (the packed CPU draw of :mod:`cd_convert.noise` is float32 only), so both draw the same masks.
    """
    from torch._inductor import config

    return config.patch(fallback_random=True)


def _p_logits(model: nn.Module):
    return {name: p for name, p in model.named_parameters() if name.endswith("p_logit")}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def _seeded_loss(model: nn.Module, x: torch.Tensor, weights: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the same seed: the same masks on every call
    return (model(x) * weights).sum()


@needs_compile
def test_compiled_training_matches_eager_on_the_same_noise_and_finite_differences():
    torch.manual_seed(0)
    # Targeted Conv2d and Linear: a channel-wise site before the conv, an element-wise one before the linear.
    model = cd_convert.convert(_cnn(), [nn.Linear, nn.Conv2d], dataset_size=100).double().train()
    logits = _p_logits(model)
    assert len(logits) == 2
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    weights = torch.randn(2, 4, dtype=torch.float64)
    with _same_noise_as_eager():
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break from cd_convert fails
        loss = _seeded_loss(compiled, x, weights, seed=5)
        loss.backward()
        compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        # Central differences of the compiled loss in each p-logit, the masks held fixed by the seed.
        h = 1e-6
        differences = {}
        for name, p in logits.items():
            value = p.detach().clone()
            with torch.no_grad():
                p.copy_(value + h)
            up = _seeded_loss(compiled, x, weights, seed=5).item()
            with torch.no_grad():
                p.copy_(value - h)
            down = _seeded_loss(compiled, x, weights, seed=5).item()
            with torch.no_grad():
                p.copy_(value)
            differences[name] = (up - down) / (2 * h)
        other_seed = _seeded_loss(compiled, x, weights, seed=6).item()
    assert other_seed != pytest.approx(loss.item(), rel=1e-6)  # the masks are random: the seed matters
    model.zero_grad()
    eager_loss = _seeded_loss(model, x, weights, seed=5)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)
    for name, difference in differences.items():
        assert compiled_grads[name].item() != 0.0
        assert compiled_grads[name].item() == pytest.approx(difference, rel=1e-5, abs=1e-8), name


def _keep_at_quantiles(theta: float, temperature: float, points: int = 200_000) -> torch.Tensor:
    """``1 - z = sigmoid(-(theta + logit(u)) / t)`` at the midpoints ``u = (i + 1/2) / points``.

    Means over these values are midpoint-rule integrals over u ~ U(0, 1): expectations under the mask's law.
    """
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    return torch.sigmoid(-(theta + torch.log(u) - torch.log1p(-u)) / temperature)


@needs_compile
def test_compiled_site_with_inductors_own_noise_follows_the_formula_in_distribution():
    # The default configuration: Inductor's own random numbers, so only the distributions can be compared.
    site = cd_convert.ConcreteDropout(0.3).train()
    compiled = torch.compile(site, fullgraph=True)
    x = torch.ones(128, 256, requires_grad=True)
    torch.manual_seed(0)
    y = compiled(x)
    y.sum().backward()
    theta, t = site.p_logit.item(), site.temperature
    p = 1 / (1 + math.exp(-theta))
    n = y.numel()
    # Dropped (1 - z < 1/2, i.e. logit(u) > -theta) with probability exactly p at any temperature.
    dropped = (y.detach().double() * (1 - p) < 0.5).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    # 1 - z < 1/4  <=>  logit(u) > t * logit(3/4) - theta: probability sigmoid(theta - t * log 3), which sees t.
    quarter = 1 / (1 + math.exp(-(theta - t * math.log(3))))
    below_quarter = (y.detach().double() * (1 - p) < 0.25).double().mean().item()
    assert abs(below_quarter - quarter) < 5 * math.sqrt(quarter * (1 - quarter) / n)
    keep = _keep_at_quantiles(theta, t)
    scaled = keep / (1 - p)  # the output for x = 1
    assert abs(y.detach().double().mean().item() - scaled.mean().item()) < 5 * scaled.std().item() / math.sqrt(n)
    # d y / d x = (1 - z) / (1 - p) = y for x = 1; d y / d theta = y * (p - z / t), summed over the elements.
    torch.testing.assert_close(x.grad, y.detach(), rtol=1e-5, atol=1e-6)
    per_element = scaled * (p - (1 - keep) / t)
    mean_grad = site.p_logit.grad.item() / n
    assert abs(mean_grad - per_element.mean().item()) < 5 * per_element.std().item() / math.sqrt(n)


@needs_compile
@pytest.mark.parametrize("sampling", ["relaxed", "hard"])
def test_compiled_mc_sampling_under_no_grad(sampling):
    # The no-grad mask path writes in place on its noise buffer; a fullgraph compile must take it too.
    torch.manual_seed(0)
    converted = cd_convert.convert(_mlp(), dataset_size=100)
    x = torch.randn(64, 16)
    with cd_convert.mc_mode(converted, sampling), torch.no_grad():
        compiled = torch.compile(converted, fullgraph=True)
        first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second)  # fresh masks on every call
    torch.manual_seed(1)
    with cd_convert.mc_mode(converted, sampling), torch.no_grad():
        eager = torch.stack([converted(x) for _ in range(200)])
        compiled_passes = torch.stack([compiled(x) for _ in range(200)])
    # Both estimate the same predictive mean: within 6 standard errors of the difference, per output.
    standard_error = ((eager.var(0) + compiled_passes.var(0)) / 200).sqrt()
    assert ((eager.mean(0) - compiled_passes.mean(0)).abs() < 6 * standard_error + 1e-6).all()


@needs_compile
def test_compile_timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # Two blocks (ten sites: patch, attention, projection, MLP and head dropout) keep the compile short.
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        num_classes=4,
        depth=2,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
    )
    model = cd_convert.convert(vit, dataset_size=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train()
    with _same_noise_as_eager():
        compiled = torch.compile(model)
        torch.manual_seed(3)
        out = compiled(x)
        out.sum().backward()
    compiled_grads = {name: p.grad.clone() for name, p in _p_logits(model).items()}
    assert len(compiled_grads) == 10
    model.zero_grad()
    torch.manual_seed(3)
    eager_out = model(x)
    eager_out.sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-9, atol=1e-10)
    for name, p in _p_logits(model).items():
        assert p.grad.item() != 0.0, name
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_aggressive_training_stays_finite(dtype):
    torch.manual_seed(0)
    model = cd_convert.convert(_mlp(), [nn.Linear], dataset_size=10)  # tiny N: a strong pull on p
    opt = torch.optim.Adam(model.parameters(), lr=0.1)  # aggressive on purpose
    x, y = torch.randn(64, 16) * 10, torch.randint(0, 4, (64,))
    for _ in range(300):
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
            data = nn.functional.cross_entropy(logits, y)
        reg = cd_convert.regularization(model)
        assert reg.dtype == torch.float32
        loss = data.float() + reg
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rates = cd_convert.dropout_rates(model).values()
    assert all(0.0 < p < 1.0 for p in rates)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.att = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.embed(x))
            return self.head(self.att(h, h, h)[0].mean(1))

    model = cd_convert.convert(Net(), [nn.Linear], dataset_size=256)
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: unused params fail
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # different data and masks per rank
    for _ in range(5):
        x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
        loss = nn.functional.cross_entropy(ddp(x), y) + cd_convert.regularization(ddp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    torch.save({"rates": cd_convert.dropout_rates(model), "unused": unused}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_ddp_two_processes_rates_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["unused"] == [] and r1["unused"] == []
    assert r0["rates"] == r1["rates"] and len(r0["rates"]) == 2  # embed and head inputs; MHA out_proj has none
    assert all(0.0 < p < 1.0 for p in r0["rates"].values())


@cuda
def test_cuda_sites_draw_noise_on_device():
    model = cd_convert.convert(_mlp(), [nn.Linear], dataset_size=100).cuda()
    x = torch.randn(8, 16, device="cuda")
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for n, p in model.named_parameters() if n.endswith("p_logit"))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    assert cd_convert.regularization(model).is_cuda


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_extreme_logits(dtype):
    site = cd_convert.ConcreteDropout(0.5).cuda()
    x = torch.randn(64, 64, device="cuda", dtype=dtype)
    for logit in (-50.0, 50.0):
        with torch.no_grad():
            site.p_logit.fill_(logit)
        y = site(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
