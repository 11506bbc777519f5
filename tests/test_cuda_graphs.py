"""Concrete sites captured in CUDA graphs: the fused kernels read their seed from a device tensor that the graph
redraws at every replay, so a captured training step trains on new masks each time and follows the formula.

CUDA only (skipped elsewhere): graph capture has no CPU counterpart.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import cd_convert
from cd_convert import fused, fused_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _capture(body):
    """``body`` warmed up on a side stream, then captured; returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    return graph, _captured(graph, body)


def _captured(graph, body):
    with torch.cuda.graph(graph):
        return body()


def test_a_captured_site_draws_new_masks_at_each_replay_and_follows_the_formula():
    torch.manual_seed(0)
    signs = torch.randint(0, 2, (64, 300), device="cuda") * 2 - 1
    x = ((torch.rand(64, 300, device="cuda") + 0.5) * signs).requires_grad_()  # |x| >= 0.5: y / x is exact
    p, t = 0.3, 0.1
    p_logit = torch.tensor(math.log(p / (1 - p)), device="cuda", requires_grad=True)
    g = torch.randn(64, 300, device="cuda")

    def body():
        x.grad, p_logit.grad = None, None  # each run (and the capture) allocates fresh gradients
        y = fused.fused_concrete_dropout(
            x, p_logit, temperature=t, eps=1e-6, channelwise=False, channel_dim=1, save_output=False
        )
        y.backward(g)
        return y

    graph, y = _capture(body)
    outputs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        y64, x64, g64 = y.double(), x.detach().double(), g.double()
        keep_scale = y64 / x64  # (1 - z) / (1 - p), element by element
        keep = keep_scale * (1 - p)
        assert 0.27 < float((keep < 0.5).double().mean()) < 0.33  # about p of the mask is dropped
        torch.testing.assert_close(x.grad.double(), g64 * keep_scale, rtol=1e-5, atol=1e-6)
        gy = (g64 * y64).sum()
        expected = p * gy - (gy - (g64 * y64 * keep).sum()) / t  # the paper's d/d logit, written out
        assert abs(float(p_logit.grad) - float(expected)) <= 1e-4 * float((g64 * y64).abs().sum()) / t
        outputs.append(y.detach().clone())
    assert not torch.equal(outputs[0], outputs[1])  # a new seed at each replay


def test_captured_fused_attention_is_sdpa_as_p_vanishes_and_draws_new_masks_at_each_replay():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert fused_attention.supports(q, k, v)
    for logit, check in ((-30.0, "sdpa"), (math.log(0.3 / 0.7), "new masks")):
        p_logit = torch.tensor(logit, device="cuda")

        def body(p_logit=p_logit):
            return fused_attention.fused_concrete_attention(q, k, v, p_logit, temperature=0.1, eps=1e-6)

        graph, out = _capture(body)
        graph.replay()
        first = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        if check == "sdpa":
            torch.testing.assert_close(
                out.float(), F.scaled_dot_product_attention(q, k, v).float(), rtol=2e-2, atol=2e-2
            )
        else:
            assert not torch.equal(first, out)


def test_a_converted_vit_training_step_captured_whole_trains_through_the_kernels(kernel_calls):
    timm = pytest.importorskip("timm")
    calls = kernel_calls
    torch.manual_seed(0)
    base = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        depth=2,
        num_classes=10,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cd_convert.convert(copy.deepcopy(base), dataset_size=1000).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, capturable=True)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    target = torch.randint(0, 10, (8,), device="cuda")

    def body():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x), target) + cd_convert.regularization(model)
        loss.backward()
        optimizer.step()
        return loss

    graph, loss = _capture(body)
    assert len(calls) == 3 * 2  # two warm-up runs and the capture, each through both blocks' kernel
    rates = [cd_convert.dropout_rates(model)]
    losses = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        losses.append(float(loss))
        rates.append(cd_convert.dropout_rates(model))
    assert len(calls) == 6  # replays launch no Python
    assert all(math.isfinite(value) for value in losses) and len(set(losses)) == 3
    for before, after in zip(rates, rates[1:]):
        assert before.keys() == after.keys() and all(before[name] != after[name] for name in before)
