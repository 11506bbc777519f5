"""Where real training runs: torch.compile, mixed precision, DistributedDataParallel, CUDA."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import cd_convert

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("factory,targets,shape", [(_mlp, None, (8, 16)), (_cnn, [nn.Linear, nn.Conv2d], (2, 3, 8, 8))])
def test_compile_fullgraph_matches_eager(factory, targets, shape):
    torch.manual_seed(0)
    converted = cd_convert.convert(factory(), targets, dataset_size=100)
    compiled = torch.compile(converted, fullgraph=True)  # fullgraph: any graph break from cd_convert fails
    x = torch.randn(*shape)
    converted.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for n, p in converted.named_parameters() if n.endswith("p_logit"))
    converted.eval()
    torch.testing.assert_close(compiled(x), converted(x))


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


def test_compile_timm_model():
    timm = pytest.importorskip("timm")
    model = cd_convert.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4),
                               dataset_size=10)
    compiled = torch.compile(model)
    model.train()
    compiled(torch.randn(2, 3, 32, 32)).sum().backward()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


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
