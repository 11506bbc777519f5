"""freeze / unconvert of a model whose concrete sites are written in its own code (issue 14, fix 1).

``convert`` registers such sites as "existing"; ``freeze`` must still give a plain PyTorch model (each site the
``nn.Dropout*`` of its kind at the same path, with the learned rate), and ``unconvert`` must leave them as the
user wrote them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import cd_convert
from cd_convert import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d

#: The rates the sites are given after conversion, as if training had learned them.
LEARNED = {"drop": 0.15, "drop1d": 0.35, "drop2d": 0.45, "drop3d": 0.55}


class ElementwiseOnly(cd_convert.ConcreteDropoutBase):
    """A user's own element-wise site class, derived from the public base."""


class HandWritten(nn.Module):
    """One hand-written site of each kind; ``alias`` holds ``drop`` under a second name."""

    def __init__(self, element=ConcreteDropout, d1=ConcreteDropout1d, d2=ConcreteDropout2d, d3=ConcreteDropout3d):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.drop = element(0.2)
        self.alias = self.drop
        self.out = nn.Linear(8, 2)
        self.conv1 = nn.Conv1d(2, 3, 3, padding=1)
        self.drop1d = d1(0.2)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)
        self.drop2d = d2(0.2)
        self.conv3 = nn.Conv3d(2, 3, 1)
        self.drop3d = d3(0.2)

    def forward(self, x, seq, img, vol):
        h = self.out(self.alias(torch.relu(self.fc(x))))
        return h, self.drop1d(self.conv1(seq)), self.drop2d(self.conv2(img)), self.drop3d(self.conv3(vol))


def _plain_twin() -> nn.Module:
    """The same model written with torch.nn's dropouts only: what a frozen checkpoint must load into."""
    return HandWritten(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(4, 6, generator=g),
        torch.randn(4, 2, 5, generator=g),
        torch.randn(4, 2, 5, 5, generator=g),
        torch.randn(4, 2, 3, 3, 3, generator=g),
    )


def _converted(model: nn.Module) -> nn.Module:
    converted = cd_convert.convert(model, dataset_size=100)
    with torch.no_grad():
        for name, p in LEARNED.items():
            getattr(converted, name).p_logit.fill_(math.log(p / (1 - p)))
    return converted


def test_freeze_turns_handwritten_sites_into_plain_dropout():
    torch.manual_seed(0)
    converted = _converted(HandWritten())
    assert {r.name: r.status for r in cd_convert.report(converted).sites} == dict.fromkeys(LEARNED, "existing")
    frozen = cd_convert.freeze(converted)

    expected = {"drop": nn.Dropout, "drop1d": nn.Dropout1d, "drop2d": nn.Dropout2d, "drop3d": nn.Dropout3d}
    for name, klass in expected.items():
        module = getattr(frozen, name)
        assert type(module) is klass, name
        assert module.p == pytest.approx(LEARNED[name], abs=1e-6)  # p_logit is fp32
    assert frozen.alias is frozen.drop  # one module at both paths, as in the user's model
    assert not any(type(m).__module__.startswith("cd_convert") for m in frozen.modules())
    assert not any("p_logit" in key for key in frozen.state_dict())
    assert not any(k.startswith("_cd_convert") for m in frozen.modules() for k in vars(m))
    # freeze works on a copy: the converted model keeps its sites.
    assert isinstance(converted.drop, ConcreteDropout)

    inputs = _inputs()
    converted.eval()
    frozen.eval()
    for a, b in zip(converted(*inputs), frozen(*inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    plain = _plain_twin()
    plain.load_state_dict(frozen.state_dict())  # strict: same keys, nothing extra
    plain.eval()
    for a, b in zip(frozen(*inputs), plain(*inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_freeze_of_a_direct_base_subclass_and_training_mode():
    """A user's site class derived from ConcreteDropoutBase (element-wise) freezes to nn.Dropout; modes are kept."""
    converted = _converted(HandWritten(element=ElementwiseOnly))
    converted.train()
    frozen = cd_convert.freeze(converted)
    assert type(frozen.drop) is nn.Dropout and frozen.drop.p == pytest.approx(LEARNED["drop"], abs=1e-6)
    assert frozen.drop.training


def test_unconvert_leaves_handwritten_sites_as_they_were():
    torch.manual_seed(0)
    model = HandWritten()
    sites = {name: getattr(model, name) for name in LEARNED}
    converted = _converted(model)  # a copy: its sites are the copy's
    own = {name: getattr(converted, name) for name in LEARNED}
    keys = set(converted.state_dict())
    restored = cd_convert.unconvert(converted)
    for name, site in own.items():
        assert getattr(restored, name) is site
        # The learned rate is the user's to keep.
        assert float(site.p.detach()) == pytest.approx(LEARNED[name], abs=1e-6)
    assert restored.alias is restored.drop
    assert set(restored.state_dict()) == keys
    assert "_cd_convert_collector" not in vars(restored)  # no longer converted
    assert all(getattr(model, name) is site for name, site in sites.items())  # the original was not touched


def test_freeze_after_converting_twice_freezes_each_site_once():
    """Converting a converted model again must not record the hand-written sites a second time."""
    converted = cd_convert.convert(_converted(HandWritten()), dataset_size=100)
    collector = vars(converted)["_cd_convert_collector"]
    names = [c.site_name for c in collector.changes]
    assert sorted(names) == sorted(LEARNED)
    frozen = cd_convert.freeze(converted)
    assert type(frozen.drop2d) is nn.Dropout2d and frozen.drop2d.p == pytest.approx(LEARNED["drop2d"], abs=1e-6)
