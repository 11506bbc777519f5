"""The per-site report of a conversion (planned or done)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["Report", "SiteRow"]


@dataclass
class SiteRow:
    """One line of the report.

    Attributes:
        name: the site's qualified name (or the module's, for what was left alone).
        kind: "module", "functional", "fused", "targeted", or "-" for what is not converted.
        status: "converted", "planned", "existing", "unsupported", "not a dropout site", "not called",
            "output unused", ...
        original: what it was (``nn.Dropout(p=0.1)``, ``F.dropout in Net.forward``, ``Linear(64->10) input``).
        original_p: the original rate, if any.
        p: the current learned rate (the initial rate in a plan).
        consumer: the consuming weight(s), or "" with the reason in ``notes``.
        found_by: "fx", "module search", "dry run", "targets".
        called: True (seen running), None (not confirmed), False (never called).
        notes: anything the user should know.
    """

    name: str
    kind: str
    status: str
    original: str
    original_p: Optional[float] = None
    p: Optional[float] = None
    consumer: str = ""
    found_by: str = ""
    called: Optional[bool] = None
    notes: List[str] = field(default_factory=list)


@dataclass
class Report:
    """What ``convert`` did (or, from ``plan``, would do).

    Attributes:
        rows: one per site and per thing left alone.
        method: how sites were found ("fx", "fx + module search", "module search", with "dry run").
        notes: conversion-level notes (e.g. why torch.fx failed).
        regularizer: how the regulariser's constants were set.
    """

    rows: List[SiteRow] = field(default_factory=list)
    method: str = ""
    notes: List[str] = field(default_factory=list)
    regularizer: str = ""

    @property
    def sites(self) -> List[SiteRow]:
        """Rows that are (or will be) concrete sites."""
        return [r for r in self.rows if r.status in ("converted", "planned", "existing")]

    def to_dict(self) -> Dict[str, Any]:
        """Plain data for code: ``{"method", "notes", "regularizer", "sites": [...], "other": [...]}``."""
        sites = self.sites
        return {
            "method": self.method,
            "notes": list(self.notes),
            "regularizer": self.regularizer,
            "sites": [asdict(r) for r in sites],
            "other": [asdict(r) for r in self.rows if r not in sites],
        }

    def __str__(self) -> str:
        header = ("site", "kind", "status", "original", "p0", "p", "consumer", "found by", "called")
        lines = []
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    r.kind,
                    r.status,
                    r.original,
                    "" if r.original_p is None else f"{r.original_p:.3g}",
                    "" if r.p is None else f"{r.p:.4f}",
                    _short_consumer(r.consumer),
                    r.found_by,
                    {True: "yes", False: "no", None: "?"}[r.called],
                )
            )
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"cd_convert report: {len(self.sites)} site(s), found by {self.method or '-'}"]
        if self.regularizer:
            out.append(f"regulariser: {self.regularizer}")
        out.append(fmt.format(*header))
        out.append(fmt.format(*("-" * w for w in widths)))
        out.extend(fmt.format(*line) for line in lines)
        out.append("called: yes = seen running, no = never called (no site made), ? = not confirmed (no dry run)")
        grouped: Dict[str, List[str]] = {}
        for r in self.rows:
            for note in r.notes:
                grouped.setdefault(note, []).append(r.name)
        if grouped or self.notes:
            out.append("notes:")
            out.extend(f"  - {n}" for n in self.notes)
            out.extend(f"  - {_names(names)}: {note}" for note, names in grouped.items())
        return "\n".join(out)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython
        printer.text(str(self))


def _short_consumer(consumer: str) -> str:
    """The table cell of a consumer list: the first weight and how many more (``to_dict`` has them all)."""
    weights = [w for part in consumer.split(" | ") for w in part.split(", ") if w]
    if not weights:
        return "-"
    return weights[0] if len(weights) == 1 else f"{weights[0]} +{len(weights) - 1}"


def _names(names: List[str]) -> str:
    """Sites sharing one note: all of a few, or the first three and a count."""
    if len(names) <= 3:
        return ", ".join(names)
    return f"{', '.join(names[:3])} and {len(names) - 3} more ({len(names)} sites)"
