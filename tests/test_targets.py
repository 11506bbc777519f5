"""Targeting: types, globs, regexes, predicates, exclude; warnings and refusals."""
from __future__ import annotations

import re
import warnings

import pytest
import torch.nn as nn

import cd_convert
from cd_convert.errors import TargetError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout2d(0.1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))

    def forward(self, x):
        return self.classifier(self.features(x))


def _sites(model, **kwargs):
    converted = cd_convert.convert(Net() if model is None else model, dataset_size=10, **kwargs)
    return sorted(cd_convert.dropout_rates(converted))


def test_glob_regex_predicate_and_types_mixed():
    # A targeted Linear whose input is a dropout's output (classifier.1 reads features.2 through Flatten,
    # classifier.4 reads classifier.3) absorbs that dropout: one site per tensor, no second site in front.
    assert _sites(None, targets=["classifier.*"]) == ["classifier.3", "features.2"]
    assert _sites(None, targets=[re.compile(r"classifier\.\d")]) == _sites(None, targets=["classifier.?"])
    assert _sites(None, targets=[lambda name, m: isinstance(m, nn.Conv2d)]) == ["features.0.concrete_dropout"]
    assert _sites(None, targets=[nn.Conv2d, "classifier.4"]) == ["classifier.3", "features.0.concrete_dropout"]
    assert _sites(None, targets=[nn.Dropout]) == ["classifier.3"]  # nn.Dropout2d is not an nn.Dropout


def test_regex_must_match_whole_name():
    with pytest.raises(TargetError, match="matched nothing"):
        with pytest.warns(UserWarning):
            _sites(None, targets=[re.compile(r"classifier")])


def test_exclude_forms():
    # classifier.4 excluded: classifier.3 stays fixed; classifier.1 absorbs features.2 (through Flatten)
    assert _sites(None, targets=[nn.Linear], exclude=["classifier.4"]) == ["features.2"]
    assert _sites(None, exclude=[re.compile(r"features\..*")]) == ["classifier.3"]
    assert _sites(None, exclude=[lambda name, m: isinstance(m, nn.Dropout)]) == ["features.2"]


def test_entry_matching_nothing_warns_with_its_name():
    with pytest.warns(UserWarning, match="'nothing.here'"):
        assert _sites(None, targets=[nn.Linear, "nothing.here"]) == ["classifier.3", "features.2"]


def test_nothing_matched_lists_the_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TargetError) as err:
            _sites(None, targets=["head.*"])
    text = str(err.value)
    assert "features.2" in text and "classifier.3" in text  # dropout sites
    assert "classifier.1 (Linear)" in text and "features.0 (Conv2d)" in text  # targetable layers


@pytest.mark.parametrize("entry,reason", [
    (nn.LSTM, "recurrent"),
    (nn.MultiheadAttention, "MultiheadAttention"),
    (nn.Embedding, "indices"),
    (nn.ReLU, "not a layer a site can be placed"),
    (3, "not understood"),
    ("", "empty string"),
])
def test_unsupported_entries_refused_with_reason(entry, reason):
    model = Net()
    keys = list(model.state_dict())
    with pytest.raises(TargetError, match=reason):
        cd_convert.convert(model, targets=[entry], dataset_size=10, inplace=True)
    assert list(model.state_dict()) == keys


def test_plan_reports_without_changing():
    model = Net()
    report = cd_convert.plan(model, targets=[nn.Linear], exclude=["classifier.1"])
    assert [r.name for r in report.sites] == ["classifier.3"]  # absorbed by classifier.4
    assert all(not hasattr(m, "concrete_dropout") for m in model.modules())
    assert "planned" in str(report)
