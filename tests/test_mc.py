"""Tests for cd_convert.mc: MC mode, batched MC prediction and its summaries."""

from __future__ import annotations

import math
from typing import Tuple

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from cd_convert import noise
from cd_convert.layers import ConcreteDropout, ConcreteDropoutBase
from cd_convert.mc import (
    DEFAULT_CHUNK_BYTES_CPU,
    ClassificationPrediction,
    RegressionPrediction,
    concrete_sites,
    mc_mode,
    mc_predict,
)
from cd_convert.metrics import gaussian_test_log_likelihood, mutual_information, predictive_entropy


def classifier(seed: int = 0, p: float = 0.3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), ConcreteDropout(p), nn.Linear(32, 5))


class HeteroscedasticNet(nn.Module):
    """Two sites, a mean head and a log-variance head, like the authors' toy regression network."""

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.drop_in = ConcreteDropout(p)
        self.hidden = nn.Linear(3, 16)
        self.drop_hidden = ConcreteDropout(p)
        self.mean = nn.Linear(16, 1)
        self.log_var = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.drop_hidden(torch.relu(self.hidden(self.drop_in(x))))
        return self.mean(h), self.log_var(h)


class TaggedIdentity(nn.Module):
    """Returns the first feature untouched and the others through a site: the first column tags the row."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.site = ConcreteDropout(p)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], self.site(x[:, 1:])], dim=1)


class RowCounter(nn.Module):
    """A site followed by a linear head that records the rows of every forward pass."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.site = ConcreteDropout(0.2)
        self.head = nn.Linear(features, 3)
        self.rows: list = []

    def forward(self, x: Tensor) -> Tensor:
        self.rows.append(x.shape[0])
        return self.head(self.site(x.flatten(1)))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def derived_seed(seed: int) -> int:
    """The seed mc_predict draws from a generator seeded with ``seed``."""
    return int(torch.randint(2**62, (1,), generator=seeded(seed)))


# ------------------------------------------------------------------------------------------ mc_mode


def test_mc_mode_sets_eval_and_sampling_and_restores_mixed_modes() -> None:
    model = classifier()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in training: must come back exactly so
    model[3].sampling = "hard"  # a previous sampling value must be restored too
    before = [m.training for m in model.modules()]
    with mc_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        assert model[3].sampling == "relaxed"
    assert [m.training for m in model.modules()] == before
    assert model[3].sampling == "hard"


def test_mc_mode_restores_on_exception() -> None:
    model = classifier().train()
    with pytest.raises(RuntimeError, match="boom"):
        with mc_mode(model, sampling="hard"):
            assert model[3].sampling == "hard"
            raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
    assert model[3].sampling is None


def test_sites_keep_sampling_after_eval_inside_context() -> None:
    model = classifier().eval()
    x = torch.randn(8, 20)
    with torch.no_grad():
        with mc_mode(model):
            model.eval()
            assert model[3].sampling == "relaxed"
            assert not torch.equal(model(x), model(x))
        # Outside the context the model is deterministic again.
        assert torch.equal(model(x), model(x))


def test_mc_mode_nests() -> None:
    model = classifier().train()
    with mc_mode(model, "relaxed"):
        with mc_mode(model, "hard"):
            assert model[3].sampling == "hard"
        assert model[3].sampling == "relaxed"
        assert not model.training
    assert model.training and model[3].sampling is None


def test_mc_mode_rejects_bad_sampling_and_models_without_sites() -> None:
    with pytest.raises(ValueError, match="sampling must be one of"):
        with mc_mode(classifier(), sampling="bernoulli"):
            pass
    plain = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="cd_convert.convert"):
        with mc_mode(plain):
            pass
    assert plain.training  # refused before anything was changed


def test_concrete_sites_finds_every_site_once() -> None:
    net = HeteroscedasticNet()
    assert concrete_sites(net) == [net.drop_in, net.drop_hidden]
    assert all(isinstance(s, ConcreteDropoutBase) for s in concrete_sites(net))


# --------------------------------------------------------------------------------- mc_predict: modes


def test_batchnorm_running_stats_unchanged_and_modes_restored() -> None:
    model = classifier().train()
    with torch.no_grad():
        model(torch.randn(64, 20) * 3 + 1)  # non-trivial running statistics
    bn = model[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    mc_predict(model, torch.randn(8, 20), samples=16)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert all(m.training for m in model.modules())
    assert model[3].sampling is None


def test_batchnorm_uses_running_stats_in_mc_prediction() -> None:
    # With p tiny, every MC pass is (almost surely) the eval-mode forward, which uses the running stats.
    model = classifier(p=1e-6).train()
    with torch.no_grad():
        model(torch.randn(64, 20) * 3 + 1)
    model.eval()
    x = torch.randn(4, 20)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=-1)
    pred = mc_predict(model, x, samples=4, generator=seeded(0))
    torch.testing.assert_close(pred.probs, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- mc_predict: classification


def test_classification_agrees_with_a_loop_of_passes() -> None:
    model = classifier().eval()
    x = torch.randn(16, 20)
    samples = 400
    pred = mc_predict(model, x, samples, generator=seeded(1), return_samples=True)
    assert isinstance(pred, ClassificationPrediction)
    torch.manual_seed(2)
    with mc_mode(model), torch.no_grad():
        loop = torch.stack([torch.softmax(model(x), dim=-1) for _ in range(samples)])
    se = ((pred.samples.var(0) + loop.var(0)) / samples).sqrt()
    z = (pred.probs - loop.mean(0)).abs() / se.clamp_min(1e-8)
    # 80 values: a few standard errors apart at most.
    assert float(z.max()) < 5.0
    # The summaries are those of the metrics module applied to the samples.
    torch.testing.assert_close(pred.probs, pred.samples.mean(0))
    torch.testing.assert_close(pred.entropy, predictive_entropy(pred.samples.mean(0)))
    torch.testing.assert_close(pred.mutual_information, mutual_information(pred.samples), atol=1e-5, rtol=1e-4)


def test_entropy_bounds() -> None:
    pred = mc_predict(classifier(p=0.5), torch.randn(32, 20), samples=50, generator=seeded(3))
    assert pred.probs.shape == (32, 5)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(32))
    assert bool((pred.mutual_information >= 0).all())
    assert bool((pred.entropy >= pred.mutual_information - 1e-6).all())
    assert bool((pred.entropy <= math.log(5) + 1e-6).all())
    assert float(pred.mutual_information.max()) > 0  # the passes do disagree
    assert bool((pred.aleatoric_entropy >= -1e-6).all())
    assert pred.samples is None


def test_fixed_generator_is_deterministic_and_global_rng_untouched() -> None:
    model = classifier().eval()
    x = torch.randn(8, 20)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = mc_predict(model, x, 32, generator=seeded(7))
    assert torch.equal(torch.get_rng_state(), state)
    second = mc_predict(model, x, 32, generator=seeded(7))
    other = mc_predict(model, x, 32, generator=seeded(8))
    assert torch.equal(first.probs, second.probs)
    assert torch.equal(first.mutual_information, second.mutual_information)
    assert not torch.equal(first.probs, other.probs)
    assert torch.equal(torch.get_rng_state(), state)
    # The same generator object advances: two calls draw different masks.
    g = seeded(7)
    first_call = mc_predict(model, x, 32, generator=g).probs
    assert not torch.equal(first_call, mc_predict(model, x, 32, generator=g).probs)


def test_without_generator_the_global_rng_drives_the_masks() -> None:
    model = classifier().eval()
    x = torch.randn(8, 20)
    torch.manual_seed(5)
    a = mc_predict(model, x, 16)
    torch.manual_seed(5)
    b = mc_predict(model, x, 16)
    assert torch.equal(a.probs, b.probs)


def test_chunking_is_reproducible_and_agrees_within_mc_error() -> None:
    # Documented behaviour: chunk_size changes which noise each row gets (the sites draw per forward
    # pass), so different chunkings are different draws that agree within MC error; the same chunk_size
    # and seed reproduce exactly.
    model = nn.Sequential(ConcreteDropout(0.3), nn.Linear(20, 32), nn.ReLU(), ConcreteDropout(0.3), nn.Linear(32, 5))
    x = torch.randn(6, 20)
    samples = 400
    whole = mc_predict(model, x, samples, generator=seeded(0), return_samples=True)
    for chunk in (6, 7, 100):  # whole passes, and chunks cutting through passes
        a = mc_predict(model, x, samples, chunk_size=chunk, generator=seeded(0), return_samples=True)
        b = mc_predict(model, x, samples, chunk_size=chunk, generator=seeded(0))
        assert torch.equal(a.probs, b.probs)
        se = ((a.samples.var(0) + whole.samples.var(0)) / samples).sqrt()
        assert float(((a.probs - whole.probs).abs() / se.clamp_min(1e-8)).max()) < 5.0


@pytest.mark.parametrize("chunk", [None, 1, 3, 5, 7, 20, 1000])
def test_row_order_is_pass_major(chunk) -> None:
    # Row t*B + i of the repeated input is pass t of example i, for any chunking.
    x = torch.randn(5, 4)
    x[:, 0] = torch.arange(5.0)
    pred = mc_predict(TaggedIdentity(), x, 6, chunk_size=chunk, task="regression", return_samples=True)
    assert pred.samples.shape == (6, 5, 4)
    assert torch.equal(pred.samples[..., 0], x[:, 0].expand(6, 5))


def test_hard_sampling_gives_zero_or_scaled_input() -> None:
    site = ConcreteDropout(0.3)
    model = nn.Sequential(site)
    x = torch.rand(50, 40) + 0.5
    pred = mc_predict(model, x, 20, sampling="hard", task="regression", return_samples=True, generator=seeded(0))
    out = pred.samples
    p = float(site.p.detach())
    scaled = x / (1 - p)
    dropped = out == 0
    kept = ~dropped
    torch.testing.assert_close(out[kept], scaled.expand_as(out)[kept], rtol=1e-6, atol=0)
    # Bernoulli(p): the fraction dropped is p within a few binomial standard errors.
    n = out.numel()
    assert abs(float(dropped.float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    # The relaxed mask, in contrast, is continuous: outputs strictly between 0 and x/(1-p) occur.
    relaxed = mc_predict(model, x, 5, task="regression", return_samples=True, generator=seeded(0)).samples
    ratio = relaxed / scaled
    assert bool(((ratio > 1e-3) & (ratio < 1 - 1e-3)).any())


# ------------------------------------------------------- mc_predict: the relaxed mask without autograd


def test_relaxed_passes_are_the_formula_on_the_sites_noise() -> None:
    """Each relaxed MC pass is ``x * (1 - z) / (1 - p)`` with ``z = sigmoid((logit(p) + logit(u)) / t)``.

    With one chunk, the site draws one ``(T * B, D)`` CPU float32 noise tensor from the global generator,
    which mc_predict seeds with ``derived_seed``: the test draws that tensor again and applies the formula.
    """
    site = ConcreteDropout(0.3)
    samples, batch, features = 6, 4, 50
    x = torch.rand(batch, features) + 0.5
    pred = mc_predict(
        nn.Sequential(site),
        x,
        samples,
        chunk_size=samples * batch,
        generator=seeded(4),
        task="regression",
        return_samples=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(4))
        u = noise.uniform((samples * batch, features), device=torch.device("cpu"), dtype=torch.float32).double()
    theta = site.p_logit.item()
    p = 1 / (1 + math.exp(-theta))
    z = 1 / (1 + torch.exp(-(theta + torch.log(u) - torch.log(1 - u)) / site.temperature))
    expected = x.double().repeat(samples, 1) * (1 - z) / (1 - p)
    torch.testing.assert_close(pred.samples.double(), expected.view(samples, batch, features), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_relaxed_mc_mean_and_keep_probability_follow_the_mask_law(p: float) -> None:
    """Over many passes: P(1 - z >= 1/2) = 1 - p exactly, and E[output] = x * E[1 - z] / (1 - p).

    E[1 - z] (close to, but not exactly, 1 - p at t = 0.1) is the midpoint-rule integral over u ~ U(0, 1).
    """
    site = ConcreteDropout(p)
    x = torch.full((8, 250), 2.0)
    samples = 100
    pred = mc_predict(nn.Sequential(site), x, samples, generator=seeded(9), task="regression", return_samples=True)
    theta = site.p_logit.item()
    p = 1 / (1 + math.exp(-theta))
    ratio = pred.samples.double() / 2.0  # (1 - z) / (1 - p) per element
    n = ratio.numel()
    kept = (ratio * (1 - p) >= 0.5).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    law = torch.sigmoid(-(theta + torch.log(u) - torch.log1p(-u)) / site.temperature) / (1 - p)
    assert abs(ratio.mean().item() - law.mean().item()) < 5 * law.std().item() / math.sqrt(n)
    assert abs(law.mean().item() - 1) < 0.03  # the inverted-dropout scaling keeps the mean near x


def test_invalid_arguments() -> None:
    model = classifier()
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match="samples"):
        mc_predict(model, x, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        mc_predict(model, x, 4, chunk_size=0)
    with pytest.raises(ValueError, match="task"):
        mc_predict(model, x, 4, task="segmentation")
    with pytest.raises(ValueError, match="sampling"):
        mc_predict(model, x, 4, sampling="soft")
    with pytest.raises(TypeError, match="Generator"):
        mc_predict(model, x, 4, generator=0)
    with pytest.raises(ValueError, match="cd_convert.convert"):
        mc_predict(nn.Linear(20, 5), x, 4)
    with pytest.raises(ValueError, match="batch size"):
        mc_predict(model, (x, torch.randn(3, 20)), 4)
    # A 1-D output is not (B, ..., C) logits.
    flat = nn.Sequential(ConcreteDropout(0.1), nn.Linear(20, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"\(B, \.\.\., C\) logits"):
        mc_predict(flat, x, 4, task="classification")
    assert model.training  # every refusal left the model as it was


def test_tuple_inputs_are_all_repeated() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.site = ConcreteDropout(0.2)
            self.head = nn.Linear(8, 3)

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return self.head(self.site(torch.cat([a, b], dim=1)))

    pred = mc_predict(TwoInputs(), (torch.randn(5, 4), torch.randn(5, 4)), 10, chunk_size=7)
    assert isinstance(pred, ClassificationPrediction) and pred.probs.shape == (5, 3)


# ------------------------------------------------------------------------------- mc_predict: regression


def test_task_inference() -> None:
    x = torch.randn(4, 3)
    col = nn.Sequential(ConcreteDropout(0.2), nn.Linear(3, 1))
    flat = nn.Sequential(ConcreteDropout(0.2), nn.Linear(3, 1), nn.Flatten(0))
    logits = nn.Sequential(ConcreteDropout(0.2), nn.Linear(3, 2))
    assert isinstance(mc_predict(col, x, 3), RegressionPrediction)
    assert mc_predict(flat, x, 3).mean.shape == (4,)
    assert isinstance(mc_predict(HeteroscedasticNet(), x, 3), RegressionPrediction)
    assert isinstance(mc_predict(logits, x, 3), ClassificationPrediction)
    assert isinstance(mc_predict(logits, x, 3, task="regression"), RegressionPrediction)


def test_regression_decomposition_matches_a_loop_with_the_same_seed() -> None:
    torch.manual_seed(0)
    net = HeteroscedasticNet().eval()
    x = torch.randn(9, 3)
    samples = 50
    # chunk_size = B: one forward pass per MC sample, exactly the loop below with the same seed.
    pred = mc_predict(net, x, samples, chunk_size=9, generator=seeded(11), return_samples=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(11))
        with mc_mode(net), torch.no_grad():
            passes = [net(x) for _ in range(samples)]
    mu = torch.stack([m for m, _ in passes])
    log_var = torch.stack([lv for _, lv in passes])
    torch.testing.assert_close(pred.samples, mu)
    torch.testing.assert_close(pred.log_variance_samples, log_var)
    torch.testing.assert_close(pred.mean, mu.mean(0))
    population_variance = ((mu - mu.mean(0)) ** 2).sum(0) / samples
    torch.testing.assert_close(pred.epistemic, population_variance)
    torch.testing.assert_close(pred.aleatoric, log_var.exp().mean(0))
    torch.testing.assert_close(pred.variance, pred.epistemic + pred.aleatoric)
    assert float(pred.epistemic.min()) > 0
    target = torch.randn(9, 1)
    assert pred.test_log_likelihood(target) == pytest.approx(
        gaussian_test_log_likelihood(mu, target, sigma2=log_var.exp())
    )


def test_homoscedastic_regression_has_zero_aleatoric() -> None:
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), ConcreteDropout(0.3), nn.Linear(16, 1))
    x = torch.randn(7, 3)
    pred = mc_predict(model, x, 30, generator=seeded(0))
    assert torch.equal(pred.aleatoric, torch.zeros(7, 1))
    assert torch.equal(pred.variance, pred.epistemic)
    with pytest.raises(ValueError, match="return_samples"):
        pred.test_log_likelihood(torch.zeros(7, 1), noise_variance=0.1)
    kept = mc_predict(model, x, 30, generator=seeded(0), return_samples=True)
    assert kept.log_variance_samples is None
    with pytest.raises(ValueError, match="noise_variance"):
        kept.test_log_likelihood(torch.zeros(7, 1))
    assert math.isfinite(kept.test_log_likelihood(torch.zeros(7, 1), noise_variance=0.1))


@pytest.mark.parametrize(
    "features,batch,samples,expected",
    [
        # 784 fp32 features = 3136 bytes a row: 1 MiB holds 334 rows = 20 passes of 16; 64 passes run as 4 x 16.
        (784, 16, 64, [256] * 4),
        # 33 passes fit; 50 passes run as two equal chunks of 25, not 33 + 17.
        (784, 10, 50, [250, 250]),
        # Everything fits in one chunk.
        (20, 8, 30, [240]),
        # A row larger than the byte cap: one pass per chunk, never less.
        (DEFAULT_CHUNK_BYTES_CPU // 4 + 1, 2, 3, [2, 2, 2]),
    ],
)
def test_default_cpu_chunks_hold_whole_passes_within_the_byte_cap(features, batch, samples, expected):
    model = RowCounter(features)
    mc_predict(model, torch.randn(batch, features), samples)
    assert model.rows == expected


def test_sequence_logits_and_keyword_inputs() -> None:
    """(B, L, C) logits from keyword inputs (a transformers-style call): per-position mean and entropy."""

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = ConcreteDropout(0.3)
            self.head = nn.Linear(6, 5)

        def forward(self, *, features: torch.Tensor, scale: float) -> dict:
            return {"logits": self.head(self.drop(features)) * scale}

    torch.manual_seed(0)
    model = Tagger()
    x = torch.randn(3, 4, 6)
    pred = mc_predict(model, {"features": x, "scale": 2.0}, 16, chunk_size=9, return_samples=True)
    assert pred.probs.shape == (3, 4, 5) and pred.entropy.shape == (3, 4)
    mean = pred.samples.mean(0)
    assert torch.allclose(pred.probs, mean, atol=1e-6)
    by_hand = -(mean * mean.log()).sum(-1)
    assert torch.allclose(pred.entropy, by_hand, atol=1e-5)
    per_pass = -(pred.samples * pred.samples.log()).sum(-1).mean(0)
    assert torch.allclose(pred.mutual_information, (by_hand - per_pass).clamp_min(0), atol=1e-5)
    assert not torch.allclose(pred.samples[0], pred.samples[1])  # every pass draws its own mask
    # Rows go back to their examples, also when a chunk (7 rows) cuts through a pass of 3: with a rate near 0
    # every pass is the deterministic output.
    with torch.no_grad():
        model.drop.p_logit.fill_(-12.0)
        exact = torch.softmax(model.eval()(features=x, scale=2.0)["logits"], -1)
    pred = mc_predict(model, {"features": x, "scale": 2.0}, 5, chunk_size=7)
    assert torch.allclose(pred.probs, exact, atol=1e-3)
