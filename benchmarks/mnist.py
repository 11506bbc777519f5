"""MNIST-style classification: a dropout-rate grid with ``nn.Dropout`` against one Concrete Dropout run.

Models
    ``--model mlp`` (default): 784-512-512-512-10 ReLU MLP (64-512-512-512-10 on the 8x8 digits), a dropout
    site before every Linear (input included), as in the original PyTorch Concrete Dropout MNIST example.
    Grid: ``nn.Dropout(p)`` before every Linear. Concrete: the plain MLP converted with
    ``cd_convert.convert(targets=[nn.Linear])`` (4 sites).

    ``--model cnn``: Conv32-Conv64-MaxPool-Dense128-Dense10 (3x3 convs, no padding), the authors' spatial
    MNIST network. Concrete: ``targets=[nn.Linear, nn.Conv2d]``: channel-wise sites on both conv inputs and
    element-wise sites on both dense inputs (4 sites). Grid: ``nn.Dropout2d(p)`` on the input of the second
    conv and ``nn.Dropout(p)`` on both dense inputs; the one-channel image gets no grid dropout, because a
    channel-wise drop of a one-channel image blanks the whole image (the concrete site there learns a small p,
    0.012 in the authors' run).

Training and evaluation
    Adam (lr 1e-3), batch 128, cross-entropy. Concrete uses the ``loss="nll"`` preset (wr = l^2/(2N),
    dr = 1/N) with N the training-set size; ``--length-scale`` defaults to 1e-2 for the MLP and to the
    authors' 0.1 for the CNN. Test metrics from ``--samples`` MC passes (nn.Dropout models: ``train()``
    passes under ``no_grad``, no BatchNorm here; concrete models: ``cd_convert.mc_predict`` with relaxed
    masks): accuracy, NLL and ECE (15 bins) of the MC-averaged probabilities.

Data
    ``--data-dir`` (default ``$CD_CONVERT_DATA``): the shared MNIST t10k files split 8000 train / 2000 test
    by :func:`benchmarks.datasets.load_mnist`; with no data directory, sklearn's 8x8 digits (1437 / 360).

``--data-size`` runs the extra experiment: one concrete run per training-set size (a fixed number of
optimisation steps for every size, so only N changes), learned p per site against N, plotted.

    python -m benchmarks.mnist --quick
    python -m benchmarks.mnist --data-dir ../shared/datasets --epochs 10 --json results/mnist.json
    python -m benchmarks.mnist --data-dir ../shared/datasets --data-size 500,1000,2000,4000,8000 --plot results/mnist_p_vs_n.png
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cd_convert
from cd_convert import metrics

from . import common
from .datasets import data_root, load_embedded_digits, load_mnist

GRID_P = (0.0, 0.1, 0.2, 0.3, 0.5)
BATCH = 128


def make_mlp(in_features: int, p: float | None, hidden: int = 512) -> nn.Module:
    """The MLP; ``p`` None gives the plain model (for conversion), else ``nn.Dropout(p)`` before every Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [in_features, hidden, hidden, hidden]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:] + [10])):
        if p is not None:
            layers.append(nn.Dropout(p))
        layers.append(nn.Linear(a, b))
        if i < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(side: int, p: float | None) -> nn.Module:
    """Conv32-Conv64-Pool-Dense128-Dense10; ``p`` None: plain, else the grid's dropout (see module doc)."""
    flat = 64 * ((side - 4) // 2) ** 2
    drop2d = (lambda: nn.Dropout2d(p)) if p is not None else nn.Identity
    drop = (lambda: nn.Dropout(p)) if p is not None else nn.Identity
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), drop2d(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), drop(), nn.Linear(flat, 128), nn.ReLU(), drop(), nn.Linear(128, 10),
    )


def make_model(kind: str, data: dict, p: float | None) -> nn.Module:
    side = data["x_train"].shape[-1]
    return make_mlp(side * side, p) if kind == "mlp" else make_cnn(side, p)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, concrete: bool,
          max_steps: int | None = None) -> int:
    common.seed_all(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    steps = 0
    for _ in range(epochs):
        for idx in common.batches(len(y), BATCH, g):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if concrete:
                loss = loss + cd_convert.regularization(model)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return steps
    return steps


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int, seed: int, concrete: bool) -> dict:
    if concrete:
        probs = common.mc_predict(model, x, samples, seed, chunk_size=max(len(y), 4096)).probs
    elif any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        common.seed_all(seed)
        probs = torch.zeros(len(y), 10)
        for _ in range(samples):  # one pass at a time keeps memory flat for the CNN
            probs += torch.cat([F.softmax(model.train()(x[i:i + 2048]), -1) for i in range(0, len(y), 2048)])
        probs /= samples
        model.eval()
    else:  # p = 0: deterministic
        model.eval()
        probs = torch.cat([F.softmax(model(x[i:i + 2048]), -1) for i in range(0, len(y), 2048)])
    return {"accuracy": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y), "ece": metrics.ece(probs, y)}


def load(data_dir: str | None, seed: int = 0) -> tuple[dict, str]:
    root = data_root(data_dir)
    if root is None:
        return load_embedded_digits(split_seed=seed), "sklearn digits 8x8 (1437 train / 360 test)"
    d = load_mnist(root, split_seed=seed, n_train=8000)
    return d, f"MNIST t10k split {len(d['y_train'])} train / {len(d['y_test'])} test"


def tensors(data: dict) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(data[k]) for k in ("x_train", "y_train", "x_test", "y_test"))


def run_comparison(data: dict, kind: str, epochs: int, samples: int, seed: int, length_scale: float,
                   grid=GRID_P, progress: bool = True) -> dict:
    xtr, ytr, xte, yte = tensors(data)
    out: dict = {"grid": {}}
    bar = common.progress(total=len(grid) + 1, desc=f"{kind} runs", disable=not progress)
    for i, p in enumerate(grid):
        t0 = time.perf_counter()
        common.seed_all(common.run_seed(seed, 1, i))  # the initial weights, too, come from the run's seed
        model = make_model(kind, data, p)
        train(model, xtr, ytr, epochs, common.run_seed(seed, 1, i), concrete=False)
        res = evaluate(model, xte, yte, samples, common.run_seed(seed, 2, i), concrete=False)
        res["wall_s"] = time.perf_counter() - t0
        out["grid"][str(p)] = res
        bar.update(1)
    t0 = time.perf_counter()
    common.seed_all(common.run_seed(seed, 3))
    targets = [nn.Linear] if kind == "mlp" else [nn.Linear, nn.Conv2d]
    model = cd_convert.convert(make_model(kind, data, None), targets=targets, dataset_size=len(ytr),
                               length_scale=length_scale, loss="nll")
    train(model, xtr, ytr, epochs, common.run_seed(seed, 3), concrete=True)
    res = evaluate(model, xte, yte, samples, common.run_seed(seed, 4), concrete=True)
    res["wall_s"] = time.perf_counter() - t0
    res["rates"] = {k: float(v) for k, v in cd_convert.dropout_rates(model).items()}
    out["concrete"] = res
    bar.update(1)
    bar.close()
    return out


def format_table(out: dict, title: str) -> str:
    rows = [[f"nn.Dropout p={p}", f"{r['accuracy']:.4f}", f"{r['nll']:.4f}", f"{r['ece']:.4f}", f"{r['wall_s']:.1f}"]
            for p, r in out["grid"].items()]
    best = max(out["grid"], key=lambda p: out["grid"][p]["accuracy"])
    c = out["concrete"]
    rows.append(["concrete (1 run)", f"{c['accuracy']:.4f}", f"{c['nll']:.4f}", f"{c['ece']:.4f}", f"{c['wall_s']:.1f}"])
    grid_s = sum(r["wall_s"] for r in out["grid"].values())
    rates = ", ".join(f"{k}={v:.3f}" for k, v in c["rates"].items())
    return (f"### {title}\n\n" + common.markdown_table(["method", "accuracy", "NLL", "ECE", "wall-clock s"], rows)
            + f"\n\nGrid: {len(out['grid'])} runs, {grid_s:.1f} s in all, best accuracy at p={best}. "
              f"Concrete learned p: {rates}")


def run_data_size(data: dict, kind: str, sizes: list[int], steps: int, seed: int, length_scale: float) -> dict:
    """One concrete run per training-set size, ``steps`` optimisation steps each; learned p per site."""
    xtr, ytr, _, _ = tensors(data)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    targets = [nn.Linear] if kind == "mlp" else [nn.Linear, nn.Conv2d]
    result = {}
    for n in sizes:
        n = min(n, len(ytr))
        idx = perm[:n]
        common.seed_all(common.run_seed(seed, 5, n))
        model = cd_convert.convert(make_model(kind, data, None), targets=targets, dataset_size=n,
                                   length_scale=length_scale, loss="nll")
        epochs = -(-steps * BATCH // n) + 1
        train(model, xtr[idx], ytr[idx], epochs, common.run_seed(seed, 5, n), concrete=True, max_steps=steps)
        result[str(n)] = {k: float(v) for k, v in cd_convert.dropout_rates(model).items()}
        print(f"N={n}: {result[str(n)]}", file=sys.stderr, flush=True)
    return result


def plot_data_size(result: dict, path: str, title: str) -> None:
    fig, ax = common.new_figure(figsize=(5.5, 4))
    ns = [int(n) for n in result]
    for site in next(iter(result.values())):
        ax.plot(ns, [result[str(n)][site] for n in ns], marker="o", label=site)
    ax.set_xscale("log")
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("learned dropout probability p")
    ax.set_title(title)
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--quick", action="store_true", help="few epochs and MC samples (a few minutes on 2 cores)")
    ap.add_argument("--epochs", type=int, default=None, help="default 40 (quick: 20)")
    ap.add_argument("--samples", type=int, default=None, help="MC samples, default 50 (quick: 20)")
    ap.add_argument("--length-scale", type=float, default=None, help="default 1e-2 (mlp) / 0.1 (cnn)")
    ap.add_argument("--data-size", default=None, help="comma-separated training-set sizes: p vs N experiment")
    ap.add_argument("--steps", type=int, default=2000, help="optimisation steps per size in --data-size")
    ap.add_argument("--plot", default=None, help="plot path for --data-size")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    epochs = args.epochs or (20 if args.quick else 40)
    samples = args.samples or (20 if args.quick else 50)
    length_scale = args.length_scale or (1e-2 if args.model == "mlp" else 0.1)
    data, desc = load(args.data_dir, args.seed)
    if args.data_size:
        sizes = [int(s) for s in args.data_size.split(",")]
        res = run_data_size(data, args.model, sizes, args.steps, args.seed, length_scale)
        header = ["N", *next(iter(res.values())).keys()]
        print(f"### Learned p vs training-set size ({args.model}, {desc}, {args.steps} steps each)\n\n"
              + common.markdown_table(header, [[n, *[f"{v:.3f}" for v in r.values()]] for n, r in res.items()]))
        if args.plot:
            plot_data_size(res, args.plot, f"{args.model}: learned p vs N")
        out = {"data_size": res}
    else:
        out = run_comparison(data, args.model, epochs, samples, args.seed, length_scale,
                             progress=not args.no_progress)
        print(format_table(out, f"{args.model} on {desc}, {epochs} epochs, T={samples}"))
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
