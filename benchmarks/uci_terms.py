"""Why ``concrete_tau`` over-fits: the terms of its objective during training and around the learned rate.

``concrete_tau`` (the paper's setting: learned p, MSE loss with a fixed precision tau chosen on validation)
ends with rates near 0.001 on some UCI sets and tests worse than the grid. This script trains it on one
split's fitting set (the first 80% of the training split, as the benchmark's validation runs do) for each tau
of the data set's grid and prints, every ``--log-every`` epochs, in the units of the loss (mean squared error
on standardised targets):

* the rates of the two sites (input, hidden) and the validation MC test log-likelihood at that tau;
* the data term (training MSE under dropout, MC-averaged over the fitting set);
* the weight term ``wr * sum ||W||^2 / (1 - p)`` and the entropy term ``dr * sum K (p log p + (1-p) log(1-p))``
  (computed here from their definitions, and checked against ``cd_convert.regularization``).

At the end it holds the trained weights fixed and sets both rates to each rate of the grid: the change of the
data term against the change of the entropy term from the learned rate says which term wins and by how much.

The same fold is then trained with ``concrete``'s loss (learned noise), whose entropy term in the same units
is scaled by the learned noise variance instead of ``1 / tau``: its trajectory is printed for contrast.

Usage::

    python -m benchmarks.uci_terms --data-dir ../shared/datasets --datasets bostonHousing,wine-quality-red
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert.collector import get_collector
from cd_convert.losses import heteroscedastic_gaussian

from . import common
from .datasets import data_root, load_uci, validation_split
from .uci.concrete_net import _concrete_net
from .uci.protocol import Fold, NoiseNet, PlainNet, mc_test_ll_tau
from .uci.training import _train

__all__ = ["objective_terms", "terms_at_rates", "main"]


def _sites(model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """(site, consuming Linear) of the benchmark's network: the site on the input of fc1 and of fc2."""
    return [(model.fc1.concrete_dropout, model.fc1), (model.fc2.concrete_dropout, model.fc2)]


def _data_term(model: nn.Module, fold: Fold, passes: int) -> float:
    """Training squared error under dropout (MC mean over ``passes``), in standardised units.

    The learned-noise model returns ``(mean, log_var)``; only the mean is used, so both variants are measured
    in the same units.
    """
    model.train()
    total = 0.0
    with torch.no_grad():
        for _ in range(passes):
            out = model(fold.x_fit)
            mean = out[0] if isinstance(out, tuple) else out
            total += float(F.mse_loss(mean, fold.y_fit))
    return total / passes


def objective_terms(model: nn.Module, scale_to_mse: float = 1.0) -> dict[str, float]:
    """The regulariser's two terms for the benchmark's network, from their definitions.

    Args:
        model: the converted network (two sites, consumers fc1 and fc2).
        scale_to_mse: factor that puts the model's loss units into MSE units (1 for ``concrete_tau``; the
            learned noise variance for ``concrete``, whose loss is ``exp(-s) (y - f)^2 + s``).

    Returns:
        ``{"weight", "entropy"}`` in MSE units, and ``"library"``: ``cd_convert.regularization`` in the same
        units (their sum, up to float error).
    """
    scale = get_collector(model).scale
    weight = entropy = 0.0
    for site, linear in _sites(model):
        p = float(torch.sigmoid(site.p_logit.detach()))
        weight += scale.weight_regularizer * float(linear.weight.detach().pow(2).sum()) / (1 - p)
        entropy += scale.dropout_regularizer * linear.in_features * (p * math.log(p) + (1 - p) * math.log1p(-p))
    library = float(cd_convert.regularization(model).detach())
    # The library computes the same sum in fp32: a mismatch beyond rounding means one of the two is wrong.
    if not math.isclose(weight + entropy, library, rel_tol=1e-5, abs_tol=1e-9):
        raise RuntimeError(f"regulariser by definition {weight + entropy!r} != cd_convert.regularization {library!r}")
    return {"weight": weight * scale_to_mse, "entropy": entropy * scale_to_mse, "library": library * scale_to_mse}


def terms_at_rates(model: nn.Module, fold: Fold, rates: list[float], passes: int) -> list[dict[str, float]]:
    """The objective's terms with the trained weights and both sites set to each rate (MSE units).

    Args:
        model: the trained ``concrete_tau`` network.
        fold: its fitting set.
        rates: the rates to try.
        passes: MC passes for the data term.

    Returns:
        One ``{"p", "data", "weight", "entropy", "total"}`` per rate; the model's rates are restored.
    """
    saved = [site.p_logit.detach().clone() for site, _ in _sites(model)]
    rows = []
    for p in rates:
        with torch.no_grad():
            for site, _ in _sites(model):
                site.p_logit.fill_(math.log(p) - math.log1p(-p))
        common.seed_all(0)
        data = _data_term(model, fold, passes)
        terms = objective_terms(model)
        rows.append(dict(p=p, data=data, weight=terms["weight"], entropy=terms["entropy"]))
        rows[-1]["total"] = data + terms["weight"] + terms["entropy"]
    with torch.no_grad():
        for (site, _), logit in zip(_sites(model), saved):
            site.p_logit.copy_(logit)
    return rows


def _trajectory(model, fold, loss_fn, epochs, log_every, seed, passes, validate, noise_variance) -> list[dict]:
    """Train ``model`` and record the terms every ``log_every`` epochs (and at the last)."""
    rows: list[dict] = []

    def on_epoch(epoch: int) -> bool:
        if epoch % log_every and epoch != epochs:
            return False
        variance = noise_variance()
        terms = objective_terms(model, variance if variance is not None else 1.0)
        rows.append(
            dict(
                epoch=epoch,
                rates=[float(torch.sigmoid(s.p_logit.detach())) for s, _ in _sites(model)],
                data=_data_term(model, fold, passes),
                noise_variance=variance,
                val_ll=validate(),
                **terms,
            )
        )
        model.train()
        return False

    _train(model, fold, epochs, seed, loss_fn, on_epoch)
    return rows


def _print_rows(title: str, rows: list[dict]) -> None:
    header = ["epoch", "p input / hidden", "data", "weight", "entropy", "noise var (std. units)", "val LL"]
    body = [
        [
            r["epoch"],
            " / ".join(f"{p:.4f}" for p in r["rates"]),
            f"{r['data']:.4f}",
            f"{r['weight']:.2e}",
            f"{r['entropy']:.2e}",
            "-" if r["noise_variance"] is None else f"{r['noise_variance']:.4f}",
            f"{r['val_ll']:.3f}",
        ]
        for r in rows
    ]
    print(f"#### {title}\n\n" + common.markdown_table(header, body) + "\n", flush=True)


def run(ds, split: int, epochs: int, log_every: int, passes: int, val_samples: int, seed: int) -> dict:
    """Both variants on one split's fitting set; prints and returns the trajectories and the rate table."""
    train_idx, _ = ds.split(split)
    fit_idx, val_idx = validation_split(train_idx)
    fold = Fold.make(ds, fit_idx, val_idx)
    n = fold.x_fit.shape[0]
    out: dict = {"n_fit": n, "y_std": fold.y_std, "concrete_tau": {}}
    for tau in ds.tau_values:
        tau_std = tau * fold.y_std**2  # the precision in the units of the loss
        common.seed_all(seed)
        model = _concrete_net(PlainNet(fold.x_fit.shape[1], ds.n_hidden), n, loss="mse", tau=tau_std)

        def validate(model=model, tau=tau) -> float:
            mu = common.mc_predict(model, fold.x_eval, val_samples, seed + 7, return_samples=True).samples
            return mc_test_ll_tau(mu.double() * fold.y_std + fold.y_mean, fold.y_eval, tau)

        rows = _trajectory(
            model,
            fold,
            lambda m, xb, yb: F.mse_loss(m(xb), yb) + cd_convert.regularization(m),
            epochs,
            log_every,
            seed,
            passes,
            validate,
            lambda: None,
        )
        title = f"{ds.name}, split {split}, concrete_tau, tau = {tau} (1 / tau = {1 / tau_std:.4f} std. units)"
        _print_rows(title, rows)
        grid = terms_at_rates(model, fold, sorted({*ds.dropout_rates, *rows[-1]["rates"]}), passes)
        print(
            common.markdown_table(
                ["both rates p", "data", "weight", "entropy", "total"],
                [[f"{r['p']:.4f}", *(f"{r[k]:.5f}" for k in ("data", "weight", "entropy", "total"))] for r in grid],
            )
            + "\n",
            flush=True,
        )
        out["concrete_tau"][str(tau)] = {"trajectory": rows, "at_rates": grid}

    common.seed_all(seed)
    model = _concrete_net(NoiseNet(fold.x_fit.shape[1], ds.n_hidden), n, loss="heteroscedastic")

    def validate_hetero() -> float:
        pred = common.mc_predict(model, fold.x_eval, val_samples, seed + 7, return_samples=True)
        mu = pred.samples.double() * fold.y_std + fold.y_mean
        sigma2 = pred.log_variance_samples.detach().double().exp() * fold.y_std**2
        return float(common.mc_gaussian_ll(mu, fold.y_eval, sigma2).mean())

    def hetero_loss(m, xb, yb):
        mean, log_var = m(xb)
        return heteroscedastic_gaussian(mean, log_var, yb) + cd_convert.regularization(m)

    rows = _trajectory(
        model,
        fold,
        hetero_loss,
        epochs,
        log_every,
        seed,
        passes,
        validate_hetero,
        lambda: math.exp(float(model.log_var.detach())),
    )
    _print_rows(f"{ds.name}, split {split}, concrete (learned noise)", rows)
    out["concrete"] = {"trajectory": rows}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="data folder with uci/ (default $CD_CONVERT_DATA)")
    ap.add_argument("--datasets", default="bostonHousing,wine-quality-red")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4000)
    ap.add_argument("--log-every", type=int, default=400)
    ap.add_argument("--passes", type=int, default=50, help="MC passes for the training data term")
    ap.add_argument("--val-samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    root = data_root(args.data_dir)
    if root is None:
        raise SystemExit("needs the UCI files: pass --data-dir or set CD_CONVERT_DATA")
    common.set_threads(args.threads)
    out = {}
    for name in args.datasets.split(","):
        ds = load_uci(name, root)
        out[name] = run(ds, args.split, args.epochs, args.log_every, args.passes, args.val_samples, args.seed)
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
