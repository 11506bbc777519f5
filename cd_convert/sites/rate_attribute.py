"""Dropout modules whose rate is only *read*: ``dropout=self.dropout.p`` passed to an attention function.

Such a module (BERT's, DistilBERT's and GPT-2's attention dropout under SDPA) is never called; replacing it
would turn its ``.p`` into a tensor where the model expects a float. The call that receives the rate is the
learned site (found by the dry run, which traces each call's rate to the attribute it reads); the module
stays in place, its row says "rate read", and ``freeze`` writes the learned rate into its ``.p``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from ..found import FoundSite
from ..report import SiteRow
from ..targets import is_dropout_module
from .base import SiteKind

if TYPE_CHECKING:
    from ..planning import Planner


def rates_read_by_calls(planner: "Planner") -> Dict[str, FoundSite]:
    """Dropout modules whose ``p`` a call found by the dry run reads -> that call (cached on the planner)."""
    cached = planner.cache.get("rates_read")
    if cached is None:
        cached = {}
        for found in planner.discovery.sites:
            holder = found.rate_holder
            if found.module_name is None and holder and holder.endswith(".p"):
                module = planner.modules.get(holder[: -len(".p")])
                if module is not None and is_dropout_module(module):
                    cached[holder[: -len(".p")]] = found
        planner.cache["rates_read"] = cached
    return cached


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
        reader = rates_read_by_calls(planner)[found.module_name]
        where = f"{reader.owner or '<root>'}.{reader.method}"
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
