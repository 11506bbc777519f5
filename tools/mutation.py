"""Mutation testing: plant known bugs, one at a time, in a copy of the repository and see which the tests catch.

Each :class:`Mutation` replaces one exact snippet of one file by a wrong version (the kind of bug that would
silently give a user wrong numbers) and names the test files that should catch it. For every mutant the
repository is copied to a temporary folder, the snippet is replaced there (the checkout is never touched) and
``python -m pytest -x -q -p no:cacheprovider <tests>`` runs in the copy with ``PYTHONPATH`` pointing at it.

The virtual environment holds an editable install of the checkout, so a wrong setup would silently test the
unmutated code. Two guards prevent that: a pytest plugin written into the copy only (``-p
_cd_mutation_guard``) stops the run unless ``cd_convert`` and the mutated module are imported from the copy,
and a baseline run of the unmutated copy must pass first (tests that already fail there are deselected from
the mutant runs and listed in the report, so they cannot pass for "caught").

Usage::

    python -m tools.mutation                     # every mutant, its fast test selection, one at a time
    python -m tools.mutation --list              # the mutants, and whether each still applies
    python -m tools.mutation --only entropy-sign,mc-sites-not-sampling --jobs 2
    python -m tools.mutation --full --timeout 1800   # the whole suite for every mutant (slow)

Output: a markdown table ``id | bug | file | result | seconds``. Exit status 0 when every mutant was caught,
1 when any survived, no longer applies, timed out or could not be run, 2 when the setup itself failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

#: The repository this file belongs to (tools/ sits at its root).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: What is not copied: environments, VCS data, caches and outputs (none of it is needed to run the tests).
IGNORED = ("venv", ".venv", ".git", "__pycache__", "results", "*.egg-info", "build", ".pytest_cache", ".ruff_cache")
#: Name of the guard plugin written into each copy (and nowhere else).
GUARD_MODULE = "_cd_mutation_guard"
#: Exit statuses of the guard plugin: the mutated code does not import / the copy is not what gets imported.
IMPORT_ERROR_RC = 97
GUARD_RC = 98
DEFAULT_TIMEOUT_S = 300
DEFAULT_FULL_TIMEOUT_S = 1800

GUARD_SOURCE = f'''"""Written by tools/mutation.py into a temporary copy of the repository; never part of the checkout.

Stops the pytest run unless cd_convert (and the mutated module) are imported from this copy, and tells a
mutated module that does not import apart from a failing test.
"""
import importlib
import os
import sys
import traceback
from pathlib import Path

import pytest


def pytest_configure(config):
    root = Path(os.environ["CD_MUTATION_ROOT"]).resolve()
    names = ["cd_convert"] + [n for n in os.environ.get("CD_MUTATION_MODULE", "").split(",") if n]
    for name in names:
        try:
            module = importlib.import_module(name)
        except BaseException:  # a SyntaxError, NameError, ... raised while importing the mutated code
            sys.stderr.write("CD-MUTATION-IMPORT-ERROR " + name + "\\n" + traceback.format_exc())
            pytest.exit("the mutated code does not import", returncode={IMPORT_ERROR_RC})
        path = Path(module.__file__).resolve()
        if root not in path.parents:
            sys.stderr.write(f"CD-MUTATION-GUARD {{name}} imported from {{path}}, not from the copy {{root}}\\n")
            pytest.exit("the copy is not what gets imported", returncode={GUARD_RC})
'''


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One planted bug.

    Attributes:
        id: short unique name (``--only`` takes it).
        bug: one line: what a user would suffer.
        file: path relative to the repository root.
        old: snippet that must occur exactly once in ``file``.
        new: its wrong replacement.
        tests: test files (or globs, or node ids) that should catch it: the fast default selection.
    """

    id: str
    bug: str
    file: str
    old: str
    new: str
    tests: Tuple[str, ...]


# Test selections shared by several mutants. Globs pick up test files other people add later; a selection
# entry that matches nothing is dropped (and listed in the result).
_REGULARISER = ("tests/test_collector.py", "tests/test_regularizer*.py")
_LAYERS = ("tests/test_layers.py", "tests/test_site_options.py")
_CONVERT = ("tests/test_convert_basic.py", "tests/test_sites.py")
_MC = ("tests/test_mc.py",)
_UCI = ("tests/test_uci*.py", "tests/test_benchmarks_smoke.py")

MUTATIONS: Tuple[Mutation, ...] = (
    # --- K, the number of units the entropy term is multiplied by
    Mutation(
        "conv-k-out-channels",
        "K of a conv consumer is its out_channels, not in_channels: wrong dropout prior for every conv site",
        "cd_convert/consumers.py",
        "return module.in_channels",
        "return module.out_channels",
        _REGULARISER + ("tests/test_convert_basic.py",),
    ),
    Mutation(
        "k-from-batch-dim",
        "K of a site without consumer is read from the batch dim: the prior changes with the batch size",
        "cd_convert/layers.py",
        "if cls.channelwise else shape[-1])",
        "if cls.channelwise else shape[0])",
        _REGULARISER + _LAYERS,
    ),
    # --- the regulariser's arithmetic
    Mutation(
        "weight-term-other-site",
        "each site's squared weight norm is divided by its neighbour's (1 - p) (off-by-one gather of p)",
        "cd_convert/collector.py",
        "kept = one_minus_p if self.index is None else one_minus_p[self.index]",
        "kept = one_minus_p.roll(1) if self.index is None else one_minus_p.roll(1)[self.index]",
        _REGULARISER,
    ),
    Mutation(
        "weight-term-p",
        "the weight term divides by p instead of (1 - p): the weight decay shrinks as more units are kept",
        "cd_convert/collector.py",
        "kept = one_minus_p if self.index is None else one_minus_p[self.index]",
        "kept = torch.sigmoid(theta) if self.index is None else torch.sigmoid(theta)[self.index]",
        _REGULARISER,
    ),
    Mutation(
        "entropy-sign",
        "the entropy term's sign is flipped: the prior pushes p towards 0 or 1 instead of towards 1/2",
        "cd_convert/collector.py",
        "total = self.dropout_regularizer * (self.units * neg_entropy).sum()",
        "total = -self.dropout_regularizer * (self.units * neg_entropy).sum()",
        _REGULARISER,
    ),
    Mutation(
        "entropy-without-k",
        "the entropy term is not multiplied by K: the dropout prior is K times too weak on wide layers",
        "cd_convert/collector.py",
        "total = self.dropout_regularizer * (self.units * neg_entropy).sum()",
        "total = self.dropout_regularizer * neg_entropy.sum()",
        _REGULARISER,
    ),
    Mutation(
        "collector-clamp-not-straight-through",
        "the regulariser's logit clamp blocks the gradient: a p pushed past its bound never comes back",
        "cd_convert/collector.py",
        "theta = raw + (detached.clamp(self.neg_bounds, self.bounds) - detached)",
        "theta = raw.clamp(self.neg_bounds, self.bounds)",
        _REGULARISER,
    ),
    Mutation(
        "clamped-logit-not-straight-through",
        "clamped_logit (p, the no-grad and the reference paths) blocks the gradient beyond the bound",
        "cd_convert/layers.py",
        "return p_logit + (p_logit.clamp(-bound, bound) - p_logit).detach()",
        "return p_logit.clamp(-bound, bound)",
        _LAYERS + _REGULARISER,
    ),
    Mutation(
        "norms-low-precision",
        "consumer weight norms are computed in bf16/fp16 and cast afterwards: the weight term loses ~3 digits",
        "cd_convert/collector.py",
        "torch.stack(torch._foreach_norm(list(weights), 2, dtype=torch.float32)).square()",
        "torch.stack(torch._foreach_norm(list(weights), 2)).square().float()",
        _REGULARISER,
    ),
    Mutation(
        "regularization-one-submodule",
        "regularization() of a model holding several converted modules counts only the last one",
        "cd_convert/collector.py",
        "total = term if total is None else total + term.to(total.device)",
        "total = term",
        _REGULARISER,
    ),
    Mutation(
        "plan-cache-stale",
        "the regulariser's cached plan is kept when sites are added: new sites train without a prior",
        "cd_convert/collector.py",
        "if collector.applications != self.applications:",
        "if len(collector.applications) < 0:  # mutant: added applications go unnoticed",
        _REGULARISER + ("tests/test_convert_basic.py",),
    ),
    # --- the regulariser's eager path: one autograd Function with a written-out backward
    Mutation(
        "fn-entropy-sign",
        "the eager regulariser's entropy term has its sign flipped",
        "cd_convert/collector.py",
        "        terms = plan.dropout_units * neg_entropy",
        "        terms = -plan.dropout_units * neg_entropy",
        _REGULARISER,
    ),
    Mutation(
        "fn-entropy-without-k",
        "the eager regulariser's entropy term is not multiplied by K",
        "cd_convert/collector.py",
        "plan.dropout_units = plan.dropout_regularizer * plan.units",
        "plan.dropout_units = plan.dropout_regularizer * torch.ones_like(plan.units)",
        _REGULARISER,
    ),
    Mutation(
        "fn-weight-term-other-site",
        "the eager regulariser divides each weight term by the neighbouring application's (1 - p)",
        "cd_convert/collector.py",
        "            inverse_kept = one_minus_p.reciprocal()",
        "            inverse_kept = one_minus_p.roll(1).reciprocal()",
        _REGULARISER,
    ),
    Mutation(
        "fn-logit-grad-weight-part",
        "the written-out backward drops p/(1 - p) from the weight term's logit gradient",
        "cd_convert/collector.py",
        "squared, p * inverse_kept, value",
        "squared, inverse_kept, value",
        _REGULARISER,
    ),
    Mutation(
        "fn-weight-grad-half",
        "the written-out backward gives the consumer weights W/(1 - p) instead of 2W/(1 - p): half the decay",
        "cd_convert/collector.py",
        "plan.two_weight_regularizer = 2.0 * plan.weight_regularizer",
        "plan.two_weight_regularizer = 1.0 * plan.weight_regularizer",
        _REGULARISER,
    ),
    # --- the regulariser's CPU path on Python floats (cd_convert/host_regularizer.py)
    Mutation(
        "host-reg-entropy-sign",
        "the CPU regulariser's entropy term has its sign flipped: p is pushed towards 0 or 1",
        "cd_convert/host_regularizer.py",
        "total += dropout_units * (p * log_p + kept * log_kept)",
        "total += -dropout_units * (p * log_p + kept * log_kept)",
        _REGULARISER,
    ),
    Mutation(
        "host-reg-no-clamp",
        "the CPU regulariser does not clamp the logit: past the bound it prices a p of 0 or 1",
        "cd_convert/host_regularizer.py",
        "theta = min(max(logit.item(), -bound), bound)",
        "theta = logit.item()",
        _REGULARISER,
    ),
    Mutation(
        "host-reg-logit-grad-weight-part",
        "the CPU regulariser's logit gradient drops p from the weight term's p/(1 - p)",
        "cd_convert/host_regularizer.py",
        "wr * weight_sum * p * inverse_kept)",
        "wr * weight_sum * inverse_kept)",
        _REGULARISER,
    ),
    Mutation(
        "host-reg-weight-grad-no-pull",
        "the CPU regulariser gives a consumer weight 2W wr, without its sites' 1/(1 - p)",
        "cd_convert/host_regularizer.py",
        "weight_scales[j] += reads_of_j * inverse_kept",
        "weight_scales[j] += reads_of_j",
        _REGULARISER,
    ),
    Mutation(
        "host-reg-upstream-grad-ignored",
        "the CPU regulariser's logit gradients ignore the upstream gradient (a scaled loss scales nothing)",
        "cd_convert/host_regularizer.py",
        "[v * g for v in ctx.logit_grads]",
        "[v for v in ctx.logit_grads]",
        _REGULARISER,
    ),
    # --- the CPU's host-scalar paths (cd_convert/host_scalars.py)
    Mutation(
        "tensor-site-no-clamp",
        "the tensor formula's training path does not clamp the logit: p can reach 0 or 1 on non-CPU devices",
        "cd_convert/layers.py",
        "    theta = p_logit.clamp(-bound, bound)\n    if theta.dtype != uniform.dtype:",
        "    theta = p_logit\n    if theta.dtype != uniform.dtype:",
        _LAYERS,
    ),
    Mutation(
        "host-site-temperature-dropped",
        "the CPU site's p-logit gradient ignores the temperature: p learns from a gradient t times too small",
        "cd_convert/host_scalars.py",
        "value = p * total - (total - kept_total) / temperature",
        "value = p * total - (total - kept_total)",
        _LAYERS,
    ),
    Mutation(
        "host-site-kept-sum-unscaled",
        "the CPU site's sum(g y w) keeps the 1/(1 - p) factor: a wrong p-logit gradient",
        "cd_convert/host_scalars.py",
        "kept_total = gy.mul_(mask).sum().item() / inverse_kept",
        "kept_total = gy.mul_(mask).sum().item()",
        _LAYERS,
    ),
    Mutation(
        "host-site-scale-dropped",
        "the CPU site drops 1/(1 - p): its outputs shrink by (1 - p) in training",
        "cd_convert/host_scalars.py",
        "        .sigmoid_()\n        .mul_(inverse_kept)\n",
        "        .sigmoid_()\n",
        _LAYERS,
    ),
    Mutation(
        "host-site-mask-nan-at-zero-noise",
        "the CPU site writes sigmoid(s) as exp(s) / (1 + exp(s)): noise u = 0 (torch.rand can draw it) gives NaN",
        "cd_convert/host_scalars.py",
        "        .sigmoid_()\n        .mul_(inverse_kept)\n    )",
        "        .exp_()\n    )\n    mask = (mask / (1 + mask)).mul_(inverse_kept)",
        _LAYERS,
    ),
    Mutation(
        "host-site-p-is-keep-rate",
        "the CPU site's p-logit gradient uses 1 - p where it needs p: a wrong gradient for every rate but 1/2",
        "cd_convert/host_scalars.py",
        "return mask, odds / inverse_kept, inverse_kept",
        "return mask, 1.0 / inverse_kept, inverse_kept",
        _LAYERS,
    ),
    Mutation(
        "host-route-noise-shared-by-rows",
        "the CPU site's own noise is drawn for one row and broadcast: every sample in a batch gets the same mask",
        "cd_convert/host_scalars.py",
        "    uniform = noise.eager_cpu_uniform(x.shape, numel, x.dtype)\n    if needs_grad:",
        "    uniform = noise.eager_cpu_uniform(x.shape[-1:], x.shape[-1], x.dtype).expand(x.shape).clone()\n"
        "    if needs_grad:",
        _LAYERS,
    ),
    Mutation(
        "host-no-grad-temperature-dropped",
        "a CPU site's call without gradients (an MC pass) builds its mask at temperature 1, not the site's",
        "cd_convert/host_scalars.py",
        "mask, _p, _inverse_kept = _scaled_mask(uniform, theta, temperature)",
        "mask, _p, _inverse_kept = _scaled_mask(uniform, theta, 1.0)",
        _LAYERS,
    ),
    Mutation(
        "host-no-grad-no-clamp",
        "a CPU site's call without gradients does not clamp the logit: a held p past its bound reaches 0 or 1",
        "cd_convert/host_scalars.py",
        "    theta = min(max(p_logit.item(), -bound), bound)\n    mask, _p",
        "    theta = p_logit.item()\n    mask, _p",
        _LAYERS,
    ),
    Mutation(
        "host-site-no-clamp",
        "the CPU site does not clamp the logit: p can reach 0 or 1",
        "cd_convert/host_scalars.py",
        "        theta = min(max(p_logit.item(), -bound), bound)\n        mask, p,",
        "        theta = p_logit.item()\n        mask, p,",
        _LAYERS,
    ),
    # --- prior constants and losses
    Mutation(
        "nll-preset-wr",
        "the 'nll' preset's weight regulariser is l^2/N instead of l^2/(2N): twice the weight decay",
        "cd_convert/prior.py",
        "wr, dr = l2 / (2 * n), 1.0 / n",
        "wr, dr = l2 / n, 1.0 / n",
        ("tests/test_prior.py",) + _REGULARISER,
    ),
    Mutation(
        "mse-preset-tau-ignored",
        "the 'mse' preset's dropout regulariser ignores tau (2/N instead of 2/(tau N))",
        "cd_convert/prior.py",
        "wr, dr = l2 / (t * n), 2.0 / (t * n)",
        "wr, dr = l2 / (t * n), 2.0 / n",
        ("tests/test_prior.py",) + _REGULARISER,
    ),
    Mutation(
        "gaussian-nll-constant",
        "gaussian_nll drops the log(2 pi) constant: reported NLLs are off by 0.92 nats per output",
        "cd_convert/losses.py",
        "(_scaled_squares(mean, log_variance, target) + LOG_2PI)",
        "(_scaled_squares(mean, log_variance, target))",
        ("tests/test_losses.py",),
    ),
    Mutation(
        "gaussian-loss-precision-inverted",
        "the Gaussian losses weight the squared error by exp(s), the variance, instead of exp(-s), the precision",
        "cd_convert/losses.py",
        "torch.addcmul(log_variance, torch.exp(-log_variance),",
        "torch.addcmul(log_variance, torch.exp(log_variance),",
        ("tests/test_losses.py",),
    ),
    Mutation(
        "mixture-nll-without-log-t",
        "gaussian_mixture_nll sums the T densities instead of averaging them: off by log T, and T-dependent",
        "cd_convert/losses.py",
        "per_example = math.log(t) - torch.logsumexp(per_sample, dim=0)",
        "per_example = -torch.logsumexp(per_sample, dim=0)",
        ("tests/test_losses.py",),
    ),
    Mutation(
        "mixture-nll-is-mean-nll",
        "gaussian_mixture_nll averages the samples' log-densities (Jensen's bound) instead of the densities",
        "cd_convert/losses.py",
        "per_example = math.log(t) - torch.logsumexp(per_sample, dim=0)",
        "per_example = -per_sample.mean(dim=0)",
        ("tests/test_losses.py",),
    ),
    # --- the site's forward and backward
    Mutation(
        "fused-bound-wrong",
        "the fused GPU kernels clamp the logit at a wrong bound: p beyond [eps, 1 - eps] on the GPU only",
        "cd_convert/fused.py",
        "    bound = logit_bound(eps)\n",
        "    bound = logit_bound(eps) + 1.0\n",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "nograd-drops-scale",
        "the no-grad path (MC prediction) drops 1/(1 - p): MC predictions are shrunk by (1 - p) per site",
        "cd_convert/layers.py",
        "keep = s.sigmoid_().mul_(torch.sigmoid(-theta).reciprocal())",
        "keep = s.sigmoid_()",
        ("tests/test_noise.py",) + _LAYERS + _MC,
    ),
    Mutation(
        "backward-temperature-dropped",
        "the p-logit gradient ignores the temperature: p learns from a gradient t times too small",
        "cd_convert/layers.py",
        "grad = torch.sigmoid(theta) * gy_sum - (gy_sum - gyw_sum) / ctx.temperature",
        "grad = torch.sigmoid(theta) * gy_sum - (gy_sum - gyw_sum)",
        _LAYERS,
    ),
    Mutation(
        "user-temperature-ignored",
        "a temperature given to a site is ignored: the class default is always used",
        "cd_convert/layers.py",
        "validate_temperature(self.default_temperature if temperature is None else temperature)",
        "validate_temperature(self.default_temperature)",
        _LAYERS + _CONVERT,
    ),
    Mutation(
        "channelwise-noise-per-sample",
        "channel-wise sites draw one mask value per sample instead of per (sample, channel)",
        "cd_convert/layers.py",
        "return tuple(x.shape[: channel_dim + 1]) + (1,) * (x.dim() - channel_dim - 1)",
        "return tuple(x.shape[:channel_dim]) + (1,) * (x.dim() - channel_dim)",
        _LAYERS,
    ),
    Mutation(
        "eval-applies-dropout",
        "eval mode still applies the relaxed mask: deterministic predictions are noisy",
        "cd_convert/layers.py",
        "if not (is_training or self.sampling is not None):",
        "if False:  # mutant: eval mode never short-circuits",
        _LAYERS + ("tests/test_convert_basic.py",),
    ),
    Mutation(
        "hard-mask-drops-1-minus-p",
        "sampling='hard' drops each unit with probability 1 - p instead of p",
        "cd_convert/layers.py",
        "keep = uniform.ge_(torch.sigmoid(theta))",
        "keep = uniform.ge_(torch.sigmoid(-theta))",
        _LAYERS + _MC,
    ),
    # --- noise
    Mutation(
        "noise-half-interval",
        "the CPU float32 noise uses 22 of 23 mantissa bits: u only covers (0, 1/2), far more units are dropped",
        "cd_convert/noise.py",
        "_MANTISSA_MASK = (1 << 23) - 1",
        "_MANTISSA_MASK = (1 << 22) - 1",
        ("tests/test_noise.py",) + _LAYERS,
    ),
    Mutation(
        "fused-four-share-noise",
        "the fused GPU kernels give four neighbouring elements (or channels) one shared noise value",
        "cd_convert/_triton_kernels.py",
        "return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))",
        "return tl.where(lane == lane, r0, r0)",
        ("tests/test_noise_independence.py", "tests/test_fused.py"),
    ),
    Mutation(
        "attention-noise-shared-by-heads",
        "the fused attention kernel draws the same mask for every head (and sample) of a call",
        "cd_convert/_triton_attention.py",
        "c1 = c0 * 0 + bh.to(tl.uint32, bitcast=True)",
        "c1 = c0 * 0",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "attention-dq-ignores-mask",
        "the fused attention backward leaves the concrete mask out of dQ: query gradients of the undropped model",
        "cd_convert/_triton_attention.py",
        "ds = p * (g_pd * keep * scale - delta[:, None])",
        "ds = p * (g_pd - delta[:, None])",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "timm-attention-route-left-open",
        "timm attention's route to the fused kernel is never closed: F.scaled_dot_product_attention stays replaced",
        "cd_convert/integrations/timm.py",
        "            routes.pop().close()",
        "            routes[-1]",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "transformers-sdpa-route-not-opened",
        "a transformers model switched to SDPA for the kernel never routes its attention calls to the sites: "
        "SDPA applies the fixed rate",
        "cd_convert/integrations/transformers.py",
        "                route = open_route(self.sites[0], module.training)",
        "                route = None",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "attention-route-patches-dropout",
        "routing an attention module's SDPA call to the kernel also replaces F.dropout, hiding the code locations "
        "of the module's other dropout calls: they run at their fixed rate",
        "cd_convert/sites/attention_routing.py",
        "            if dropout:\n                patches.enter_context",
        "            if True:\n                patches.enter_context",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "recomputed-output-new-seed",
        "a targeted layer's recomputed input is drawn with a new seed instead of the forward pass's: the layer's "
        "weight gradient sees another mask than its output did",
        "cd_convert/fused.py",
        "_masked(x, p_logit, node.seed, node.geometry)",
        "_masked(x, p_logit, draw_seed(x.device), node.geometry)",
        ("tests/test_recompute.py",),
    ),
    Mutation(
        "recompute-hooks-left-open",
        "a targeted layer's saved-tensor hooks stay active after its call: later layers save through them",
        "cd_convert/recompute.py",
        "            stack.pop().__exit__(None, None, None)",
        "            stack.pop()",
        ("tests/test_recompute.py",),
    ),
    Mutation(
        "thread-key-breaks-compiled-graphs",
        "the hooks' per-thread key calls threading.get_ident under torch.compile: every attention module splits "
        "the compiled graph",
        "cd_convert/_tracing.py",
        "return 0 if _is_compiling() else threading.get_ident()",
        "return threading.get_ident()",
        ("tests/test_timm.py",),
    ),
    # --- conversion
    Mutation(
        "original-rate-ignored",
        "converted sites start at init_p instead of the model's original dropout rate",
        "cd_convert/options.py",
        "return p if p is not None and 0.0 < p < 1.0 else self.init_p",
        "return self.init_p",
        _CONVERT,
    ),
    Mutation(
        "temperature-options-swapped",
        "convert(temperature=...) sets the channel-wise sites and channel_temperature= the element-wise ones",
        "cd_convert/options.py",
        "return self.channel_temperature if site_type.channelwise else self.temperature",
        "return self.temperature if site_type.channelwise else self.channel_temperature",
        _CONVERT + _LAYERS,
    ),
    Mutation(
        "save-output-always",
        "sites keep their output for the backward pass even when an in-place op follows: backward breaks",
        "cd_convert/convert.py",
        "site.save_output = entry.exact_consumers and all(c is not None for c, _ in entry.applications)",
        "site.save_output = True",
        _LAYERS + ("tests/test_convert_basic.py",),
    ),
    Mutation(
        "freeze-writes-keep-prob",
        "freeze() writes the keep probability 1 - p into the plain nn.Dropout instead of p",
        "cd_convert/sites/base.py",
        "(p=float(site.p.detach()))",
        "(p=1.0 - float(site.p.detach()))",
        _CONVERT,
    ),
    # --- consumers, widths, targeting, planning
    Mutation(
        "channelwise-k-flattened-linear",
        "a channel-wise site read by a Linear through a flatten counts the Linear's in_features (C*H*W), not C",
        "cd_convert/consumers.py",
        "    return consumer if convs else ConsumerInfo(consumer.modules, consumer.weights, None)",
        "    return consumer",
        _REGULARISER,
    ),
    Mutation(
        "shape-read-hides-consumer",
        "x.view(x.size(0), -1) counts as a reader: the site behind it loses its consumer and weight term",
        "cd_convert/consumers.py",
        "            if _reads_metadata_only(user):\n                continue\n",
        "",
        _REGULARISER,
    ),
    Mutation(
        "width-at-convert-wrong-dim",
        "K fixed at conversion from a Linear's in_features instead of the out_features it produces",
        "cd_convert/consumers.py",
        "        return module.out_features",
        "        return module.in_features",
        ("tests/test_width_at_convert.py", "tests/test_regularizer*.py"),
    ),
    Mutation(
        "targeted-layer-double-dropout",
        "targets=[nn.Linear] adds a second learned site behind the dropout already in front of the layer",
        "cd_convert/sites/targeted.py",
        "        absorber = _absorber(planner, module)\n",
        "        absorber = None\n",
        ("tests/test_absorb.py", "tests/test_targets.py"),
    ),
    Mutation(
        "plan-lists-existing-site-twice",
        "plan() on a converted model lists a site found two ways twice, at the default init_p",
        "cd_convert/planning.py",
        "            if previous is not None and previous.existing:\n                return previous\n",
        "",
        ("tests/test_plan_converted.py", "tests/test_convert_twice.py"),
    ),
    Mutation(
        "freeze-keeps-handwritten-sites",
        "freeze() leaves ConcreteDropout layers written in the model's code (and their p_logit keys) in place",
        "cd_convert/sites/module.py",
        "self.original_save_output\n\n    def freeze(self, root: nn.Module) -> None:\n        frozen = frozen_dropout(",
        "self.original_save_output\n\n    def freeze(self, root: nn.Module) -> None:\n        frozen = (",
        ("tests/test_freeze_handwritten.py",),
    ),
    # --- Monte Carlo prediction
    Mutation(
        "mc-sites-not-sampling",
        "mc_mode does not switch the sites to sampling: mc_predict returns T identical deterministic passes",
        "cd_convert/mc.py",
        "            site.sampling = sampling\n",
        "            site.sampling = None\n",
        _MC,
    ),
    Mutation(
        "mc-wrong-rows-averaged",
        "mc_predict averages rows i*T..i*T+T-1 (the wrong axis of the pass-major layout) for example i",
        "cd_convert/mc.py",
        "examples = torch.arange(start, start + probs.shape[0], device=probs.device) % self.batch",
        "examples = torch.arange(start, start + probs.shape[0], device=probs.device) // self.samples",
        _MC,
    ),
    Mutation(
        "mc-variance-without-aleatoric",
        "the predictive variance of a heteroscedastic head leaves out the aleatoric part",
        "cd_convert/mc.py",
        "variance=epistemic + aleatoric,",
        "variance=epistemic,",
        _MC,
    ),
    # --- UCI benchmark (benchmarks/uci/)
    Mutation(
        "uci-published-wrong-splits",
        "the UCI table compares a run's splits with the first published splits, not the same split indices",
        "benchmarks/uci/driver.py",
        '        pub = [float(published[key][r["split"]]) for r in recs]\n',
        "        pub = [float(published[key][i]) for i, _ in enumerate(recs)]\n",
        _UCI,
    ),
    Mutation(
        "uci-grid-worst",
        "the UCI grid search (and tau selection) picks the (p, tau) with the worst validation LL",
        "benchmarks/uci/decisions.py",
        "np.unravel_index(np.argmax(scores), scores.shape)",
        "np.unravel_index(np.argmin(scores), scores.shape)",
        _UCI,
    ),
    Mutation(
        "uci-calibration-worst",
        "UCI noise calibration keeps the candidate noise level with the worst validation LL",
        "benchmarks/uci/decisions.py",
        "candidates[int(np.argmax(lls))]",
        "candidates[int(np.argmin(lls))]",
        _UCI,
    ),
    Mutation(
        "uci-best-state-not-restored",
        "the UCI concrete run tests the last epoch's weights, not the best-validation state it kept",
        "benchmarks/uci/decisions.py",
        "model.load_state_dict(self.state)",
        "pass  # mutant: the kept state is never loaded",
        _UCI,
    ),
    Mutation(
        "uci-early-stop-one-check-late",
        "the UCI early stop waits one epoch more than its patience",
        "benchmarks/uci/decisions.py",
        "return patience > 0 and epoch - best_epoch >= patience",
        "return patience > 0 and epoch - best_epoch > patience",
        _UCI,
    ),
    Mutation(
        "uci-refit-on-the-fitting-set",
        "concrete_refit's second run fits the first 80% of the training split again, not the whole split",
        "benchmarks/uci/concrete.py",
        "    fold = Fold.make(ds, train_idx, test_idx)\n    common.seed_all(seed)\n",
        "    fold = Fold.make(ds, validation_split(train_idx)[0], test_idx)\n    common.seed_all(seed)\n",
        _UCI,
    ),
    Mutation(
        "uci-refit-first-noise-ignored",
        "concrete_refit tests with its own learned noise level instead of the first run's calibrated one",
        "benchmarks/uci/concrete.py",
        "model.log_var.fill_(math.log(1.0 / (first_tau * fold.y_std**2)))",
        "model.log_var.fill_(learned)",
        _UCI,
    ),
    Mutation(
        "uci-heldout-rates-on-fitting-set",
        "concrete_heldout's rate step reads the fitting set instead of the held-out set",
        "benchmarks/uci/heldout.py",
        "loss = _heldout_loss(model, fold.x_eval[idx], y_heldout[idx], samples)",
        "loss = _heldout_loss(model, fold.x_fit[idx], fold.y_fit[idx], samples)",
        _UCI,
    ),
    Mutation(
        "uci-heldout-fit-loss-moves-rates",
        "concrete_heldout's weight step also trains the rates and the noise level on the fitting loss",
        "benchmarks/uci/heldout.py",
        "weight_params = [p for n, p in named if not _is_rate_parameter(n)]",
        "weight_params = [p for n, p in named]",
        _UCI,
    ),
    Mutation(
        "uci-freeze-without-restore",
        "concrete_freeze fixes the rates where the first declining check found them, not at the best check",
        "benchmarks/uci/decisions.py",
        "            best.restore(model)\n            on_first_decline()",
        "            on_first_decline()",
        _UCI,
    ),
    Mutation(
        "uci-freeze-patience-from-best",
        "concrete_freeze's patience counts from the best check, so the weights get no time after the freeze",
        "benchmarks/uci/decisions.py",
        "return should_stop(epoch, max(best.epoch, best.declined_at), patience)",
        "return should_stop(epoch, best.epoch, patience)",
        _UCI,
    ),
    Mutation(
        "uci-freeze-rates-keep-training",
        "concrete_freeze's rates go on training after the freeze",
        "benchmarks/uci/concrete_net.py",
        "            param.requires_grad_(False)",
        "            param.requires_grad_(True)",
        _UCI,
    ),
    Mutation(
        "uci-freeze-refit-rates-not-set",
        "concrete_freeze_refit's refit holds its sites' initial rates, not the first run's",
        "benchmarks/uci/concrete_net.py",
        "            model.get_submodule(name).p_logit.fill_(math.log(rate / (1.0 - rate)))",
        "            model.get_submodule(name).p_logit.add_(0.0 * rate)",
        _UCI,
    ),
    Mutation(
        "uci-freeze-refit-rates-not-passed",
        "concrete_freeze_refit refits with learned rates, as concrete_refit does",
        "benchmarks/uci/driver.py",
        'fixed_rates=first["rates"] if REFITS[method][1] else None,',
        "fixed_rates=None,",
        _UCI,
    ),
    Mutation(
        "uci-freeze-refit-from-concrete",
        "concrete_freeze_refit refits concrete's run instead of concrete_freeze's",
        "benchmarks/uci/concrete.py",
        '"concrete_freeze_refit": ("concrete_freeze", True),',
        '"concrete_freeze_refit": ("concrete", True),',
        _UCI,
    ),
    Mutation(
        "uci-warm-noise-not-held",
        "concrete_freeze_warm's warm epochs train the noise level too, away from the calibrated one it is tested with",
        "benchmarks/uci/concrete.py",
        "    model.log_var.requires_grad_(False)\n    try:",
        "    try:",
        _UCI,
    ),
    Mutation(
        "uci-warm-rows-own-statistics",
        "concrete_freeze_warm standardises the whole split with its own statistics, not those the model was trained on",
        "benchmarks/uci/concrete.py",
        "_, _, (_, x_all) = standardize(ds.X[fit_idx], ds.X[train_idx])",
        "_, _, (x_all,) = standardize(ds.X[train_idx])",
        _UCI,
    ),
    Mutation(
        "uci-refit-alone-tests-first-run",
        "a refit asked for alone still tests its first run, and its cost counts those MC passes",
        "benchmarks/uci/driver.py",
        "        test=base in methods,\n",
        "        test=True,\n",
        _UCI,
    ),
    Mutation(
        "uci-report-drops-unknown-method",
        "the whole UCI table silently drops a method it has no plot style for",
        "benchmarks/uci_report.py",
        "return [m for m in METHOD_STYLE if m in present] + sorted(present - set(METHOD_STYLE))",
        "return [m for m in METHOD_STYLE if m in present]",
        _UCI,
    ),
    Mutation(
        "uci-reaches-grid-without-se",
        "the whole UCI table's grid-quality criterion leaves out the published standard error",
        "benchmarks/uci_report.py",
        'll_ok = versus["ll_diff_mean"] >= -versus["ll_published_se"]',
        'll_ok = versus["ll_diff_mean"] >= 0.0',
        _UCI,
    ),
    # --- conversion across model registries: the dry run, routed methods
    Mutation(
        "audit-accounts-every-mask",
        "dropout written as a custom autograd function keeps its fixed rate and nothing says so",
        "cd_convert/dry_run.py",
        "        if self.known_calls:\n            return True",
        "        if True:\n            return True",
        ("tests/test_mask_audit.py",),
    ),
    Mutation(
        "dry-run-leaves-forward-changes",
        "convert() changes the caller's model when its forward rewires itself (BigBird's full-attention switch)",
        "cd_convert/dry_run.py",
        "        for module, state in states:\n            _restore_module_state(module, state)\n",
        "",
        ("tests/test_convert_basic.py",),
    ),
    Mutation(
        "zero-rate-untagged",
        "freeze refuses a model whose rate-0 attributes reach F.dropout through a function (torchvision Swin)",
        "cd_convert/dry_run.py",
        "            return _set(holder, attr, _TaggedZero(path))",
        "            return False",
        ("tests/test_convert_basic.py",),
    ),
    Mutation(
        "checkpoint-recompute-unrouted",
        "gradient checkpointing recomputes routed dropout at its fixed rate: other gradients, or CheckpointError",
        "cd_convert/interception.py",
        "        checkpoint = self._checkpoint_function()\n",
        "        checkpoint = None\n",
        ("tests/test_transformers.py::test_gradient_checkpointing_recomputes_with_the_routed_sites",),
    ),
    Mutation(
        "eager-only-dropout-unswitched",
        "dropout only the eager attention path applies gets no eager switch: the configured path crashes in training",
        "cd_convert/dry_run.py",
        "        _mark_eager_only(run, native)",
        "        pass",
        ("tests/test_transformers.py::test_dropout_only_the_eager_path_applies_gets_eager_attention_while_active",),
    ),
    Mutation(
        "spectrogram-as-raw-audio",
        "AST gets raw audio for its spectrogram input: its conversion without example inputs fails",
        "cd_convert/integrations/transformers_inputs.py",
        '    if getattr(config, "conv_stride", None) is None and getattr(config, "num_mel_bins", None) is not None:',
        "    if False:",
        ("tests/test_transformers.py::test_inputs_built_for_spectrograms_patches_audio_and_image_places",),
    ),
    Mutation(
        "unreached-expert-unwarned",
        "a mixture-of-experts expert the dry run never reached keeps its fixed rate and convert says nothing",
        "cd_convert/convert.py",
        "    _warn_not_called(model, plan_)\n",
        "",
        ("tests/test_convert_basic.py",),
    ),
    # --- the opt-in C++ CPU path (cd_convert/csrc/host_site.cpp: each mutant rebuilds the extension, ~40 s)
    Mutation(
        "cpp-logit-grad-sign",
        "the C++ site's backward adds the kept sum where it subtracts it: wrong rate gradients",
        "cd_convert/csrc/host_site.cpp",
        "  return p * total - (total - kept) / temperature;",
        "  return p * total - (total + kept) / temperature;",
        ("tests/test_cpu_extension.py",),
    ),
    Mutation(
        "cpp-weight-term-half",
        "the C++ regulariser's weight gradient misses the factor 2 of d||W||^2/dW",
        "cd_convert/csrc/host_site.cpp",
        "scale = 2.0 * wr * scale;",
        "scale = wr * scale;",
        ("tests/test_cpu_extension.py",),
    ),
    Mutation(
        "cpp-forward-odds",
        "the C++ one-pass forward raises u instead of the odds u / (1 - u) to the power 1/t: a wrong mask",
        "cd_convert/csrc/host_site.cpp",
        "double base = uu / (1.0 - uu), power = 1.0;",
        "double base = uu, power = 1.0;",
        ("tests/test_cpu_extension.py",),
    ),
    Mutation(
        "cpp-squared-norm-unsquared",
        "the C++ regulariser's loop sums the weights' entries where it sums their squares: a wrong weight term",
        "cd_convert/csrc/host_site.cpp",
        "          sum += v * v;",
        "          sum += v;",
        ("tests/test_cpu_extension.py",),
    ),
    Mutation(
        "delivery-outside-the-graph-task",
        "the regulariser delivers its gradients to site nodes the current backward pass never runs: lost gradients",
        "cd_convert/csrc/host_site.cpp",
        "box->ran_in == task || !runs_in_current_task(box->node)) {",
        "box->ran_in == task) {",
        ("tests/test_deliveries.py",),
    ),
    Mutation(
        "delivery-after-the-node-ran",
        "the regulariser delivers to a site node that has already run in this backward pass: lost gradients",
        "cd_convert/csrc/host_site.cpp",
        "box->node == nullptr || box->ran_in == task || !runs_in_current_task",
        "box->node == nullptr || !runs_in_current_task",
        ("tests/test_deliveries.py",),
    ),
    Mutation(
        "freeze-last-shared-rate-wins",
        "freeze writes two different learned rates into the one attribute both calls read: the last write wins",
        "cd_convert/convert.py",
        "    blockers.update(_shared_rate_blockers(model, collector.changes))\n",
        "",
        ("tests/test_config_rates.py",),
    ),
    Mutation(
        "cpp-number-ignores-negation",
        "the C++ code reads a lazily negated one-element tensor's memory as its value: the logit's sign flips",
        "cd_convert/csrc/host_site.cpp",
        " && t.numel() == 1 && !t.is_neg()) {",
        " && t.numel() == 1) {",
        ("tests/test_cpu_extension.py",),
    ),
    Mutation(
        "registry-holds-site-nodes",
        "the registry of site nodes keeps the last 256 nodes alive: dropped graphs keep their saved tensors",
        "cd_convert/csrc/host_site.cpp",
        "  box->node = node;\n",
        "  box->node = node;\n  static std::vector<std::decay_t<decltype(y.grad_fn())>> held;\n"
        "  held.push_back(y.grad_fn());\n  if (held.size() > 256) {\n    held.clear();\n  }\n",
        ("tests/test_deliveries.py",),
    ),
    Mutation(
        "delivered-weight-term-dropped",
        "the fused node ignores the regulariser's weight term delivered to it: no weight decay from the prior",
        "cd_convert/csrc/host_site.cpp",
        "delivery.has_weight ? at::addmm(weight, g.t(), rows, delivery.weight_scale, 1.0) : g.t().mm(rows);",
        "g.t().mm(rows);",
        ("tests/test_deliveries.py",),
    ),
    Mutation(
        "delivered-logit-term-dropped",
        "the C++ site's node ignores the regulariser's logit gradient delivered to it: the prior never moves the rate",
        "cd_convert/csrc/host_site.cpp",
        "      kept /= inverse_kept;  // sum(g y w)\n"
        "      grad_logit = at::full({}, logit_gradient(p, total, kept, temperature) + delivery.logit, logit_options);",
        "      kept /= inverse_kept;  // sum(g y w)\n"
        "      grad_logit = at::full({}, logit_gradient(p, total, kept, temperature), logit_options);",
        ("tests/test_deliveries.py",),
    ),
    Mutation(
        "cpp-tree-edges-unchecked",
        "the C++ regulariser's steady-state call does not check the module tree: a replaced site or layer keeps "
        "its old logit or weight in the prior",
        "cd_convert/csrc/host_site.cpp",
        "    if (child != PyTuple_GET_ITEM(edge, 2)) {\n      return false;\n    }\n",
        "",
        ("tests/test_native_regularizer.py", "tests/test_step_overhead.py"),
    ),
    Mutation(
        "cpp-tree-eps-unchecked",
        "the C++ regulariser's steady-state call ignores a site's changed eps: the prior clamps at the old bound",
        "cd_convert/csrc/host_site.cpp",
        "    if (site_eps != PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(eps, a))) {\n      return false;\n    }\n",
        "",
        ("tests/test_native_regularizer.py", "tests/test_step_overhead.py"),
    ),
    Mutation(
        "cpp-tree-logit-dtype-unchecked",
        "the C++ regulariser's steady-state call serves logits of another dtype: their gradients come back in the "
        "plan's old dtype",
        "cd_convert/csrc/host_site.cpp",
        "    if (logit == nullptr || !readable_here(*logit) || logit->scalar_type() != plan.logit_dtype ||",
        "    if (logit == nullptr || !readable_here(*logit) ||",
        ("tests/test_native_regularizer.py", "tests/test_step_overhead.py"),
    ),
    Mutation(
        "cpp-tree-reads-subclasses",
        "the C++ regulariser's steady-state call reads tensor subclasses (a DTensor's local shard, a wrapper's "
        "empty storage) as plain tensors",
        "cd_convert/csrc/host_site.cpp",
        "  if (obj == nullptr || !THPVariable_CheckExact(obj)) {",
        "  if (obj == nullptr || !THPVariable_Check(obj)) {",
        ("tests/test_native_regularizer.py",),
    ),
    Mutation(
        "native-call-ignores-scale",
        "the C++ path's steady-state call keeps the old constants after set_regularizer: the prior keeps the old N",
        "cd_convert/collector.py",
        "            or collector.scale is not self.scale\n            or collector.applications != self.applications\n"
        "            or not host_scalars.available()",
        "            or collector.applications != self.applications\n            or not host_scalars.available()",
        ("tests/test_native_regularizer.py", "tests/test_step_overhead.py"),
    ),
    Mutation(
        "regularizer-node-drops-tangents",
        "the C++ regulariser serves dual tensors: forward-mode AD through it silently loses the tangents",
        "cd_convert/csrc/host_site.cpp",
        "  const auto dual = [](const Tensor& t) { return torch::autograd::isFwGradDefined(t); };",
        "  const auto dual = [](const Tensor& t) { return false && torch::autograd::isFwGradDefined(t); };",
        ("tests/test_native_regularizer.py",),
    ),
    Mutation(
        "regularizer-node-keeps-saved-weights",
        "the C++ regulariser's node never frees its saved weights: a second backward pass through a freed graph "
        "doubles the gradients silently instead of raising",
        "cd_convert/csrc/host_site.cpp",
        "    for (auto& weight : weights) {\n      weight.reset_data();\n    }\n",
        "",
        ("tests/test_native_regularizer.py",),
    ),
    Mutation(
        "cpu-extension-not-routed",
        "enable() reports the C++ path on while every call still takes the Python path",
        "cd_convert/host_scalars.py",
        "    extension = cpu_extension._MODULE\n    numel = x.numel()\n",
        "    extension = None\n    numel = x.numel()\n",
        ("tests/test_cpu_extension.py",),
    ),
    Mutation(
        "attention-no-smaller-shapes",
        "the fused attention kernels try only their default launch shapes, which need more shared memory than an "
        "A10, L4 or T4 has: training stops at the first backward pass there",
        "cd_convert/_attention_tiles.py",
        "        rungs = (first, replace(first, stages=1), *_SMALLEST)\n",
        "        rungs = (first,)\n",
        ("tests/test_gpu_targets.py",),
    ),
    Mutation(
        "attention-refusal-not-redone",
        "a backward pass whose query kernel is refused for shared memory returns the gradients of the try that "
        "failed (uninitialised memory) instead of redoing the pass with a smaller shape",
        "cd_convert/_attention_tiles.py",
        "        except OutOfResources as error:\n            failure = error\n            continue\n",
        "        except OutOfResources as error:\n            failure = error\n            return None\n",
        ("tests/test_attention_tiles.py", "tests/test_fused_attention.py"),
    ),
    Mutation(
        "attention-eight-warps-on-old-hopper-triton",
        "on an H100 with Triton 3.0-3.2 (PyTorch 2.4-2.6) the attention kernels of 16-bit heads 128 wide launch "
        "with 8 warps, on which that compiler aborts the training process",
        "cd_convert/_triton_attention.py",
        "    eight_warps = eight_warps_compile(_device_capability(q.device), triton.__version__)\n",
        "    eight_warps = True\n",
        ("tests/test_attention_tiles.py",),
    ),
    Mutation(
        "attention-t4-with-triton-3-3",
        "a T4 with Triton 3.3 (PyTorch 2.7) takes the attention kernels, which that compiler cannot build for it: "
        "training stops at the first attention call",
        "cd_convert/fused_attention.py",
        "tuple(capability) < (8, 0) and triton_release(triton_version) == (3, 3)",
        "tuple(capability) < (7, 5) and triton_release(triton_version) == (3, 3)",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "attention-compile-check-ignored",
        "an attention call takes the kernels even where they failed to compile: training stops at the launch "
        "instead of running explicit attention",
        "cd_convert/sites/attention.py",
        "        if fused_attention.supports(*cast, attn_mask, enable_gqa) and fused_attention.compiles_for(\n",
        "        if fused_attention.supports(*cast, attn_mask, enable_gqa) or fused_attention.compiles_for(\n",
        ("tests/test_fused_attention.py",),
    ),
    Mutation(
        "hf-configs-of-build-time-classes-switched",
        "a transformers model whose attention classes were chosen at build time (SDPA) is switched to eager for the "
        "dry run: it builds eager masks for its SDPA classes and the conversion fails",
        "cd_convert/integrations/transformers.py",
        "            configs.update((id(c), c) for c in _with_sub_configs(config) if id(c) not in fixed)\n",
        "            configs.update((id(c), c) for c in _with_sub_configs(config))\n",
        ("tests/test_transformers_fixed_attention.py",),
    ),
    Mutation(
        "encoder-fast-path-kept-under-mc",
        "torch's encoder layers keep their eval fast path while their sites sample: on torch 2.1-2.4 every MC sample "
        "is the same",
        "cd_convert/sites/encoder_fast_path.py",
        "                holder.training = True  # the flag only: children keep their eval mode\n",
        "                pass\n",
        ("tests/test_encoder_fast_path.py",),
    ),
    Mutation(
        "attention-function-call-not-routed",
        "F.multi_head_attention_forward calls are not handed to their routes: WavLM's attention dropout keeps its "
        "fixed rate and the site learns nothing",
        "cd_convert/interception.py",
        " or func is F.multi_head_attention_forward",
        "",
        ("tests/test_attention_function.py",),
    ),
    Mutation(
        "attention-function-mc-not-sampled",
        "a routed F.multi_head_attention_forward call keeps the call's training=False in MC mode: torch drops "
        "nothing, so every sample is the same",
        "cd_convert/sites/attention_function.py",
        '    bound["training"] = True\n',
        "",
        ("tests/test_attention_function.py",),
    ),
    Mutation(
        "fx-attention-rate-holder-not-read",
        "an SDPA call torch.fx found does not take its rate's attribute from the dry run: where a dropout module "
        "holds the same rate (transformers 4.x's AST), freeze has nowhere to write",
        "cd_convert/dry_run.py",
        '            site.rate_holder = site.rate_holder or run.attention[(site.key, site.owner)]["rate_holder"]\n',
        "            pass\n",
        ("tests/test_attention_function.py",),
    ),
    Mutation(
        "fused-linear-logit-gradient-unscaled",
        "the fused site-and-Linear node's logit gradient uses sum(g y m) where it needs "
        "sum(g y w) = (1 - p) sum(g y m)",
        "cd_convert/csrc/host_site.cpp",
        "        kept /= inverse_kept;\n        if (needs_logit) {\n          grad_logit = at::full",
        "        if (needs_logit) {\n          grad_logit = at::full",
        ("tests/test_fused_linear.py",),
    ),
    Mutation(
        "fused-linear-kept-under-hooks",
        "a layer in fused mode keeps it after another forward hook is registered on it: that hook sees the unmasked "
        "input",
        "cd_convert/sites/fused_linear.py",
        "            layer._forward_pre_hooks\n            or layer._forward_hooks\n",
        "            layer._forward_pre_hooks\n",
        ("tests/test_fused_linear.py",),
    ),
    Mutation(
        "fused-linear-entered-beside-other-hooks",
        "a layer with a pre-hook of the user's enters fused mode: that hook sees the unmasked input",
        "cd_convert/sites/fused_linear.py",
        "        or list(layer._forward_pre_hooks) != [hook_id]\n",
        "",
        ("tests/test_fused_linear.py",),
    ),
    Mutation(
        "reach-storage-unlabelled",
        "an in-place write of dropped values labels only the tensor written, not its storage: a view taken before "
        "the write reaches the output without the label, and a used dropout is left as 'output unused'",
        "cd_convert/reach.py",
        "        if in_place:\n            storage = _storage(tensor)\n",
        "        if False:\n            storage = _storage(tensor)\n",
        ("tests/test_output_reach.py",),
    ),
    Mutation(
        "reach-inconclusive-pass-decides",
        "a pass in which no dropout output reaches the model's outputs (labels lost outside torch) still names "
        "unused dropout: every site of such a model is left out",
        "cd_convert/reach.py",
        "        if not self.conclusive or not reached & self._marked:\n",
        "        if not self.conclusive:\n",
        ("tests/test_output_reach.py",),
    ),
    Mutation(
        "left-call-warns",
        "a call the conversion saw and left at its fixed rate (output unused, not selected) warns at every "
        "training forward as one it never saw",
        "cd_convert/convert.py",
        "    _mark_left_calls(model, plan)\n",
        "",
        ("tests/test_output_reach.py",),
    ),
    Mutation(
        "config-rate-not-traced",
        "rates on configuration objects are not nudged in the dry run: a call reading self.config.dropout "
        "(ProphetNet) has no rate attribute and freeze raises",
        "cd_convert/dry_run.py",
        "            if _is_config(attr, value) and id(value) not in seen_configs:\n",
        "            if False:\n",
        ("tests/test_config_rates.py",),
    ),
    Mutation(
        "config-rate-written-shared",
        "freeze writes a learned rate into the config every module shares instead of a private copy: the last "
        "site frozen sets the rate of every call reading it",
        "cd_convert/sites/routed.py",
        "            child = copy.copy(child)\n            setattr(holder, name, child)\n",
        "            pass\n",
        ("tests/test_config_rates.py",),
    ),
    Mutation(
        "data-parallel-replica-not-rebound",
        "an nn.DataParallel replica keeps the original's routed forward: every replica computes with the original "
        "module's parameters",
        "cd_convert/replicas.py",
        "            if needs(module):\n                rebind(module, replica)\n",
        "            pass\n",
        ("tests/test_data_parallel.py",),
    ),
    Mutation(
        "literal-rate-0-call-converted",
        "a call with a literal rate 0 (CTRL's dropout=0.0) becomes a learned site: the model drops where its code "
        "never does, and freeze has no attribute to write the rate to",
        "cd_convert/planning.py",
        "        if found.p == 0.0 and self._literal_rate(found):\n",
        "        if found.p == 0.0 and False:\n",
        ("tests/test_convert_basic.py",),
    ),
    Mutation(
        "stable-dropout-not-recognised",
        "DeBERTa's StableDropout is not recognised: it is reported unsupported and keeps its fixed rate",
        "cd_convert/targets.py",
        'klass.__name__ == "StableDropout"',
        'klass.__name__ == "StableDropoutX"',
        ("tests/test_foreign_dropout.py",),
    ),
    Mutation(
        "foreign-dropout-frozen-to-nn-dropout",
        "freeze turns a foreign dropout class's site into nn.Dropout instead of the model's own class",
        "cd_convert/sites/module.py",
        "        foreign = foreign_dropout(self.original)\n",
        "        foreign = None\n",
        ("tests/test_foreign_dropout.py",),
    ),
)


@dataclasses.dataclass
class Outcome:
    """What happened to one mutant (or to the baseline).

    Attributes:
        status: ``caught``, ``import-error``, ``survived``, ``not-applied``, ``timeout``, ``no-tests`` or ``error``.
        detail: the first failing test id, or why it was not run.
        seconds: wall-clock time of the pytest run (0 when none ran).
        output: pytest's combined output (for ``--log-dir``).
    """

    status: str
    detail: str = ""
    seconds: float = 0.0
    output: str = ""

    @property
    def caught(self) -> bool:
        return self.status in ("caught", "import-error")

    def text(self) -> str:
        """The result column of the table."""
        return {
            "caught": f"caught by {self.detail}",
            "import-error": f"caught (import error: {self.detail})",
            "survived": "SURVIVED",
            "not-applied": f"does not apply ({self.detail})",
            "timeout": f"timeout ({self.detail})",
            "no-tests": f"not run ({self.detail})",
            "error": f"error ({self.detail})",
        }[self.status]


# ------------------------------------------------------------------------------------------ copies


def _ignore(directory: str, names: List[str]) -> Set[str]:
    return set(shutil.ignore_patterns(*IGNORED)(directory, names))


def make_copy(source: Path, workdir: Path, rev: Optional[str] = None) -> Path:
    """Copy the repository into ``workdir/<name>`` (the working tree, or the commit ``rev``).

    A ``shared`` folder beside the checkout (data sets the tests look for at ``<repo>/../shared``) is linked
    beside the copy, so tests that would find it in the checkout find it in the copy too.

    Args:
        source: the repository root.
        workdir: an empty temporary folder.
        rev: a git revision to export instead of the working tree (``git archive``; read-only for the repo).

    Returns:
        The root of the copy.
    """
    dest = workdir / source.name
    if rev is None:
        shutil.copytree(source, dest, ignore=_ignore, symlinks=True)
    else:
        tar = subprocess.run(
            ["git", "-C", str(source), "archive", "--format=tar", rev], capture_output=True, check=True
        ).stdout
        dest.mkdir()
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, filter="data")
            else:  # Python without extraction filters; the archive is our own repository's
                archive.extractall(dest)
    shared = source.parent / "shared"
    if shared.is_dir() and not (workdir / "shared").exists():
        (workdir / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    (dest / f"{GUARD_MODULE}.py").write_text(GUARD_SOURCE)
    return dest


def apply_mutation(root: Path, mutation: Mutation) -> Optional[str]:
    """Replace the mutation's snippet in the copy at ``root``.

    Args:
        root: root of a copy (never the checkout).
        mutation: the mutation.

    Returns:
        None when applied, else why not (the file is missing, or the snippet occurs 0 or several times).
    """
    path = root / mutation.file
    if not path.is_file():
        return "code changed: file missing"
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        return f"code changed: snippet found {count} times"
    path.write_text(text.replace(mutation.old, mutation.new))
    return None


def module_name(path: str) -> Optional[str]:
    """Dotted module name of a repository file (``cd_convert/sites/base.py`` -> ``cd_convert.sites.base``)."""
    if not path.endswith(".py") or path.startswith("tests/"):
        return None
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or None


def resolve_tests(root: Path, selection: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Expand globs of a test selection in the copy.

    Args:
        root: root of the copy.
        selection: paths, globs or node ids (``path::name``) relative to the root.

    Returns:
        ``(found, missing)``: the entries that exist (globs expanded, sorted) and those that matched nothing.
    """
    found: List[str] = []
    missing: List[str] = []
    for entry in selection:
        path, sep, rest = entry.partition("::")
        matches = sorted(glob.glob(path, root_dir=root)) if glob.has_magic(path) else [path]
        matches = [m for m in matches if (root / m).exists()]
        if not matches:
            missing.append(entry)
        found.extend(m + sep + rest for m in matches if m + sep + rest not in found)
    return found, missing


# ------------------------------------------------------------------------------------------ pytest runs

_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S.*?)(?: - .*)?$")


def failing_tests(output: str) -> List[str]:
    """Node ids (or file paths, for collection errors) of the FAILED/ERROR lines of pytest's short summary."""
    ids = []
    for line in output.splitlines():
        match = _SUMMARY.match(line)
        if match and match.group(2) not in ids:
            ids.append(match.group(2))
    return ids


def run_pytest(
    root: Path,
    tests: Sequence[str],
    *,
    modules: Sequence[str],
    timeout: float,
    stop_first: bool,
    excluded: Sequence[str] = (),
) -> Tuple[Optional[int], str, float]:
    """Run pytest in the copy at ``root`` with the current interpreter.

    Args:
        root: root of the copy (cwd and ``PYTHONPATH``).
        tests: the test files / node ids.
        modules: modules the guard must import from the copy (the mutated one).
        timeout: seconds before the whole process group is killed.
        stop_first: ``-x``.
        excluded: node ids to ``--deselect`` and files to ``--ignore`` (tests that fail without a mutation).

    Returns:
        ``(returncode or None on timeout, combined output, seconds)``.
    """
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", GUARD_MODULE, "-rfE"]
    if stop_first:
        command.insert(3, "-x")
    for item in excluded:
        command.append(f"--deselect={item}" if "::" in item else f"--ignore={item}")
    command += list(tests)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["CD_MUTATION_ROOT"] = str(root)
    env["CD_MUTATION_MODULE"] = ",".join(modules)
    # The C++ extension (cd_convert.cpu_extension) builds inside the copy: mutants run in parallel (--jobs) must not
    # load each other's builds from one shared cache, and none may leave a mutated build in the user's cache.
    env["TORCH_EXTENSIONS_DIR"] = str(root / ".torch_extensions")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "300"  # short-summary lines are cut to the terminal width
    if not env.get("CD_CONVERT_DATA") and (root.parent / "shared" / "datasets").is_dir():
        env["CD_CONVERT_DATA"] = str(root.parent / "shared" / "datasets")
    start = time.perf_counter()
    # A session of its own, so that a timeout kills pytest's subprocesses too.
    proc = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        return None, output, time.perf_counter() - start


def classify(returncode: Optional[int], output: str, seconds: float, timeout: float) -> Outcome:
    """Turn a mutant's pytest run into an :class:`Outcome`."""
    if returncode is None:
        return Outcome("timeout", f"> {timeout:g} s", seconds, output)
    if returncode == IMPORT_ERROR_RC:
        match = re.search(r"^(\w*Error)\b.*$", output.split("CD-MUTATION-IMPORT-ERROR", 1)[-1], re.M)
        return Outcome("import-error", match.group(1) if match else "see log", seconds, output)
    if returncode == GUARD_RC:
        return Outcome("error", "guard: the copy was not imported", seconds, output)
    if returncode == 0:
        return Outcome("survived", "", seconds, output)
    if returncode == 5:
        return Outcome("no-tests", "no tests collected", seconds, output)
    if returncode in (1, 2):  # tests failed / interrupted by a collection error
        failed = failing_tests(output)
        return Outcome("caught", failed[0] if failed else f"pytest exit {returncode}", seconds, output)
    if returncode < 0:
        return Outcome("caught", f"crash, signal {-returncode}", seconds, output)
    return Outcome("error", f"pytest exit {returncode}", seconds, output)


def run_mutant(mutation: Mutation, args: argparse.Namespace, excluded: Sequence[str]) -> Outcome:
    """Copy, mutate, test, clean up."""
    with tempfile.TemporaryDirectory(prefix=f"cd-mutant-{mutation.id}-") as tmp:
        root = make_copy(args.snapshot, Path(tmp))
        problem = apply_mutation(root, mutation)
        if problem is not None:
            return Outcome("not-applied", problem)
        tests, missing = resolve_tests(root, ["tests"] if args.full else mutation.tests)
        if not tests:
            return Outcome("no-tests", "no test file of " + ", ".join(missing))
        module = module_name(mutation.file)
        code, output, seconds = run_pytest(
            root, tests, modules=[module] if module else [], timeout=args.timeout, stop_first=True, excluded=excluded
        )
    return classify(code, output, seconds, args.timeout)


def run_baseline(mutations: Sequence[Mutation], args: argparse.Namespace) -> Tuple[Optional[int], str, float]:
    """Run every selected test once on the unmutated copy (all of them: no ``-x``), with the import guard.

    Args:
        mutations: the mutants about to run (their selections are united, their modules guarded).
        args: the parsed command line.

    Returns:
        ``(returncode or None on timeout, output, seconds)``.
    """
    with tempfile.TemporaryDirectory(prefix="cd-mutant-baseline-") as tmp:
        root = make_copy(args.snapshot, Path(tmp))
        selection = ["tests"] if args.full else list(dict.fromkeys(t for m in mutations for t in m.tests))
        tests, _ = resolve_tests(root, selection)
        modules = sorted({module_name(m.file) for m in mutations if module_name(m.file) and (root / m.file).is_file()})
        return run_pytest(root, tests, modules=modules, timeout=args.timeout * max(1, len(tests)), stop_first=False)


# ------------------------------------------------------------------------------------------ report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def list_mutations(mutations: Sequence[Mutation], repo: Path) -> str:
    """The ``--list`` table: id, bug, file, default tests, and whether the snippet still applies to ``repo``."""
    rows = []
    for m in mutations:
        path = repo / m.file
        count = path.read_text().count(m.old) if path.is_file() else -1
        applies = "yes" if count == 1 else ("file missing" if count < 0 else f"no ({count} matches)")
        rows.append([m.id, m.bug, m.file, ", ".join(m.tests), applies])
    return table(rows, ["id", "bug", "file", "tests", "applies"])


def select(mutations: Sequence[Mutation], only: Optional[str]) -> List[Mutation]:
    """The mutations named by ``--only`` (all when None); unknown ids are an error."""
    if not only:
        return list(mutations)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    known = {m.id: m for m in mutations}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown mutation id(s): {', '.join(unknown)}; see --list")
    return [known[w] for w in wanted]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None, help="comma-separated mutation ids (default: all)")
    parser.add_argument("--full", action="store_true", help="run the whole suite for each mutant")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    parser.add_argument("--list", action="store_true", help="list the mutations and whether they apply; run nothing")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per mutant (default {DEFAULT_TIMEOUT_S}, {DEFAULT_FULL_TIMEOUT_S} with --full)",
    )
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository to copy (default: this one)")
    parser.add_argument("--rev", default=None, help="mutate this git revision instead of the working tree")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (trust the selection)")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each run's pytest output to DIR/<id>.log")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the mutants; print the markdown table.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 when every mutant was caught, 1 otherwise, 2 when the baseline could not be established.
    """
    args = build_parser().parse_args(argv)
    args.repo = args.repo.resolve()
    mutations = select(MUTATIONS, args.only)
    if args.list:
        print(list_mutations(mutations, args.repo))
        return 0
    if args.timeout is None:
        args.timeout = DEFAULT_FULL_TIMEOUT_S if args.full else DEFAULT_TIMEOUT_S
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    # One snapshot of the repository for the whole session: the baseline and every mutant see the same code
    # even while someone goes on editing the checkout.
    with tempfile.TemporaryDirectory(prefix="cd-mutation-snapshot-") as snapshot:
        args.snapshot = make_copy(args.repo, Path(snapshot), args.rev)
        excluded: List[str] = []
        notes: List[str] = []
        if not args.no_baseline:
            print("baseline: the unmutated copy ...", file=sys.stderr, flush=True)
            code, output, seconds = run_baseline(mutations, args)
            if args.log_dir is not None:
                (args.log_dir / "baseline.log").write_text(output)
            excluded = failing_tests(output) if code in (1, 2) else []
            print(f"baseline: pytest exit {code} in {seconds:.0f} s", file=sys.stderr, flush=True)
            if code != 0 and not excluded:
                print(output[-3000:], file=sys.stderr)
                print(
                    "the unmutated copy does not pass (or is not what gets imported); no mutant was run.",
                    file=sys.stderr,
                )
                return 2
            if excluded:
                notes.append(
                    "Tests failing without any mutation (left out of every mutant run): " + ", ".join(excluded)
                )

        outcomes: Dict[str, Outcome] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_mutant, m, args, excluded): m for m in mutations}
            for future in concurrent.futures.as_completed(futures):
                mutation = futures[future]
                outcome = future.result()
                outcomes[mutation.id] = outcome
                if args.log_dir is not None:
                    (args.log_dir / f"{mutation.id}.log").write_text(outcome.output)
                print(f"{mutation.id}: {outcome.text()} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)

    rows = [[m.id, m.bug, m.file, outcomes[m.id].text(), f"{outcomes[m.id].seconds:.0f}"] for m in mutations]
    print(table(rows, ["id", "bug", "file", "result", "seconds"]))
    caught = sum(outcomes[m.id].caught for m in mutations)
    print(f"\n{caught} of {len(mutations)} mutants caught" + ("" if args.full else " (default test selections)"))
    for note in notes:
        print("\n" + note)
    return 0 if caught == len(mutations) else 1


if __name__ == "__main__":
    sys.exit(main())
