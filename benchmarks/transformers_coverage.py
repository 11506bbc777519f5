"""Coverage of cd_convert over Hugging Face transformers families, and what explicit attention costs.

    python -m benchmarks.transformers_coverage [--families bert,llama] [--json PATH] [--memory]

**Coverage** (default). Each family (:data:`FAMILIES`: text encoders, decoders, encoder-decoders, vision, audio
and multimodal models, several heads and variants of some) is built from a tiny config with random weights
(nothing is downloaded), with its task head (classification, causal LM, conditional generation, CTC, ...) and
with every dropout rate its config declares set nonzero (attention 0.15, activation 0.05, classifier / final
0.2, embedding 0.12, others 0.1; sub-configs too), so that every dropout the architecture has is really
applied in training. LayerDrop, stochastic depth (``drop_path_rate``) and SpecAugment stay off: they are not
dropout masks. Then:

* it is converted with :func:`cd_convert.convert` and *no example inputs* (cd_convert builds its dry-run
  inputs from the config), timed. A family marked ``example_inputs`` whose conversion without them fails, or
  leaves a fixed-rate dropout in a training forward, is converted with its inputs as ``example_inputs=``
  instead: the ``inputs`` column says ``given`` and the text after the table says what failed without them.
  From :func:`cd_convert.report`: the sites by kind, the rows whose rate is read by a site elsewhere
  (``rate read``), the other rows by status (``not called``, ``left fused``, ``unsupported``, ``skipped
  (p=0)`` ...), and the sites with a consumer weight (the regulariser's weight terms);
* (c) **eval equal**: every output tensor of the converted model in eval is ``torch.equal`` to the
  unconverted model's (NaN counts as equal to NaN at the same place);
* (d) **freeze equal**: the same for :func:`cd_convert.freeze` of the converted model;
* (a) **no fixed dropout**: one training forward of the converted model under a ``TorchDispatchMode`` that
  lists every aten op still drawing a mask at a fixed rate: ``bernoulli``/``bernoulli_`` with a keep
  probability below 1 (what ``F.dropout`` and the CPU math path of SDPA decompose into) or with a tensor of
  probabilities, ``native_dropout`` / ``dropout`` / ``feature_dropout`` with p > 0, and any
  scaled-dot-product-attention kernel with ``dropout_p`` > 0. The same count for the unconverted model in
  training is shown, so that the check is not vacuous. Fixed-rate dropout left where the report says
  ``output unused`` passes only when every op the detector counts is a functional dropout call made by such a
  row's module (or its owner) and autograd finds no gradient of the data loss with respect to its output;
* (b) **grads**: after backward of the data loss alone (cross-entropy of the logits against random targets;
  for an output without logits, such as a multi-tower model's embeddings, the sum of that loss over every
  output tensor) every ``p_logit`` has a nonzero, finite gradient.

The eval checks run first, because a training forward updates BatchNorm statistics (the unconverted model's
count of fixed-rate dropout runs on a copy for the same reason), and every eval forward starts from the same
seed (ViLT samples image patches in eval too).

Failures are reported, never worked around: a family that transformers cannot build (or run) here is
``not built`` with the reason, a family where ``convert`` raises is ``convert failed``, and a failed check
marks the family ``FAIL``; the error texts follow the table. A family whose unconverted model draws no
dropout mask in training (Mamba, RWKV, ConvNeXt, ...) is ``no dropout``: checks (a) and (b) have nothing to
check there, and (c) and (d) must still pass.

**Memory** (``--memory``). For a BERT-base-shaped encoder and a Llama-shaped decoder (hidden 768, 12 heads,
``--memory-layers`` layers, vocabulary 1024 so that the transformer body dominates, config-default dropout:
BERT 0.1 everywhere, Llama attention 0.0) at batch 4 and each ``--seq-lens`` length, one training
forward + backward (loss plus ``cd_convert.regularization`` for the converted models) of three models with
the same weights:

* ``unconverted``: the model itself, SDPA attention;
* ``converted``: the default conversion (attention dropout learned, so eager attention while training;
  Llama's rate-0 attention dropout is learned too, starting at 0.1);
* ``fused_attention=False``: attention dropout kept at its fixed rate inside the fused kernel.

Memory is the bytes autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``
(unique storages, each counted once, parameters excluded); time is the median of ``--repeats`` interleaved
samples (the order rotates each repeat). Both are printed as ratios to ``unconverted``. On the CPU, SDPA
with ``dropout_p`` > 0 takes its math path in training, which keeps the attention matrices too: there the
BERT ratios understate what explicit attention costs against a fused GPU kernel.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import cd_convert
from benchmarks.common import Timeout, environment, guard
from benchmarks.dropout_detector import FixedDropoutDetector, fixed_rate_dropout_calls
from benchmarks.overhead import SavedTensorCounter

from benchmarks.transformers_families import (
    FAMILIES,
    LABELS,
    Family,
    _body,
    build,
    data_loss,
    instantiate,
    make_inputs,
    output_tensors,
)

MIB = 1024.0**2

# ---------------------------------------------------------------------------------------------- the checks


def error_text(err: BaseException) -> str:
    """``Type: message`` with the message on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@dataclass
class Check:
    """One check's outcome: passed or not, and a short text for the table."""

    ok: bool
    text: str


@dataclass
class FamilyResult:
    """Everything measured for one family (one JSON record; one table row)."""

    name: str
    result: str = ""  # pass / no dropout / FAIL / not built / convert failed
    reason: str = ""
    inputs: str = "auto"  # "given" when the family's inputs were passed to convert as example_inputs=
    without_example_inputs: str = ""  # for a family marked example_inputs: what convert gave without them
    note: str = ""
    dropout_fields: List[str] = field(default_factory=list)
    sites_by_kind: Dict[str, int] = field(default_factory=dict)
    rate_read: int = 0
    weight_terms: int = 0
    other_rows: Dict[str, int] = field(default_factory=dict)
    convert_s: Optional[float] = None
    original_fixed_dropout: Optional[int] = None
    checks: Dict[str, Check] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    report_notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, check: str, text: str, detail: str) -> None:
        """Record a failed check, with its short table text and its full error text."""
        self.checks[check] = Check(False, text)
        self.errors.append(f"{check}: {detail}")


CHECKS = ("no fixed dropout", "grads", "eval equal", "freeze equal")
#: Seed set before every eval forward: some models draw random numbers in eval too (ViLT samples patches).
EVAL_SEED = 0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, except that NaN equals NaN at the same place (a tiny random model can output NaN)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def compare_outputs(reference: List[torch.Tensor], output: List[torch.Tensor]) -> Tuple[bool, str]:
    """Whether two output lists are equal tensor by tensor (:func:`_same`); the table text and, if not, why."""
    if len(reference) != len(output):
        return False, f"{len(output)} output tensors, the original has {len(reference)}"
    differ = [(a, b) for a, b in zip(reference, output) if not _same(a, b)]
    if not differ:
        with_nan = sum(bool(a.is_floating_point() and torch.isnan(a).any()) for a in reference)
        return True, f"yes ({len(output)} tensors" + (f", {with_nan} with NaN alike)" if with_nan else ")")
    diffs = [
        float((a.float() - b.float()).abs().nan_to_num(float("inf")).max()) if a.shape == b.shape else float("nan")
        for a, b in differ
    ]
    return False, f"{len(differ)}/{len(output)} tensors differ, max abs diff {max(diffs):.3g}"


def run_family(family: Family, args: argparse.Namespace) -> FamilyResult:
    """Build, convert and check one family; every failure is caught and recorded, none is worked around.

    The result is ``pass`` when all four checks pass, ``no dropout`` when the unconverted model draws no
    dropout mask in training (so checks (a) and (b) have nothing to check) and the others pass, else
    ``FAIL``; ``not built`` and ``convert failed`` say where it stopped.
    """
    res = FamilyResult(family.name, note=family.note)
    start = time.perf_counter()
    try:
        with guard(args.timeout):
            _run_family(family, args, res)
    except Timeout as err:
        res.errors.append(f"time guard: {err}")
        res.result = res.result or "FAIL"
    res.seconds = round(time.perf_counter() - start, 2)
    if not res.result:
        if not (all(c.ok for c in res.checks.values()) and len(res.checks) == len(CHECKS)):
            res.result = "FAIL"
        else:
            res.result = "no dropout" if res.original_fixed_dropout == 0 else "pass"
    return res


def eval_outputs(model: nn.Module, inputs: Dict[str, Any]) -> List[torch.Tensor]:
    """Every output tensor of one eval forward without grad, from :data:`EVAL_SEED`."""
    model.eval()
    torch.manual_seed(EVAL_SEED)
    with torch.no_grad():
        return output_tensors(model(**inputs))


def convert_without_example_inputs(
    original: nn.Module, inputs: Dict[str, Any], dataset_size: int
) -> Tuple[Optional[nn.Module], str, Optional[float]]:
    """``convert`` with no example inputs, checked for a family marked ``example_inputs``.

    Args:
        original: the unconverted model.
        inputs: the family's inputs, for one training forward of the result.
        dataset_size: passed to ``convert``.

    Returns:
        The converted model, ``""`` and the seconds ``convert`` took when it converts and its training forward
        on ``inputs`` draws no fixed-rate dropout; else None, what went wrong, and None.
    """
    try:
        t0 = time.perf_counter()
        converted = cd_convert.convert(original, dataset_size=dataset_size)
        seconds = time.perf_counter() - t0
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - reported after the table
        return None, f"convert failed: {error_text(err)}", None
    try:
        # On a copy: the training forward would update BatchNorm statistics before the eval checks.
        left = fixed_rate_dropout_calls(copy.deepcopy(converted).train(), inputs)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        return None, f"converts, then its training forward raised {error_text(err)}", None
    if left:
        text = f"converts, but {len(left)} fixed-rate dropout op(s) are left in training, e.g. {left[0]}"
        return None, text, None
    return converted, "", seconds


def _run_family(family: Family, args: argparse.Namespace, res: FamilyResult) -> None:
    try:
        original, res.dropout_fields = build(family)
        inputs = make_inputs(family.inputs, original.config)
        reference = eval_outputs(original, inputs)
        # On a copy: a training forward updates BatchNorm statistics, which would change the eval reference.
        res.original_fixed_dropout = len(fixed_rate_dropout_calls(copy.deepcopy(original).train(), inputs))
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - reported as "not built"
        res.result, res.reason = "not built", error_text(err)
        return

    try:
        converted: Optional[nn.Module] = None
        if family.example_inputs:
            converted, res.without_example_inputs, res.convert_s = convert_without_example_inputs(
                original, inputs, args.dataset_size
            )
        if converted is None:
            options: Dict[str, Any] = {"dataset_size": args.dataset_size}
            if family.example_inputs:
                res.inputs, options["example_inputs"] = "given", inputs
            t0 = time.perf_counter()
            converted = cd_convert.convert(original, **options)
            res.convert_s = time.perf_counter() - t0
        report = cd_convert.report(converted)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - a cd_convert failure: the point of the benchmark
        res.result, res.reason = "convert failed", error_text(err)
        res.errors.append("convert: " + "".join(traceback.format_exception_only(type(err), err)).strip())
        return
    res.report_notes = list(report.notes)
    sites = report.sites
    res.sites_by_kind = dict(sorted(Counter(r.kind for r in sites).items()))
    res.weight_terms = sum(1 for r in sites if r.consumer)
    res.rate_read = sum(1 for r in report.rows if r.status == "rate read")
    res.other_rows = dict(
        sorted(Counter(r.status for r in report.rows if r not in sites and r.status != "rate read").items())
    )

    # The eval checks first: a training forward updates BatchNorm statistics, after which eval outputs differ
    # for a reason that has nothing to do with the conversion.
    _check_eval(converted, inputs, reference, res, "eval equal")
    try:
        frozen = cd_convert.freeze(converted)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.fail("freeze equal", "freeze raised", error_text(err))
    else:
        _check_eval(frozen, inputs, reference, res, "freeze equal")
    unused = [r.name for r in report.rows if r.status == "output unused"]
    _check_training(converted, inputs, res, unused)


class DropoutCalls(TorchFunctionMode):
    """Records every functional dropout call that drops (p > 0, training) with the module whose method made it
    (the innermost ``self`` on the Python stack that is a module) and its output, to ask autograd later whether
    the output reaches the loss. ``nn.Dropout`` modules call ``F.dropout``: their calls are recorded with the
    dropout module itself."""

    def __init__(self, names: Dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.calls: List[Tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _DROPOUT_FUNCTIONS and isinstance(result, torch.Tensor):
            bound = _DROPOUT_FUNCTIONS[func].bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments["p"] > 0 and bound.arguments["training"]:
                self.calls.append((self._caller(), result))
        return result

    def _caller(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in self.names:
                return self.names[id(owner)]
            frame = frame.f_back
        return "<no module>"


#: The functional dropouts :class:`DropoutCalls` records, with their signatures.
_DROPOUT_FUNCTIONS = {
    f: inspect.signature(f)
    for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
}


def _unused_output_dropout(
    calls: List[Tuple[str, torch.Tensor]], loss: torch.Tensor, unused: Sequence[str], fixed: int
) -> Optional[str]:
    """Whether the fixed-rate dropout left in a training forward is exactly the dropout cd_convert reported as
    ``output unused``, checked by autograd: a description when it is, else None.

    Args:
        calls: the functional dropout calls that dropped (:class:`DropoutCalls`).
        loss: the data loss of the forward (its graph is kept).
        unused: the names of the report's ``output unused`` rows (a module's name, or a call's site name under
            its owner).
        fixed: how many fixed-rate dropout ops the aten-level detector counted.

    Returns:
        ``"K left, output unused: no gradient"`` when every fixed-rate op is one of ``calls``, made by a module or
        owner named in ``unused``, and the data loss has no gradient with respect to any of their outputs.
    """
    if not unused or len(calls) != fixed:
        return None
    owners = set(unused) | {name.rpartition(".")[0] for name in unused}
    if any(name not in owners for name, _ in calls):
        return None
    outputs = [t for _, t in calls if t.requires_grad]
    grads = torch.autograd.grad(loss, outputs, allow_unused=True, retain_graph=True) if outputs else []
    if any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        return None
    return f"{fixed} left, output unused: no gradient"


def _check_training(converted: nn.Module, inputs: Dict[str, Any], res: FamilyResult, unused: Sequence[str]) -> None:
    """Checks (a) and (b): one training forward under the detector, backward of the data loss alone.

    Fixed-rate dropout left in the forward passes check (a) only where the report says its output is unused and
    autograd confirms that the loss does not depend on it.
    """
    converted.train()
    converted.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    names = {id(m): n for n, m in converted.named_modules()}
    try:
        with FixedDropoutDetector() as detector, DropoutCalls(names) as calls:
            output = converted(**inputs)
        loss = data_loss(output)
        explained = _unused_output_dropout(calls.calls, loss, unused, len(detector.calls)) if detector.calls else None
        loss.backward()
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.fail("no fixed dropout", "forward raised", error_text(err))
        res.fail("grads", "forward raised", error_text(err))
        return
    if explained is not None:
        res.checks["no fixed dropout"] = Check(True, f"yes (was {res.original_fixed_dropout}; {explained})")
    elif detector.calls:
        res.fail(
            "no fixed dropout",
            f"NO: {len(detector.calls)} left",
            f"{len(detector.calls)} fixed-rate dropout op(s) in training, e.g. " + "; ".join(detector.calls[:3]),
        )
    elif not res.original_fixed_dropout:
        res.checks["no fixed dropout"] = Check(True, "n/a: none in original")
    else:
        res.checks["no fixed dropout"] = Check(True, f"yes (was {res.original_fixed_dropout})")

    logits = [(n, p) for n, p in converted.named_parameters() if n.endswith("p_logit")]
    silent = [
        n
        for n, p in logits
        if p.grad is None or not bool(torch.isfinite(p.grad).all()) or not bool(p.grad.abs().sum() > 0)
    ]
    if not logits and not res.original_fixed_dropout:
        res.checks["grads"] = Check(True, "n/a: no site")
    elif not logits:
        res.fail("grads", "no p_logit", "the converted model has no p_logit parameter")
    elif silent:
        res.fail(
            "grads",
            f"NO: {len(silent)}/{len(logits)}",
            f"{len(silent)}/{len(logits)} p_logit without a nonzero finite gradient: " + ", ".join(silent[:4]),
        )
    else:
        res.checks["grads"] = Check(True, f"yes ({len(logits)})")


def _check_eval(
    model: nn.Module, inputs: Dict[str, Any], reference: List[torch.Tensor], res: FamilyResult, check: str
) -> None:
    """Checks (c) and (d): eval output tensor by tensor ``torch.equal`` to the unconverted model's."""
    try:
        output = eval_outputs(model, inputs)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.fail(check, "forward raised", error_text(err))
        return
    ok, text = compare_outputs(reference, output)
    if ok:
        res.checks[check] = Check(True, text)
    else:
        res.fail(check, "NO", text)


# ----------------------------------------------------------------------------------------- coverage output


def _counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def print_coverage(results: List[FamilyResult]) -> None:
    """The markdown table, the error texts and notes, and the summary line."""
    header = (
        "family",
        "inputs",
        "sites by kind",
        "rate read",
        "weight terms",
        "left fused/other",
        *CHECKS,
        "convert s",
        "result",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        inputs = r.inputs
        if r.result in ("not built", "convert failed"):
            cells = [inputs, r.result] + ["-"] * (len(header) - 4)
        else:
            n_sites = sum(r.sites_by_kind.values())
            cells = [
                inputs,
                f"{n_sites}: {_counts(r.sites_by_kind)}" if n_sites else "0",
                str(r.rate_read),
                f"{r.weight_terms}/{n_sites}",
                _counts(r.other_rows),
            ]
            cells += [r.checks[c].text if c in r.checks else "-" for c in CHECKS]
            cells.append(f"{r.convert_s:.2f}" if r.convert_s is not None else "-")
        print("| " + " | ".join([r.name, *cells, r.result]) + " |")
    print()
    for r in results:
        if r.result == "not built":
            print(f"- {r.name}: not built: {r.reason}")
        for error in r.errors:
            print(f"- {r.name}: {error}")
        if r.result not in ("pass", "no dropout"):
            if r.note:
                print(f"  - family note: {r.note}")
            for note in r.report_notes:
                print(f"  - report note: {note}")
    given = [r for r in results if r.inputs == "given"]
    if given:
        print("\nExample inputs given to convert, because without them:")
        for r in given:
            print(f"- {r.name}: {r.without_example_inputs}")
    no_dropout = [r.name for r in results if r.result == "no dropout"]
    if no_dropout:
        print(
            f"\nNo dropout in training (the unconverted model draws no mask; checks (a) and (b) n/a): "
            f"{', '.join(no_dropout)}"
        )
    passed = sum(r.result == "pass" for r in results)
    passed_given = sum(r.result == "pass" and r.inputs == "given" for r in results)
    by_result = Counter(r.result for r in results)
    print(
        f"\n{passed} / {len(results)} families pass ({passed_given} of them with example inputs given; "
        f"{', '.join(f'{k} {v}' for k, v in sorted(by_result.items()))})"
    )


# ------------------------------------------------------------------------------------------------- memory


MEMORY_VARIANTS = ("unconverted", "converted", "fused_attention=False")
MEMORY_HEADS = 12
MEMORY_VOCAB = 1024


def memory_models(shape: str, layers: int, dataset_size: int) -> Tuple[Dict[str, nn.Module], str]:
    """The three models of one shape with the same weights, in training mode, and a description of them.

    Args:
        shape: ``"bert"`` (a BERT-base-shaped classifier) or ``"llama"`` (a Llama-shaped causal LM).
        layers: their number of layers.
        dataset_size: passed to :func:`cd_convert.convert`.

    Returns:
        The models by :data:`MEMORY_VARIANTS` name, and the description printed above their table.
    """
    import transformers

    # Hidden 768 and 12 heads as in BERT-base; the vocabulary is kept small so that the body dominates.
    fields = dict(vocab_size=MEMORY_VOCAB, max_position_embeddings=512)
    if shape == "bert":
        model_cls: type = transformers.BertForSequenceClassification
        config = transformers.BertConfig(**_body(768, layers, MEMORY_HEADS, 3072, num_labels=LABELS, **fields))
        rates = f"dropout {config.hidden_dropout_prob:g}, attention dropout {config.attention_probs_dropout_prob:g}"
    else:
        model_cls = transformers.LlamaForCausalLM
        config = transformers.LlamaConfig(
            **_body(768, layers, MEMORY_HEADS, 2048, num_key_value_heads=MEMORY_HEADS, **fields)
        )
        rates = f"attention dropout {config.attention_dropout:g} (config default)"
    base = instantiate(model_cls, config)
    text = f"{model_cls.__name__}, hidden 768, 12 heads, {layers} layers, vocab 1024, {rates}"
    models = {
        "unconverted": base,
        "converted": cd_convert.convert(base, dataset_size=dataset_size),
        "fused_attention=False": cd_convert.convert(base, dataset_size=dataset_size, fused_attention=False),
    }
    for model in models.values():
        model.train()
    return models, text


def memory_step(model: nn.Module, inputs: Dict[str, Any], converted: bool) -> Callable[[], None]:
    """One training forward + backward (data loss, plus the regulariser for a converted model)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = data_loss(model(**inputs))
        if converted:
            loss = loss + cd_convert.regularization(model)
        loss.backward()

    return step


def saved_bytes(model: nn.Module, inputs: Dict[str, Any], converted: bool) -> int:
    """Saved-for-backward bytes of one training forward (parameters excluded), then backward to free them."""
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(exclude=list(model.parameters())) as counter:
        loss = data_loss(model(**inputs))
        if converted:
            loss = loss + cd_convert.regularization(model)
    total = counter.total()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def interleaved_times(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each step, one warm-up call each, then ``repeats`` samples in a rotating order."""
    for step in steps.values():
        step()
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def memory_section(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Saved bytes and time of one training step for each shape, length and variant; printed as it goes."""
    print(f"\n## What explicit attention costs: batch {args.memory_batch}, one training forward + backward\n")
    print(
        "Saved = bytes autograd keeps for backward (saved_tensors_hooks, unique storages, parameters excluded); "
        f"time = median of {args.repeats} interleaved samples; x = ratio to the unconverted model.\n"
    )
    results = []
    for shape in ("bert", "llama"):
        models, text = memory_models(shape, args.memory_layers, args.dataset_size)
        sites = {name: len(cd_convert.report(m).sites) if name != "unconverted" else 0 for name, m in models.items()}
        print(f"### {text}\n")
        print("| seq | model | sites | saved MiB | saved x | step ms | time x |")
        print("|---|---|---|---|---|---|---|")
        for seq in args.seq_lens:
            generator = torch.Generator().manual_seed(4)
            ids = torch.randint(3, MEMORY_VOCAB, (args.memory_batch, seq), generator=generator)
            inputs: Dict[str, Any] = {"input_ids": ids}
            if shape == "llama":
                inputs["use_cache"] = False
            saved = {name: saved_bytes(m, inputs, name != "unconverted") for name, m in models.items()}
            steps = {name: memory_step(m, inputs, name != "unconverted") for name, m in models.items()}
            times = interleaved_times(steps, args.repeats)
            median = {name: statistics.median(ts) for name, ts in times.items()}
            for name in MEMORY_VARIANTS:
                print(
                    f"| {seq} | {name} | {sites[name]} | {saved[name] / MIB:.1f} | "
                    f"{saved[name] / saved['unconverted']:.2f} | {median[name] * 1e3:.0f} | "
                    f"{median[name] / median['unconverted']:.2f} |"
                )
            results.append(
                {
                    "shape": shape,
                    "model": text,
                    "seq": seq,
                    "batch": args.memory_batch,
                    "layers": args.memory_layers,
                    "sites": sites,
                    "saved_bytes": saved,
                    "times_s": times,
                    "median_s": median,
                    "attention_matrix_bytes_per_layer": args.memory_batch * MEMORY_HEADS * seq * seq * 4,
                }
            )
        print()
        per_layer = ", ".join(
            f"seq {s}: {args.memory_batch * MEMORY_HEADS * s * s * 4 / MIB:.0f} MiB" for s in args.seq_lens
        )
        print(f"(one fp32 batch x heads x L x L attention tensor per layer: {per_layer})\n")
    return results


# --------------------------------------------------------------------------------------------------- main


def _count_kernel_calls() -> List[int]:
    """Send attention sites through the fused kernel on the CPU (Triton's interpreter) and count its calls.

    Returns:
        A list that grows by one per kernel call for the rest of the process.
    """
    from cd_convert import fused_attention

    fused_attention.INTERPRET_ON_CPU = True
    calls: List[int] = []
    apply = fused_attention._FusedConcreteAttention.apply

    def counting(*args: Any) -> torch.Tensor:
        calls.append(1)
        return apply(*args)

    fused_attention._FusedConcreteAttention.apply = counting
    return calls


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    names = [f.name for f in FAMILIES]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=None, help=f"comma-separated families (default all): {','.join(names)}")
    parser.add_argument("--json", default=None, help="write every record to this JSON file")
    parser.add_argument("--memory", action="store_true", help="also measure what explicit attention costs")
    parser.add_argument("--memory-layers", type=int, default=2, help="layers of the --memory models (default 2)")
    parser.add_argument("--memory-batch", type=int, default=4, help="batch of the --memory steps (default 4)")
    parser.add_argument("--seq-lens", default="256,512", help="sequence lengths of --memory (default 256,512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per --memory variant (default 3)")
    parser.add_argument("--dataset-size", type=int, default=1000, help="dataset_size passed to convert")
    parser.add_argument("--timeout", type=float, default=60.0, help="wall-clock guard per family in s (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--kernel-interpreted",
        action="store_true",
        help="train attention sites through the fused attention kernel, as on a GPU, run on the CPU by Triton's "
        "interpreter (needs TRITON_INTERPRET=1 in the environment; slow)",
    )
    args = parser.parse_args(argv)
    if args.kernel_interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--kernel-interpreted needs TRITON_INTERPRET=1 set before the run starts")
    if args.families:
        wanted = [n.strip() for n in args.families.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown families {unknown}; known: {', '.join(names)}")
        args.families = wanted
    else:
        args.families = names
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    env = environment(args.threads, "transformers")
    print(
        f"cd_convert transformers coverage: transformers {env['transformers']}, torch {env['torch']}, "
        f"{args.threads} thread(s), dataset_size {args.dataset_size}\n"
    )
    kernel_calls = _count_kernel_calls() if args.kernel_interpreted else None
    wall = time.perf_counter()
    by_name = {f.name: f for f in FAMILIES}
    results = []
    for name in args.families:
        res = run_family(by_name[name], args)
        results.append(res)
        print(f"  {name:12s} {res.result:14s} {res.seconds:6.2f} s", file=sys.stderr, flush=True)
    print_coverage(results)
    coverage_s = time.perf_counter() - wall
    print(f"coverage wall time {coverage_s:.0f} s")
    record: Dict[str, Any] = {"environment": env, "families": [asdict(r) for r in results], "coverage_s": coverage_s}
    if kernel_calls is not None:
        record["attention_kernel_calls"] = len(kernel_calls)
        print(f"attention calls through the fused kernel (interpreted): {len(kernel_calls)}")
    if args.memory:
        record["memory"] = memory_section(args)
    record["wall_s"] = time.perf_counter() - wall
    print(f"total wall time {record['wall_s']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
