"""Dropout modules whose rate is only *read*: ``dropout=self.dropout.p`` passed to an attention function.

Such a module (BERT's, DistilBERT's and GPT-2's attention dropout under SDPA) is never called; replacing it
would turn its ``.p`` into a tensor where the model expects a float. The call that receives the rate is the
learned site (found by the dry run, which traces each call's rate to the attribute it reads); the module
stays in place, its row says "rate read", and ``freeze`` writes the learned rate into its ``.p``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from ..collector import get_collector
from ..found import FoundSite
from ..report import SiteRow
from ..targets import is_dropout_module
from .base import SiteKind, joined
from .routed import RoutedSite

if TYPE_CHECKING:
    from ..planning import Planner

__all__ = ["RateAttributeKind"]


def rates_read_by_calls(planner: "Planner") -> Dict[str, str]:
    """Dropout modules whose ``p`` a call reads -> ``"owner.method"`` of that call (cached on the planner).

    The calls are those the dry run traced, and, on a model converted before, the routed sites that write
    their learned rate into a dropout module's ``p`` (their calls now go to the site, not to the module).
    """
    cached = planner.cache.get("rates_read")
    if cached is None:
        cached = {}
        for found in planner.discovery.sites:
            holder = found.rate_holder
            if found.module_name is None and holder and holder.endswith(".p"):
                cached[holder[: -len(".p")]] = f"{found.owner or '<root>'}.{found.method}"
        collector = get_collector(planner.model)
        for change in collector.changes if collector is not None else ():
            rate = getattr(change, "rate_attribute", None)
            if isinstance(change, RoutedSite) and rate and rate.endswith(".p"):
                cached[joined(change.owner, rate[: -len(".p")])] = f"{change.owner or '<root>'}.{change.method}"
        planner.cache["rates_read"] = {
            path: where for path, where in cached.items() if is_dropout_module(planner.modules.get(path, None))
        }
    return planner.cache["rates_read"]


class RateAttributeKind(SiteKind):
    """A dropout module that is never called but whose rate a call reads."""

    name = "rate read"

    def claims(self, found: FoundSite, planner: "Planner") -> bool:
        return (
            found.module_name is not None
            and found.called is not True
            and found.module_name in rates_read_by_calls(planner)
        )

    def plan(self, planner: "Planner", found: FoundSite) -> None:
        where = rates_read_by_calls(planner)[found.module_name]
        planner.rows.append(
            SiteRow(
                found.module_name or "",
                "-",
                self.name,
                f"{type(planner.modules[found.module_name]).__name__}(p={found.p:.3g})",
                found.p,
                found_by=found.found_by,
                called=found.called,
                notes=[
                    f"never called; its rate is passed to the dropout call in {where}, which becomes the learned site"
                ],
            )
        )
