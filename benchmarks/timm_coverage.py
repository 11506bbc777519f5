"""Coverage sweep of cd_convert over the timm registry.

    python -m benchmarks.timm_coverage --pattern 'resnet*' --max-params 5 --limit 20 --csv results/timm.csv
    python -m benchmarks.timm_coverage --meta-only --csv results/timm_meta.csv

For each model (always ``pretrained=False``):

* create the model (``drop_rate`` so head dropout exists), count parameters on the meta device;
* convert it with :func:`cd_convert.convert` (timed), record the sites, their kinds and the discovery method;
* with real tensors (unless ``--meta-only``): eval-mode output equal to the unconverted model's (same
  weights; ``torch.equal``, else ``allclose`` with a tiny tolerance, and which one is reported), one training
  step where the data loss and ``regularization(model)`` are finite, and after backward of the data loss
  ALONE every added ``p_logit`` parameter has a nonzero gradient.

Status per model: ``passed`` / ``failed:<stage>:<error>`` / ``not convertible:<reason>`` / ``skipped:<reason>``.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import sys
import time
import traceback
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from benchmarks.common import Timeout, guard

FIELDS = ("name", "params_M", "status", "reason", "n_sites", "kinds", "convert_s", "method", "equal", "seconds", "note")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(err).__name__}: {msg}"[:200]


class Failure(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def count_params_meta(timm, name: str, kwargs: Dict[str, Any]) -> float:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters()) / 1e6


def create(timm, name: str, drop_rate: float, img_size: Optional[int], device: Optional[str] = None):
    """Create ``name``; returns (model, input size (C, H, W), whether img_size was passed)."""
    kwargs: Dict[str, Any] = {"pretrained": False}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    ctx = torch.device(device) if device else _null()
    if drop_rate and not _accepts_drop_rate(timm, name):
        kwargs.pop("drop_rate")
    with ctx:
        if img_size:
            try:
                model = timm.create_model(name, img_size=img_size, **kwargs)
                return model, _cfg_size(model, img_size), True
            except TypeError:
                pass
            except Exception:  # noqa: BLE001 - model rejects that size: fall back to the default one
                pass
        model = timm.create_model(name, **kwargs)
    # No img_size argument (most CNNs): still try the small input first; _real falls back to the
    # pretrained size when the forward fails at it.
    return model, _cfg_size(model, img_size), False


def _accepts_drop_rate(timm, name: str) -> bool:
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, drop_rate=0.1)
        return True
    except TypeError as err:
        return "drop_rate" not in str(err)


@contextmanager
def _null():
    yield


def _cfg_size(model: nn.Module, img_size: Optional[int]) -> Tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    if len(size) != 3:
        size = (3, 224, 224)
    if img_size:
        return (size[0], img_size, img_size)
    return size  # type: ignore[return-value]


def site_kinds(rep) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(Counter(r.kind for r in rep.sites).items()))


def added_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith("p_logit")]


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "equal"
    if a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        return "allclose"
    raise Failure("failed:eval-equal", f"max abs diff {(a - b).abs().max().item():.3g}")


def _outputs(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def run_one(timm, cd, name: str, args) -> Dict[str, Any]:
    row: Dict[str, Any] = {k: "" for k in FIELDS}
    row["name"] = name
    start = time.perf_counter()
    try:
        with guard(args.timeout):
            pk = {"drop_rate": args.drop_rate} if args.drop_rate and _accepts_drop_rate(timm, name) else {}
            if args.drop_rate and not pk:
                row["note"] = "model takes no drop_rate"
            try:
                row["params_M"] = round(count_params_meta(timm, name, pk), 3)
            except Exception as err:  # noqa: BLE001
                raise Failure("failed:meta-create", first_line(err))
            if args.max_params and row["params_M"] > args.max_params:
                raise Failure("skipped", f"more than {args.max_params:g}M parameters")
            if args.meta_only:
                _meta(timm, cd, name, args, row)
            else:
                _real(timm, cd, name, args, row)
        row["status"], row["reason"] = "passed", ""
    except Failure as f:
        row["status"], row["reason"] = f.status, f.reason
    except Timeout as err:
        row["status"], row["reason"] = "skipped", f"time guard: {err}"
    except Exception as err:  # noqa: BLE001 - unexpected: report the stage
        row["status"], row["reason"] = "failed:unexpected", first_line(err)
        if args.verbose:
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _convert(cd, model, args, row, example_inputs=None):
    try:
        t0 = time.perf_counter()
        converted = cd.convert(model, dataset_size=args.dataset_size)
        row["convert_s"] = round(time.perf_counter() - t0, 3)
    except Exception as err:  # noqa: BLE001
        name = type(err).__name__
        if name in ("ConversionError", "TargetError"):
            raise Failure("not convertible", first_line(err))
        raise Failure("failed:convert", first_line(err))
    try:
        rep = cd.report(converted)
    except Exception as err:  # noqa: BLE001 - report() reads rates with float(): fails on the meta device
        if not args.meta_only:
            raise Failure("failed:report", first_line(err))
        from cd_convert.collector import get_collector
        from cd_convert.report import Report
        col = get_collector(converted)
        rep = Report(rows=list(getattr(col, "rows", [])), method=getattr(col, "method", ""))
        _add_note(row, "report() failed: " + first_line(err))
    row["n_sites"] = len(rep.sites)
    row["kinds"] = site_kinds(rep)
    row["method"] = rep.method
    return converted, rep


def _meta(timm, cd, name, args, row):
    try:
        model, size, took_img_size = create(timm, name, args.drop_rate, args.img_size, device="meta")
    except Exception as err:  # noqa: BLE001
        raise Failure("failed:create", first_line(err))
    model.eval()
    converted, rep = _convert(cd, model, args, row)
    if not rep.sites:
        raise Failure("not convertible", "no dropout sites found")
    added = added_parameters(converted)
    if not added:
        raise Failure("failed:convert", "no p_logit parameters added")
    if not args.meta_forward:
        return
    cfg = _cfg_size(converted, None)
    sizes = [size] if took_img_size else list(dict.fromkeys([size, cfg]))
    error = _meta_leftover(converted, sizes, row)
    if error is not None and took_img_size and args.img_size:
        # The model took img_size but cannot run at it (e.g. crossvit): recreate it at its own size.
        model, _, _ = create(timm, name, args.drop_rate, None, device="meta")
        converted = cd.convert(model.eval(), dataset_size=args.dataset_size)
        error = _meta_leftover(converted, [_cfg_size(converted, None)], row)
    if error is not None:
        _add_note(row, "meta forward failed: " + first_line(error))


def _meta_leftover(converted: nn.Module, sizes, row) -> Optional[BaseException]:
    """Training-mode forward on the meta device: is any fixed-rate dropout still applied?

    Returns the last forward error when no size could run (data-dependent ops cannot run on meta tensors).
    """
    converted.train()
    hold_stochastic_depth(converted)
    error = None
    for size in sizes:
        x = torch.empty(2, *size, device="meta")
        try:
            with LeftoverDropout() as leftover:
                converted(x)
        except Timeout:
            raise
        except Exception as err:  # noqa: BLE001
            error = err
            continue
        leftover.check()
        _add_note(row, f"meta forward at {size[1]}x{size[2]}: no fixed-rate dropout left")
        return None
    return error


def perturb_zero_init(model: nn.Module, std: float = 0.02) -> int:
    """Give every all-zero floating-point parameter small random values; returns how many were changed.

    timm zero-initialises the last norm of residual branches (``zero_init_last``: BatchNorm gamma = 0),
    some layer scales and some heads. Such a branch contributes nothing at initialisation, so the gradient
    of the data loss with respect to a dropout rate inside it is exactly 0: a property of the initial
    weights, not of the conversion. Perturbing them (before the original is copied, so both models share
    the weights) makes the gradient check meaningful.
    """
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 0 and not bool(p.any()):
                p.normal_(0.0, std)
                n += 1
    return n


STOCHASTIC_DEPTH = ("DropPath", "DropBlock", "StochasticDepth")


def hold_stochastic_depth(model: nn.Module) -> int:
    """Put drop-path / drop-block modules with a nonzero rate in eval mode; returns how many.

    Stochastic depth drops a whole residual branch per sample (NesT defaults to drop_path_rate=0.5): with a
    batch of 2 a branch is often dropped for both samples and every dropout rate inside it gets an exactly
    zero gradient in that step. That is the model's own noise, not a conversion fault, so it is switched off
    for the gradient check (cd_convert leaves these modules alone: they are not dropout sites).
    """
    n = 0
    for m in model.modules():
        if type(m).__name__.startswith(STOCHASTIC_DEPTH):
            rate = getattr(m, "drop_prob", getattr(m, "p", None))
            if rate is None or float(rate) > 0:
                m.eval()
                n += 1
    return n


class LeftoverDropout(TorchFunctionMode):
    """Records the dropout a converted model still applies at a fixed rate in training.

    Sees ``F.dropout*``, ``torch.dropout``/``feature_dropout`` with ``p > 0`` and ``training=True``, and
    ``F.scaled_dot_product_attention`` with ``dropout_p != 0`` that no concrete site handled (the routing
    mode installed by cd_convert sits above this one, so routed calls never reach it). Drop-path and
    drop-block do not go through these functions and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []
        from cd_convert.callsites import FUNCTIONAL_DROPOUTS, bind_functional
        self._functions = FUNCTIONAL_DROPOUTS
        self._bind = bind_functional

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._functions:
            bound = self._bind(func, args, kwargs)
            p = bound.get("p")
            if bound.get("training") and (isinstance(p, torch.Tensor) or (p or 0) > 0):
                self.calls.append(f"{getattr(func, '__name__', func)}(p={_num(p)}) at {_user_frame()}")
        elif func is F.scaled_dot_product_attention:
            p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if isinstance(p, torch.Tensor) or p:
                self.calls.append(f"scaled_dot_product_attention(dropout_p={_num(p)}) at {_user_frame()}")
        return func(*args, **kwargs)

    def check(self) -> None:
        """Fail the model (``failed:leftover``) if any fixed-rate dropout call was recorded."""
        if self.calls:
            raise Failure("failed:leftover", f"{len(self.calls)} fixed-rate dropout call(s) still applied in "
                                              f"training, e.g. {self.calls[0]}")


def _num(p: Any) -> str:
    if isinstance(p, torch.Tensor):
        return f"tensor {float(p.detach().float().mean()):.3g}" if p.numel() else "tensor"
    return f"{p:.3g}" if isinstance(p, float) else str(p)


def _user_frame() -> str:
    import os

    from cd_convert.callsites import caller_frame  # the frame cd_convert itself keys dropout calls by
    frame = caller_frame(sys._getframe(2))
    if frame is None:
        return "?"
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"


def _add_note(row: Dict[str, Any], text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row.get("note") else text


def _real(timm, cd, name, args, row):
    def make(img_size):
        torch.manual_seed(0)
        try:
            model, size, _ = create(timm, name, args.drop_rate, img_size)
        except Exception as err:  # noqa: BLE001
            raise Failure("failed:create", first_line(err))
        model.eval()
        perturbed = 0 if args.keep_zero_init else perturb_zero_init(model)
        return model, size, perturbed

    def forward(model, x):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(x)
            return out, time.perf_counter() - t0

    model, size, perturbed = make(args.img_size)
    x = torch.randn(2, *size)
    # reference output (and whether the chosen size works at all)
    try:
        ref, fwd = forward(model, x)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - try the pretrained size
        if args.img_size is None:
            raise Failure("failed:forward-original", first_line(err))
        model, size, perturbed = make(None)
        x = torch.randn(2, *size)
        try:
            ref, fwd = forward(model, x)
        except Timeout:
            raise
        except Exception as err2:  # noqa: BLE001
            raise Failure("failed:forward-original", first_line(err2))
    if fwd > args.max_forward_s:
        raise Failure("skipped", f"forward {fwd:.1f} s > {args.max_forward_s:g} s")
    if args.img_size and tuple(size[1:]) != (args.img_size, args.img_size):
        _add_note(row, f"ran at {size[1]}x{size[2]}")
    if perturbed:
        _add_note(row, f"perturbed {perturbed} all-zero params")
    converted, rep = _convert(cd, model, args, row)
    if not rep.sites:
        raise Failure("not convertible", "no dropout sites found")
    added = added_parameters(converted)
    if not added:
        raise Failure("failed:convert", "no p_logit parameters added")

    stage = "eval-forward"
    try:
        converted.eval()
        with torch.no_grad():
            out = converted(x)
        refs, outs = _outputs(ref), _outputs(out)
        if len(refs) != len(outs):
            raise Failure("failed:eval-equal", "different number of outputs")
        how = {compare(a, b) for a, b in zip(refs, outs)}
        row["equal"] = "allclose" if "allclose" in how else "equal"

        stage = "train-forward"
        converted.train()
        held = hold_stochastic_depth(converted)
        if held:
            _add_note(row, f"{held} drop-path module(s) held in eval")
        with LeftoverDropout() as leftover:
            out = converted(x)
        outs = _outputs(out)
        if not outs:
            raise Failure("failed:train-forward", "no tensor output")
        leftover.check()
        if outs[0].dim() == 2:
            data_loss = F.cross_entropy(outs[0], torch.zeros(outs[0].shape[0], dtype=torch.long))
        else:
            data_loss = sum(o.float().pow(2).mean() for o in outs)
        reg = cd.regularization(converted)
        if not torch.isfinite(data_loss):
            raise Failure("failed:train-loss", f"data loss not finite: {data_loss.item()}")
        if not torch.isfinite(reg):
            raise Failure("failed:train-reg", f"regularization not finite: {reg.item()}")

        stage = "backward"
        converted.zero_grad(set_to_none=True)
        data_loss.backward()
        missing = [n for n, p in added if p.grad is None]
        zero = [n for n, p in added if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
        if missing:
            raise Failure("failed:grad", f"{len(missing)}/{len(added)} p_logit without grad, e.g. {missing[0]}")
        if zero:
            raise Failure("failed:grad", f"{len(zero)}/{len(added)} p_logit with zero grad, e.g. {zero[0]}")
        # one full step: data + regularization
        converted.zero_grad(set_to_none=True)
        out = _outputs(converted(x))[0]
        loss = (F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long)) if out.dim() == 2
                else out.float().pow(2).mean()) + cd.regularization(converted)
        loss.backward()
        if not torch.isfinite(loss):
            raise Failure("failed:train-step", "total loss not finite")
    except (Failure, Timeout):
        raise
    except Exception as err:  # noqa: BLE001
        raise Failure(f"failed:{stage}", first_line(err))


def select(timm, args) -> List[str]:
    if args.names_file:
        names = _read_names(args.names_file)
    else:
        names = timm.list_models(args.pattern or "*")
    if args.exclude:
        names = [n for n in names if not fnmatch.fnmatch(n, args.exclude)]
    if args.every > 1:
        names = names[args.offset::args.every]
    return names


def _read_names(path: str) -> List[str]:
    """Model names from a text file (one per line, '#' comments) or a CSV with a ``name`` column."""
    with open(path) as fh:
        text = fh.read()
    if text.startswith("name,"):
        return [r["name"] for r in csv.DictReader(text.splitlines())]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def summarize(rows: List[Dict[str, Any]], elapsed: float) -> str:
    by_status = Counter(r["status"] for r in rows)
    lines = [f"{len(rows)} model(s) in {elapsed:.0f} s"]
    for status, n in by_status.most_common():
        lines.append(f"  {status}: {n}")
    reasons: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "passed":
            reasons[(r["status"], _normalise(r["reason"]))].append(r["name"])
    if reasons:
        lines.append("reasons:")
        for (status, reason), names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            lines.append(f"  [{len(names)}] {status}: {reason}  ({shown})")
    passed = [r for r in rows if r["status"] == "passed"]
    noted = Counter(_normalise(r.get("note", "")) for r in rows if r.get("note"))
    for note, n in noted.most_common():
        lines.append(f"  note [{n}]: {note}")
    if passed:
        kinds: Counter = Counter()
        for r in passed:
            for part in filter(None, str(r["kinds"]).split(";")):
                k, v = part.split("=")
                kinds[k] += int(v)
        methods = Counter(r["method"] for r in passed)
        ct = sorted(float(r["convert_s"]) for r in passed if r["convert_s"] != "")
        lines.append("site kinds (passed): " + ", ".join(f"{k}={v}" for k, v in kinds.most_common()))
        lines.append("methods (passed): " + ", ".join(f"{k}={v}" for k, v in methods.most_common()))
        if ct:
            lines.append(f"convert time (passed): median {ct[len(ct) // 2]:.2f} s, max {ct[-1]:.2f} s")
        eq = Counter(r["equal"] for r in passed if r["equal"])
        if eq:
            lines.append("eval output vs original: " + ", ".join(f"{k}={v}" for k, v in eq.most_common()))
    return "\n".join(lines)


def _normalise(reason: str) -> str:
    import re
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:160]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="*", help="timm.list_models pattern")
    ap.add_argument("--exclude", default=None, help="fnmatch pattern of names to leave out")
    ap.add_argument("--max-params", type=float, default=None, help="skip models above this many million params")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many models (after filtering)")
    ap.add_argument("--every", type=int, default=1, help="take every k-th registry name (spread sample)")
    ap.add_argument("--offset", type=int, default=0, help="with --every: start at this index")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new models after this many s")
    ap.add_argument("--names-file", default=None,
                    help="run exactly these names (one per line, or a CSV with a 'name' column) instead of --pattern")
    ap.add_argument("--keep-zero-init", action="store_true",
                    help="do not perturb all-zero parameters before the real-tensor checks (see perturb_zero_init)")
    ap.add_argument("--meta-only", action="store_true", help="create+convert on the meta device only")
    ap.add_argument("--meta-forward", action="store_true",
                    help="with --meta-only: one training-mode forward on the meta device that fails the model "
                         "when a fixed-rate dropout call is still applied (failed:leftover)")
    ap.add_argument("--csv", default=None, help="write per-model rows here")
    ap.add_argument("--drop-rate", type=float, default=0.1, help="timm drop_rate (head dropout)")
    ap.add_argument("--img-size", type=int, default=64,
                    help="pass img_size=N when the model accepts it (else its pretrained size); 0: pretrained size")
    ap.add_argument("--dataset-size", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=60.0, help="wall-clock guard per model (s)")
    ap.add_argument("--max-forward-s", type=float, default=20.0, help="skip models whose eval forward is slower")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.img_size == 0:
        args.img_size = None

    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")
    import timm

    import cd_convert as cd

    names = select(timm, args)
    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    done = 0
    for name in names:
        if args.limit is not None and done >= args.limit:
            break
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            print(f"stopping: time budget of {args.budget_s:g} s used ({done} of {len(names)} names run)")
            break
        row = run_one(timm, cd, name, args)
        if row["status"] == "skipped" and "parameters" in row["reason"]:
            continue  # filtered by --max-params: does not count against --limit
        done += 1
        rows.append(row)
        print(f"{name:50s} {row['params_M']!s:>8} {row['status']:24s} {row['n_sites']!s:>4} "
              f"{row['convert_s']!s:>7} {row['seconds']:>6} {row['reason']}", flush=True)
        if args.csv:
            _write(args.csv, rows)
    print()
    print(summarize(rows, time.perf_counter() - t0))
    return 0


def _write(path: str, rows: List[Dict[str, Any]]) -> None:
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r)


if __name__ == "__main__":
    sys.exit(main())
