"""The Concrete Dropout authors' toy regression: learned dropout rates against the amount of data.

x ~ N(0, 1), y = 2x + 8 + N(0, 1). Network: three hidden Dense(1024, relu) layers, a mean head and a
log-variance head; ``cd_convert.convert(targets=[nn.Linear])`` puts a concrete site on the input of every
Linear: 5 sites (input, hidden 1, hidden 2, and one for each head, which both read the last hidden layer,
exactly as in the authors' Keras notebook where every Dense is wrapped). Loss
:func:`cd_convert.losses.heteroscedastic_gaussian` with the matching preset ``loss="heteroscedastic"``
(wr = l^2/N, dr = 2/N), l = 1e-4, Adam (lr 1e-3), batch 20, N in {10, 100, 1000, 10000} with
{2000, 200, 20, 2} epochs (the authors' schedule). ``--quick`` uses 256 hidden units (same schedule; the rates move only about 1e-3 in logit per Adam step,
so capping the steps would freeze them near their 0.1 start).

Prints, per N: the learned p of every site, the RMSE of the MC mean on a fresh noisy test set (floor 1.0),
and the epistemic and aleatoric standard deviations from MC prediction (relaxed masks, as the authors),
next to the authors' published numbers.

    python -m benchmarks.toy [--quick] [--seed 0] [--json results/toy.json]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert.losses import heteroscedastic_gaussian

from . import common

SIZES = (10, 100, 1000, 10000)
EPOCHS = {10: 2000, 100: 200, 1000: 20, 10000: 2}
LENGTH_SCALE = 1e-4
BATCH = 20
#: The authors' notebook numbers (reference doc): N -> (input p, hidden p, RMSE range).
PUBLISHED = {10: ("0.08", "0.40", "1.8 - 1.9"), 100: ("0.07-0.08", "0.24", "1.15 - 1.26"),
             1000: ("0.06-0.08", "0.22-0.23", "1.04 - 1.07"), 10000: ("0.05-0.08", "0.11-0.16", "1.00 - 1.2")}
SITE_LABELS = ("input", "hidden1", "hidden2", "mean head", "logvar head")


class ToyNet(nn.Module):
    def __init__(self, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.mean = nn.Linear(hidden, 1)
        self.log_var = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor):
        h = F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))))
        return self.mean(h).squeeze(-1), self.log_var(h).squeeze(-1)


def make_data(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = rng.standard_normal((n, 1))
    y = 2 * x[:, 0] + 8 + rng.standard_normal(n)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)


def run_one(n: int, epochs: int, hidden: int, seed: int, samples: int = 100, n_test: int = 1000,
            max_steps: int | None = None) -> dict:
    """Train on N points and return the learned rates and MC summaries."""
    common.seed_all(seed)
    rng = np.random.default_rng(seed)
    x, y = make_data(n, rng)
    x_test, y_test = make_data(n_test, rng)
    model = cd_convert.convert(ToyNet(hidden), targets=[nn.Linear], dataset_size=n, length_scale=LENGTH_SCALE,
                               loss="heteroscedastic")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    steps = 0
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in common.batches(n, BATCH, g):
            opt.zero_grad(set_to_none=True)
            mean, log_var = model(x[idx])
            loss = heteroscedastic_gaussian(mean, log_var, y[idx]) + cd_convert.regularization(model)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    train_s = time.perf_counter() - t0
    pred = common.mc_predict(model, x_test, samples, seed + 1)
    rates = [float(v) for v in cd_convert.dropout_rates(model).values()]
    return {
        "n": n, "epochs": epochs, "steps": steps, "rates": rates,
        "rmse": float((pred.mean - y_test).pow(2).mean().sqrt()),
        "epistemic_std": float(pred.epistemic.mean().sqrt()),
        "aleatoric_std": float(pred.aleatoric.mean().sqrt()),
        "train_s": train_s,
    }


def format_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        pub = PUBLISHED.get(r["n"], ("-", "-", "-"))
        rows.append([r["n"], r["steps"], *[f"{p:.3f}" for p in r["rates"]], f"{r['rmse']:.3f}",
                     f"{r['epistemic_std']:.3f}", f"{r['aleatoric_std']:.3f}", pub[0], pub[1], pub[2],
                     f"{r['train_s']:.1f}"])
    header = ["N", "steps", *[f"p {s}" for s in SITE_LABELS], "RMSE", "epistemic std", "aleatoric std",
              "paper input p", "paper hidden p", "paper RMSE", "train s"]
    return common.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 hidden units instead of 1024 (same schedule)")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="cap on optimisation steps per N")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--samples", type=int, default=100, help="MC samples at test time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    hidden = args.hidden or (256 if args.quick else 1024)
    max_steps = args.max_steps
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        epochs = EPOCHS.get(n, max(1, 20000 // n))
        results.append(run_one(n, epochs, hidden, common.run_seed(args.seed, n), args.samples,
                               max_steps=max_steps))
        print(f"N={n}: rates {[round(p, 3) for p in results[-1]['rates']]}", file=sys.stderr, flush=True)
    print(f"### Toy problem (hidden {hidden}, seed {args.seed})\n\n" + format_table(results))
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
