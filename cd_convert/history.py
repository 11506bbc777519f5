"""Recording the learned dropout rates over training.

:class:`RateLogger` is a small helper called from the user's own training loop; it does not hook into
anything::

    logger = RateLogger(model)
    for epoch in range(epochs):
        ...train one epoch...
        logger.log(epoch=epoch, loss=float(loss))
    logger.to_csv("rates.csv")
    cd_convert.plots.rates_over_training(logger, path="rates.png")
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from .collector import dropout_rates

__all__ = ["RESERVED_KEYS", "RateLogger", "site_rates"]

#: Keys of a history record that are not free scalars.
RESERVED_KEYS = ("epoch", "rates")

#: The former name of :func:`cd_convert.dropout_rates` here (the same function): every site of any module.
site_rates = dropout_rates


class RateLogger:
    """Record ``{site: p}`` each time :meth:`log` is called, plus any scalars passed along.

    Args:
        model: the model whose sites are read (converted or hand-written with ConcreteDropout layers).

    Attributes:
        history: one dict per :meth:`log` call: ``{"epoch": e, "rates": {site: p}, **scalars}``.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RateLogger expects an nn.Module, got {type(model).__name__}.")
        self.model = model
        self.history: List[Dict[str, Any]] = []

    def log(self, epoch: Optional[Union[int, float]] = None, **scalars: Any) -> Dict[str, Any]:
        """Record the current rates.

        Args:
            epoch: the x-value of this record (epoch, or a fractional epoch / step); defaults to the
                number of records so far.
            **scalars: extra values to keep with the record (loss, accuracy, ...); ``epoch`` and
                ``rates`` are reserved. One-element tensors are stored as Python numbers.

        Returns:
            The record appended to :attr:`history`.
        """
        clash = [key for key in scalars if key in RESERVED_KEYS]
        if clash:
            raise ValueError(f"{clash} are reserved record keys; pass other names for extra scalars.")
        record: Dict[str, Any] = {
            "epoch": len(self.history) if epoch is None else epoch,
            "rates": dropout_rates(self.model),
            **{key: _scalar(value) for key, value in scalars.items()},
        }
        self.history.append(record)
        return record

    @property
    def epochs(self) -> List[Union[int, float]]:
        """The ``epoch`` of every record, in order."""
        return [record["epoch"] for record in self.history]

    def sites(self) -> List[str]:
        """Every site name seen in any record, in first-seen order."""
        names: Dict[str, None] = {}
        for record in self.history:
            for name in record["rates"]:
                names.setdefault(name, None)
        return list(names)

    def scalar_names(self) -> List[str]:
        """Every extra scalar name seen in any record, in first-seen order."""
        names: Dict[str, None] = {}
        for record in self.history:
            for key in record:
                if key not in RESERVED_KEYS:
                    names.setdefault(key, None)
        return list(names)

    def as_table(self) -> Dict[str, List[float]]:
        """The rates as one series per site.

        Returns:
            ``{site: [p at record 0, p at record 1, ...]}``; NaN where a site was absent from a record
            (e.g. a site added to the model part-way through training).
        """
        return {name: [record["rates"].get(name, math.nan) for record in self.history] for name in self.sites()}

    def to_csv(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the history as CSV: columns ``epoch``, the extra scalars, then one column per site.

        Args:
            path: file to write; missing values are left empty.
        """
        scalar_names = self.scalar_names()
        site_names = self.sites()
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", *scalar_names, *site_names])
            for record in self.history:
                row = [record["epoch"]]
                row += [_cell(record.get(name)) for name in scalar_names]
                row += [_cell(record["rates"].get(name)) for name in site_names]
                writer.writerow(row)

    def __len__(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        return f"RateLogger({len(self.history)} records, {len(self.sites())} sites)"


def _scalar(value: Any) -> Any:
    # A loss tensor passed as-is would keep its autograd graph (and device memory) alive in the history.
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _cell(value: Any) -> Any:
    return "" if value is None else value
