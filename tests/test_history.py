"""Tests for cd_convert.history.RateLogger."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn as nn

from cd_convert.collector import COLLECTOR_ATTR, Application, Collector, dropout_rates
from cd_convert.history import RateLogger
from cd_convert.layers import ConcreteDropout, ConcreteDropout2d


def model() -> nn.Sequential:
    return nn.Sequential(
        ConcreteDropout(0.1), nn.Linear(8, 16), nn.ReLU(), ConcreteDropout(0.3), nn.Linear(16, 2)
    )


def set_p(site: ConcreteDropout, p: float) -> None:
    with torch.no_grad():
        site.p_logit.fill_(math.log(p) - math.log1p(-p))


def test_logs_the_current_rates_of_every_site() -> None:
    net = model()
    logger = RateLogger(net)
    first = logger.log(epoch=0, loss=1.5)
    assert first["epoch"] == 0 and first["loss"] == 1.5
    assert first["rates"] == pytest.approx({"0": 0.1, "3": 0.3})
    set_p(net[0], 0.05)
    set_p(net[3], 0.4)
    logger.log(epoch=1, loss=torch.tensor(0.75))
    assert logger.history[1]["rates"] == pytest.approx({"0": 0.05, "3": 0.4})
    assert logger.epochs == [0, 1]
    table = logger.as_table()
    assert list(table) == ["0", "3"]
    assert table["0"] == pytest.approx([0.1, 0.05]) and table["3"] == pytest.approx([0.3, 0.4])
    # A one-element tensor is stored as a Python number (no tensor, or autograd graph, kept alive).
    assert logger.history[1]["loss"] == 0.75 and isinstance(logger.history[1]["loss"], float)
    assert len(logger) == 2 and "2 records" in repr(logger)


def test_default_epoch_is_the_record_index_and_reserved_keys_are_refused() -> None:
    logger = RateLogger(model())
    logger.log()
    logger.log()
    assert logger.epochs == [0, 1]
    with pytest.raises(ValueError, match="reserved"):
        logger.log(rates=1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        RateLogger("model")  # type: ignore[arg-type]


def test_to_csv_round_trip(tmp_path) -> None:
    net = model()
    logger = RateLogger(net)
    logger.log(epoch=0, loss=torch.tensor(2.0))
    set_p(net[3], 0.25)
    logger.log(epoch=1, accuracy=0.9)
    path = tmp_path / "rates.csv"
    logger.to_csv(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "0", "3"]
    assert float(rows[0]["loss"]) == 2.0 and rows[0]["accuracy"] == ""
    assert rows[1]["loss"] == "" and float(rows[1]["accuracy"]) == 0.9
    assert float(rows[0]["3"]) == pytest.approx(0.3)
    assert float(rows[1]["3"]) == pytest.approx(0.25)


def test_site_added_later_is_nan_in_earlier_records() -> None:
    net = model()
    logger = RateLogger(net)
    logger.log()
    net.add_module("extra", ConcreteDropout2d(0.2))
    logger.log()
    table = logger.as_table()
    assert math.isnan(table["extra"][0]) and table["extra"][1] == pytest.approx(0.2)


def test_converted_model_uses_collector_names_and_adds_other_sites() -> None:
    # A converted model: the collector knows one site; a site it does not know is still reported.
    net = model()
    setattr(net, COLLECTOR_ATTR, Collector(applications=[Application("3", "4.weight", 16)]))
    rates = dropout_rates(net)
    assert list(rates) == ["3", "0"]
    assert rates == pytest.approx({"3": 0.3, "0": 0.1})
    wrapper = nn.Sequential(net)
    assert dropout_rates(wrapper) == pytest.approx({"0.3": 0.3, "0.0": 0.1})
    assert dropout_rates(nn.Linear(2, 2)) == {}
