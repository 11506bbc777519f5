"""The temperatures passed to ``convert`` reach the sites they name, seen in the masks the sites draw.

A relaxed Concrete mask is ``keep = sigmoid(-(theta + logit(u)) / t)`` with ``u ~ U(0, 1)`` and ``theta`` the
site's logit (Gal et al. 2017, eq. 5, written for the kept fraction). Given an output ``y = x * keep / (1 - p)``
with ``x = 1``, the noise that produced it is ``u = sigmoid(-t * logit(keep) - theta)``, which is uniform only
when ``t`` is the temperature the site really used. The tests invert the masks with the temperature they asked
for and test the recovered noise for uniformity; a site using any other temperature fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import cd_convert as cd

#: Temperatures far from the class defaults (0.1 and 2/3) and from each other, so a swap shows.
ELEMENT_T, CHANNEL_T = 0.5, 0.9


class _TwoKinds(nn.Module):
    """An element-wise and a channel-wise dropout module, each in front of a weight layer."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 8)
        self.drop2d = nn.Dropout2d(0.3)
        self.conv = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.drop(x))
        return self.conv(self.drop2d(h[:, :, None, None]))


def _recovered_uniforms(site: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Run ``site`` on ``x`` (all ones) and invert its mask with ``temperature``, in float64."""
    theta = float(site.p_logit.detach().double())
    p = 1.0 / (1.0 + math.exp(-theta))
    with torch.no_grad():
        keep = site(x).double() * (1.0 - p)
    keep = keep.clamp(1e-12, 1 - 1e-12)  # saturated masks lie in the tails; they do not move the KS statistic
    return torch.sigmoid(-temperature * torch.logit(keep) - theta).flatten()


def _ks_statistic(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample ``u`` from U(0, 1)."""
    u, _ = torch.sort(u)
    n = u.numel()
    ranks = torch.arange(1, n + 1, dtype=u.dtype)
    return float(torch.maximum(ranks / n - u, u - (ranks - 1) / n).max())


def test_convert_temperature_options_reach_their_kind_of_site():
    torch.manual_seed(0)
    model = cd.convert(_TwoKinds(), temperature=ELEMENT_T, channel_temperature=CHANNEL_T, dataset_size=100)
    model.train()
    drop, drop2d = model.drop, model.drop2d
    assert (drop.temperature, drop2d.temperature) == (ELEMENT_T, CHANNEL_T)
    n = 20000
    element = _recovered_uniforms(drop, torch.ones(n, 1), ELEMENT_T)
    channel = _recovered_uniforms(drop2d, torch.ones(n, 1, 1, 1), CHANNEL_T)
    # 1.63 / sqrt(n) is the 1% critical value; a mask drawn at the other temperature gives about 0.1 here.
    bound = 1.63 / math.sqrt(n)
    assert _ks_statistic(element) < bound
    assert _ks_statistic(channel) < bound
    # The same masks read with the other kind's temperature are not uniform: the check has power.
    assert _ks_statistic(_recovered_uniforms(drop, torch.ones(n, 1), CHANNEL_T)) > 5 * bound


def test_site_class_defaults_when_no_temperature_is_given():
    model = cd.convert(_TwoKinds(), dataset_size=100)
    assert model.drop.temperature == pytest.approx(0.1)
    assert model.drop2d.temperature == pytest.approx(2 / 3)


@pytest.mark.parametrize("temperature", [0.4, 1.5])  # small t saturates fp32 masks to exactly 0 or 1
def test_hand_written_site_uses_its_own_temperature(temperature):
    torch.manual_seed(1)
    site = cd.ConcreteDropout(init_p=0.3, temperature=temperature).train()
    assert site.temperature == temperature
    n = 20000
    u = _recovered_uniforms(site, torch.ones(n), temperature)
    assert _ks_statistic(u) < 1.63 / math.sqrt(n)
