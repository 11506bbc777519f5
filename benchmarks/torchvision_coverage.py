"""Coverage of cd_convert over the whole torchvision model registry.

    python -m benchmarks.torchvision_coverage [--models alexnet,vit_b_16] [--json PATH] [--no-variants]

Every name of ``torchvision.models.list_models()`` (classification, quantization, segmentation, detection,
video, optical flow) is built with ``weights=None`` (and ``weights_backbone=None`` where the builder takes
it), a small ``num_classes`` where accepted, random weights from seed 0, and run on a small input it
accepts: 2 images at 64 px for most classifiers (299 px for Inception v3, whose auxiliary head needs it;
224 px for MaxViT, whose partitions need it; ViTs built with ``image_size=64``, 56 for ViT-H/14); 2
images of about 100 px for detection (the builders' transforms resize them: ``min_size=max_size=128``
where the builder takes it, SSD300/SSDlite320 use their fixed 300/320; fewer proposals and at most 10
detections per image, so that the mask and keypoint heads stay cheap), with one or two boxes per image (and
masks or keypoints for Mask/Keypoint R-CNN); ``(2, 3, 4, 64, 64)`` clips for the video ResNets and Swin3D,
``(1, 3, 16, 224, 224)`` for S3D and MViT (their pooling / position embeddings fix that size: the heaviest
rows); two ``(2, 3, 128, 128)`` frames for RAFT (its correlation pyramid needs 128). Linear and conv
weights that torchvision initialises to all zeros (ViT's head) are redrawn (normal, std 0.02) so that
gradients reach what lies behind them; the row says so.

Then, for each model:

* (a) **convert** with the default targets (every dropout site) and ``example_inputs`` (detection: images
  and targets, because the dry run runs in training mode, where these models need targets): the sites by
  kind from :func:`cd_convert.report` and the other report rows by status. "No sites" is a valid result
  for a model without dropout: the row shows the ``nn.Dropout*`` modules with p > 0 (and with p = 0), and
  the fixed-rate dropout ops one training forward of the *unconverted* model draws (aten ``bernoulli`` /
  ``native_dropout`` / ... with p > 0, counted by a ``TorchDispatchMode``; torchvision's ``StochasticDepth``
  is stochastic depth, not dropout, and is counted apart);
* (b) **eval equal**: every output tensor of the converted model in eval ``torch.equal`` to the
  unconverted model's (``convert`` returns a deep copy with the same weights);
* (d) **freeze equal**: :func:`cd_convert.freeze` of the converted model, in eval, equal to the unconverted
  model (and no cd_convert module left in it);
* (c) **train**: one training step: forward in train mode (under the dispatch mode: **no fixed dropout**
  is the check that no fixed-rate dropout op is left outside stochastic depth), a scalar data loss from the
  outputs (cross-entropy over every logits output, auxiliary heads included; per-pixel cross-entropy for
  segmentation; the loss dict's sum for detection; L1 to a random flow for RAFT), backward, then
  ``regularization(model)`` (finite) and its backward, an SGD step. **grads**: every ``p_logit`` has a
  finite gradient and the data loss alone gives it a nonzero one (a site inside a block whose stochastic
  depth dropped every row of the batch in that step gets none: such sites are named in a note, not failed);
* **mc**: for classification and video, ``mc_predict(model, x, samples=2)`` gives finite probabilities;
* (d) **unconvert**: :func:`cd_convert.unconvert` of the trained model restores the original
  ``state_dict`` keys in order, no cd_convert module is left, and with the original's state dict loaded
  (strict) its eval output equals the original's;
* (e) **Linear targets**: ``convert(targets=[nn.Linear])`` (with ``example_inputs``), eval equal, one
  training step with the grads check; "n/a" for models without an ``nn.Linear``. For a few models the same
  with ``[nn.Conv2d]`` (``[nn.Conv3d]`` for one video model).

Variants (unless ``--no-variants``): the smallest model of each family whose builder takes a dropout rate
that defaults to 0 (``dropout``/``attention_dropout``, ``mlp_dropout``, DenseNet's ``drop_rate``), built
again with those rates at 0.1, so that attention dropout, functional dropout and in-place dropout are really
exercised; and every quantization model also with ``quantize=True`` (quantized kernels have no autograd:
only convert, eval and freeze are checked there).

Every exception is caught per model and recorded (type, message, the last traceback frames inside
cd_convert). A row is ``pass`` when every check that applies passes, ``FAIL`` otherwise, ``not built``
when torchvision cannot build or run the unconverted model on the input, ``timeout`` past ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cd_convert
from benchmarks.common import Timeout, environment, guard
from benchmarks.dropout_detector import fixed_dropout
from benchmarks.transformers_families import output_tensors

DATASET_SIZE = 1000
NUM_CLASSES = 10
DET_CLASSES = 3
SEG_CLASSES = 3
VARIANT_RATE = 0.1

#: Models whose conv layers are also targeted (check (e) with ``[nn.Conv2d]``, or the type given).
CONV_TARGETS: Dict[str, type] = {
    "alexnet": nn.Conv2d,
    "resnet18": nn.Conv2d,
    "mobilenet_v3_small": nn.Conv2d,
    "squeezenet1_1": nn.Conv2d,
    "densenet121": nn.Conv2d,
    "shufflenet_v2_x0_5": nn.Conv2d,
    "convnext_tiny": nn.Conv2d,
    "efficientnet_b0": nn.Conv2d,
    "lraspp_mobilenet_v3_large": nn.Conv2d,
    "fasterrcnn_mobilenet_v3_large_320_fpn": nn.Conv2d,
    "raft_small": nn.Conv2d,
    "r3d_18": nn.Conv3d,
}

#: Builders whose dropout rates default to 0: the variant sets these keyword arguments to VARIANT_RATE.
DROPOUT_VARIANTS: Dict[str, Tuple[str, ...]] = {
    "vit_b_32": ("dropout", "attention_dropout"),
    "swin_t": ("dropout", "attention_dropout"),
    "swin_v2_t": ("dropout", "attention_dropout"),
    "maxvit_t": ("mlp_dropout", "attention_dropout"),
    "densenet121": ("drop_rate",),
    "swin3d_t": ("dropout", "attention_dropout"),
    "mvit_v1_b": ("dropout", "attention_dropout"),
    "mvit_v2_s": ("dropout", "attention_dropout"),
}

CHECKS = (
    "convert",
    "eval equal",
    "freeze equal",
    "train",
    "grads",
    "no fixed dropout",
    "mc",
    "unconvert",
    "Linear targets",
    "Conv targets",
)

# ------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One model to run: the registry name, its task, the builder's keyword arguments, a variant label."""

    name: str
    task: str
    kwargs: Dict[str, Any]
    variant: str = ""

    @property
    def label(self) -> str:
        """The row's name: the registry name, with the variant in brackets."""
        return f"{self.name} [{self.variant}]" if self.variant else self.name

    @property
    def trainable(self) -> bool:
        """Whether the model can be trained (quantized kernels have no autograd)."""
        return not self.kwargs.get("quantize", False)


def task_of(name: str) -> str:
    """The registry module a model's builder lives in: classification, quantization, segmentation, ..."""
    import torchvision.models as tvm

    for task, module in (
        ("quantization", tvm.quantization),
        ("segmentation", tvm.segmentation),
        ("detection", tvm.detection),
        ("video", tvm.video),
        ("optical_flow", tvm.optical_flow),
    ):
        if name in tvm.list_models(module=module):
            return task
    return "classification"


def base_kwargs(name: str, task: str) -> Dict[str, Any]:
    """The builder's keyword arguments: no weights anywhere, few classes, small sizes where they are arguments.

    Args:
        name: the registry name.
        task: its task (see :func:`task_of`).

    Returns:
        Keyword arguments for ``torchvision.models.get_model(name, **kwargs)``.
    """
    kwargs: Dict[str, Any] = {"weights": None}
    if task in ("classification", "quantization", "video"):
        kwargs["num_classes"] = NUM_CLASSES
    if task == "quantization":
        kwargs["quantize"] = False
    if task == "segmentation":
        kwargs.update(num_classes=SEG_CLASSES, weights_backbone=None)
    if task == "detection":
        kwargs.update(num_classes=2 if name.startswith("keypointrcnn") else DET_CLASSES, weights_backbone=None)
        if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
            # Fewer proposals and detections: the mask / keypoint heads run on each of them.
            kwargs.update(
                min_size=128,
                max_size=128,
                rpn_pre_nms_top_n_train=200,
                rpn_post_nms_top_n_train=100,
                rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50,
                box_batch_size_per_image=64,
                box_detections_per_img=10,
            )
        elif name.startswith(("retinanet", "fcos")):
            kwargs.update(min_size=128, max_size=128, topk_candidates=100, detections_per_img=10)
        else:  # SSD300 / SSDlite320: their transform's size is fixed
            kwargs.update(topk_candidates=100, detections_per_img=10)
    if name.startswith("vit_"):
        kwargs["image_size"] = 56 if name == "vit_h_14" else 64
    return kwargs


def all_cases(variants: bool = True) -> List[Case]:
    """Every registry model, then the variants (dropout rates set, ``quantize=True``).

    Args:
        variants: include the variants.

    Returns:
        The cases, in registry order, variants last.
    """
    import torchvision.models as tvm

    cases = []
    for name in tvm.list_models():
        task = task_of(name)
        cases.append(Case(name, task, base_kwargs(name, task)))
    if variants:
        for name, rates in DROPOUT_VARIANTS.items():
            task = task_of(name)
            kwargs = dict(base_kwargs(name, task), **{r: VARIANT_RATE for r in rates})
            cases.append(Case(name, task, kwargs, "+".join(rates) + f"={VARIANT_RATE:g}"))
        for name in tvm.list_models(module=tvm.quantization):
            kwargs = dict(base_kwargs(name, "quantization"), quantize=True)
            cases.append(Case(name, "quantization", kwargs, "quantize=True"))
    return cases


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    """A model's inputs: eval and training positional arguments, the loss's fixed random targets, a text."""

    eval_args: Tuple[Any, ...]
    train_args: Tuple[Any, ...]
    loss_targets: Dict[str, Any]
    text: str


def image_size(name: str) -> int:
    """The side of the classification images a model gets (see the module docstring)."""
    if "inception" in name:
        return 299
    if name.startswith("maxvit"):
        return 224
    if name.startswith("vit_h"):
        return 56
    return 64


def detection_targets(name: str, sizes: Sequence[Tuple[int, int]], generator: torch.Generator) -> List[Dict[str, Any]]:
    """Realistic small targets: two boxes on the first image, one on the second; masks / keypoints as needed.

    Args:
        name: the detection model (Mask R-CNN gets masks, Keypoint R-CNN keypoints).
        sizes: each image's (H, W).
        generator: the random source of the keypoints.

    Returns:
        One target dict per image.
    """
    boxes_per_image = [
        [[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 110.0, 90.0]],
        [[20.0, 20.0, 90.0, 80.0]],
    ]
    targets = []
    for (h, w), boxes in zip(sizes, boxes_per_image):
        b = torch.tensor(boxes)
        target: Dict[str, Any] = {"boxes": b, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        if name.startswith("maskrcnn"):
            masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(b.long().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            target["masks"] = masks
        if name.startswith("keypointrcnn"):
            k = 17
            xs = b[:, None, 0] + torch.rand(len(boxes), k, generator=generator) * (b[:, None, 2] - b[:, None, 0])
            ys = b[:, None, 1] + torch.rand(len(boxes), k, generator=generator) * (b[:, None, 3] - b[:, None, 1])
            target["keypoints"] = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)
        targets.append(target)
    return targets


def make_inputs(case: Case) -> Inputs:
    """The (seeded) inputs of one case; see the module docstring for the sizes.

    Args:
        case: the case.

    Returns:
        Its :class:`Inputs`.
    """
    g = torch.Generator().manual_seed(1)
    name, task = case.name, case.task
    if task in ("classification", "quantization"):
        s = image_size(name)
        x = torch.randn(2, 3, s, s, generator=g)
        y = torch.randint(0, NUM_CLASSES, (2,), generator=g)
        return Inputs((x,), (x,), {"labels": y}, f"(2, 3, {s}, {s})")
    if task == "segmentation":
        x = torch.randn(2, 3, 64, 64, generator=g)
        y = torch.randint(0, SEG_CLASSES, (2, 64, 64), generator=g)
        return Inputs((x,), (x,), {"labels": y}, "(2, 3, 64, 64)")
    if task == "video":
        shape = (1, 3, 16, 224, 224) if name.startswith(("s3d", "mvit")) else (2, 3, 4, 64, 64)
        x = torch.randn(*shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=g)
        return Inputs((x,), (x,), {"labels": y}, str(shape))
    if task == "detection":
        sizes = [(96, 128), (112, 96)]
        images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
        targets = detection_targets(name, sizes, g)
        return Inputs((images,), (images, targets), {}, "2 images 3x96x128, 3x112x96")
    if task == "optical_flow":
        # RAFT's correlation pyramid needs feature maps of at least 16 (images of 128).
        a, b = torch.randn(2, 3, 128, 128, generator=g), torch.randn(2, 3, 128, 128, generator=g)
        flow = torch.randn(2, 2, 128, 128, generator=g)
        return Inputs((a, b), (a, b), {"flow": flow}, "2 x (2, 3, 128, 128)")
    raise ValueError(f"unknown task {task!r}")


# -------------------------------------------------------------------------------------------------- losses


def data_loss(case: Case, output: Any, inputs: Inputs) -> torch.Tensor:
    """The scalar data loss of a training-mode output.

    Args:
        case: the case (its task picks the loss).
        output: the model's training-mode output.
        inputs: the case's inputs (with the loss's targets).

    Returns:
        Cross-entropy summed over every logits output (classification, video: auxiliary heads too;
        segmentation: per pixel, ``out`` and ``aux``), the sum of a detection model's loss dict, or the
        mean L1 distance of every RAFT flow prediction to a random flow.
    """
    if case.task == "detection":
        return sum(output.values())
    tensors = [t for t in output_tensors(output) if t.is_floating_point()]
    if case.task == "optical_flow":
        return sum((t - inputs.loss_targets["flow"]).abs().mean() for t in tensors)
    return sum(F.cross_entropy(t, inputs.loss_targets["labels"]) for t in tensors)


# ------------------------------------------------------------------------------------- fixed-rate dropout


class DropoutCounter(TorchDispatchMode):
    """Lists the fixed-rate dropout ops run inside it; those inside torchvision's StochasticDepth apart.

    Args:
        model: the model whose ``StochasticDepth`` modules are hooked while the mode is entered.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: List[str] = []
        self.stochastic_depth: List[str] = []
        #: StochasticDepth modules that zeroed their whole (nonzero) input at least once: every row dropped.
        self.all_dropped: List[str] = []
        self._names: Dict[nn.Module, str] = {}
        self._depth = 0
        self._handles: List[Any] = []

    def __enter__(self) -> "DropoutCounter":
        from torchvision.ops import StochasticDepth

        for name, module in self.model.named_modules():
            if isinstance(module, StochasticDepth):
                self._names[module] = name
                self._handles.append(module.register_forward_pre_hook(self._enter_sd))
                self._handles.append(module.register_forward_hook(self._leave_sd))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().__exit__(*exc)

    def _enter_sd(self, module: nn.Module, args: Any) -> None:
        self._depth += 1

    def _leave_sd(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        x = args[0] if args else None
        if (
            isinstance(output, torch.Tensor)
            and isinstance(x, torch.Tensor)
            and bool(x.detach().any())
            and not bool(output.detach().any())
            and self._names[module] not in self.all_dropped
        ):
            self.all_dropped.append(self._names[module])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        found = fixed_dropout(func, args, kwargs)
        if found is not None:
            (self.stochastic_depth if self._depth else self.calls).append(found)
        return func(*args, **kwargs)


def dropout_modules(model: nn.Module) -> Tuple[int, int]:
    """The ``nn.Dropout*`` modules (``nn.modules.dropout._DropoutNd``) of a model: (with p > 0, with p = 0)."""
    mods = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    return sum(1 for m in mods if m.p > 0), sum(1 for m in mods if m.p == 0)


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Check:
    """One check's outcome: passed (True), failed (False) or not applicable (None), and its table text."""

    ok: Optional[bool]
    text: str


@dataclass
class ModelResult:
    """Everything measured for one case (one JSON record, one table row)."""

    name: str
    task: str
    variant: str = ""
    input: str = ""
    result: str = ""  # pass / FAIL / not built / timeout
    reason: str = ""
    params_m: float = 0.0
    reinitialised: List[str] = field(default_factory=list)
    dropout_modules_p: int = 0
    dropout_modules_p0: int = 0
    original_dropout_ops: Optional[int] = None
    original_dropout_examples: List[str] = field(default_factory=list)
    stochastic_depth_ops: Optional[int] = None
    sites_by_kind: Dict[str, int] = field(default_factory=dict)
    other_rows: Dict[str, int] = field(default_factory=dict)
    report_method: str = ""
    report_notes: List[str] = field(default_factory=list)
    sites: List[Dict[str, Any]] = field(default_factory=list)
    linear_sites: Optional[int] = None
    linear_other_rows: Dict[str, int] = field(default_factory=dict)
    conv_sites: Optional[int] = None
    conv_other_rows: Dict[str, int] = field(default_factory=dict)
    convert_s: Optional[float] = None
    checks: Dict[str, Check] = field(default_factory=dict)
    errors: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def set(self, check: str, ok: Optional[bool], text: str) -> None:
        """Record a check's outcome (a later failure of the same check is kept over a pass)."""
        if check in self.checks and self.checks[check].ok is False and ok is not False:
            return
        self.checks[check] = Check(ok, text)

    def error(self, check: str, err: BaseException) -> None:
        """Record a check that raised: the table text, and the error with its traceback frames."""
        self.set(check, False, f"raised {type(err).__name__}")
        self.errors.append(error_record(check, err))

    def fail(self, check: str, text: str, detail: str) -> None:
        """Record a failed check with its short text and the full detail."""
        self.set(check, False, text)
        self.errors.append({"check": check, "type": "check failed", "message": detail, "frames": []})


def error_record(check: str, err: BaseException) -> Dict[str, Any]:
    """An exception as data: type, one-line message, the last cd_convert frames and the raising frame.

    Args:
        check: the check it was raised in.
        err: the exception.

    Returns:
        ``{"check", "type", "message", "frames", "last_frame"}``; ``frames`` are the last four frames inside
        cd_convert as ``file:line in function: code``.
    """
    tb = traceback.extract_tb(err.__traceback__)

    def fmt(fr: traceback.FrameSummary) -> str:
        path = fr.filename
        for root in ("cd_convert", "torchvision", "torch"):
            marker = f"/{root}/"
            if marker in path:
                path = root + "/" + path.rsplit(marker, 1)[1]
                break
        return f"{path}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"

    ours = [fmt(fr) for fr in tb if "/cd_convert/" in fr.filename]
    return {
        "check": check,
        "type": type(err).__name__,
        "message": " ".join(str(err).split())[:800],
        "frames": ours[-4:],
        "last_frame": fmt(tb[-1]) if tb else "",
    }


# ------------------------------------------------------------------------------------------------- helpers


def build(case: Case) -> Tuple[nn.Module, List[str]]:
    """The case's model with random weights from seed 0, in eval mode, and the zero weights redrawn.

    Args:
        case: the case.

    Returns:
        The model and the names of the Linear/conv layers whose all-zero weight was redrawn.
    """
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model(case.name, **case.kwargs)
    redrawn = []
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
                and isinstance(weight, torch.Tensor)
                and weight.is_floating_point()
                and not bool(weight.any())
            ):
                weight.normal_(0.0, 0.02)
                redrawn.append(name)
    return model.eval(), redrawn


def run_model(model: nn.Module, args: Tuple[Any, ...]) -> Any:
    """``model(*args)``."""
    return model(*args)


def compare(reference: List[torch.Tensor], output: List[torch.Tensor]) -> Tuple[bool, str]:
    """Whether two output lists are ``torch.equal`` tensor by tensor; the table text and, if not, how far."""
    if len(reference) != len(output):
        return False, f"{len(output)} tensors, original {len(reference)}"
    differ = [(a, b) for a, b in zip(reference, output) if not torch.equal(a, b)]
    if not differ:
        return True, f"yes ({len(output)})"
    diffs = [
        float((a.double() - b.double()).abs().max()) if a.shape == b.shape and a.numel() else float("nan")
        for a, b in differ
    ]
    return False, f"NO: {len(differ)}/{len(output)} differ, max {max(diffs):.3g}"


def eval_outputs(model: nn.Module, args: Tuple[Any, ...]) -> List[torch.Tensor]:
    """Every output tensor of one eval-mode, no-grad forward."""
    model.eval()
    with torch.no_grad():
        return [t.detach() for t in output_tensors(run_model(model, args))]


def has_cd_modules(model: nn.Module) -> int:
    """How many cd_convert site modules are left in a model."""
    return sum(1 for m in model.modules() if isinstance(m, cd_convert.ConcreteDropoutBase))


def p_logits(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The ``p_logit`` parameters of a converted model, by name."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith("p_logit")]


def example_inputs(case: Case, inputs: Inputs) -> Tuple[Any, ...]:
    """The ``example_inputs`` passed to ``convert``: the training inputs (detection: images and targets)."""
    return inputs.train_args


def train_step(
    case: Case, model: nn.Module, inputs: Inputs, res: ModelResult, train_check: str, grads_check: str
) -> Optional[List[str]]:
    """One training step of a converted model and the grads check; returns the fixed-rate ops it drew.

    Args:
        case: the case.
        model: the converted model (trained in place).
        inputs: the case's inputs.
        res: where the checks are recorded.
        train_check: the name the step's outcome is recorded under.
        grads_check: the name the gradient check is recorded under.

    Returns:
        The fixed-rate dropout ops of the training forward outside stochastic depth, or None when the step
        raised.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    torch.manual_seed(3)
    try:
        with DropoutCounter(model) as counter:
            output = run_model(model, inputs.train_args)
        loss = data_loss(case, output, inputs)
        loss.backward()
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error(train_check, err)
        res.set(grads_check, False, "no step")
        return None
    logits = p_logits(model)
    data_grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in logits}
    try:
        reg = cd_convert.regularization(model)
        if reg.requires_grad:  # a model without sites: a constant 0
            reg.backward()
        opt.step()
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error(train_check, err)
        res.set(grads_check, False, "no step")
        return counter.calls
    if not bool(torch.isfinite(loss)) or not bool(torch.isfinite(reg)):
        res.fail(train_check, "non-finite", f"data loss {float(loss):.4g}, regularisation {float(reg):.4g}")
    else:
        res.set(train_check, True, f"ok (reg {float(reg):.3g})")
    if not logits:
        res.set(grads_check, None, "no p_logit")
        return counter.calls
    bad_total = [n for n, p in logits if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    no_data = [n for n, g in data_grads.items() if g is None or not bool(torch.isfinite(g).all()) or not bool(g.any())]
    # A site inside a block whose stochastic depth dropped every row of the batch gets no data gradient in
    # this step: that is the model's stochastic depth, not the conversion. Such sites are named, not failed.
    blocks = [name.rsplit(".", 1)[0] + "." if "." in name else "" for name in counter.all_dropped]
    by_depth = [n for n in no_data if any(n.startswith(b) for b in blocks) and data_grads[n] is not None]
    no_data = [n for n in no_data if n not in by_depth]
    if by_depth:
        res.notes.append(
            f"{grads_check}: {len(by_depth)} p_logit with a zero data-loss gradient inside a block whose "
            f"stochastic depth dropped every row this step ({', '.join(counter.all_dropped)}): {', '.join(by_depth)}"
        )
    if bad_total or no_data:
        parts = []
        if bad_total:
            parts.append(
                f"{len(bad_total)}/{len(logits)} p_logit without a finite gradient: {', '.join(bad_total[:4])}"
            )
        if no_data:
            parts.append(
                f"{len(no_data)}/{len(logits)} p_logit with no nonzero finite data-loss gradient: "
                + ", ".join(no_data[:6])
            )
        res.fail(grads_check, f"NO: {len(no_data) or len(bad_total)}/{len(logits)}", "; ".join(parts))
    else:
        extra = f", {len(by_depth)} zero by stochastic depth" if by_depth else ""
        res.set(grads_check, True, f"yes ({len(logits)}{extra})")
    return counter.calls


def sites_text(counts: Dict[str, int]) -> str:
    """``"3: module 2, functional 1"``, or ``"0"``."""
    total = sum(counts.values())
    return f"{total}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) if total else "0"


# ---------------------------------------------------------------------------------------------- one model


def run_case(case: Case, timeout: float) -> ModelResult:
    """Build, convert and check one case; every failure is caught and recorded, none is worked around.

    Args:
        case: the case.
        timeout: wall-clock guard in seconds (0: none).

    Returns:
        Its :class:`ModelResult`.
    """
    res = ModelResult(case.name, case.task, case.variant)
    start = time.perf_counter()
    try:
        with guard(timeout):
            _run_case(case, res)
    except Timeout as err:
        res.errors.append({"check": "time guard", "type": "Timeout", "message": str(err), "frames": []})
        res.result = "timeout"
        res.reason = f"stopped after {timeout:g} s (too heavy for this CPU budget)"
    res.seconds = round(time.perf_counter() - start, 1)
    if not res.result:
        applied = [c for c in res.checks.values() if c.ok is not None]
        res.result = "pass" if all(c.ok for c in applied) else "FAIL"
    return res


def _run_case(case: Case, res: ModelResult) -> None:
    # The unconverted model: built, run in eval (the reference), its training-mode dropout counted.
    try:
        inputs = make_inputs(case)
        res.input = inputs.text
        original, res.reinitialised = build(case)
        res.params_m = round(sum(p.numel() for p in original.parameters()) / 1e6, 2)
        res.dropout_modules_p, res.dropout_modules_p0 = dropout_modules(original)
        reference = eval_outputs(original, inputs.eval_args)
        if case.trainable:
            saved = {k: v.clone() for k, v in original.state_dict().items()}
            original.train()
            with torch.random.fork_rng(devices=[]), torch.no_grad(), DropoutCounter(original) as counter:
                run_model(original, inputs.train_args)
            with torch.no_grad():  # in place: load_state_dict would need the state dict's _metadata (MNASNet)
                for key, value in original.state_dict().items():
                    value.copy_(saved[key])
            original.eval()
            res.original_dropout_ops = len(counter.calls)
            res.original_dropout_examples = sorted(set(counter.calls))[:4]
            res.stochastic_depth_ops = len(counter.stochastic_depth)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - torchvision cannot build or run it here
        res.result, res.reason = "not built", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        res.errors.append(error_record("build", err))
        return

    # (a) convert with the default targets.
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = cd_convert.convert(
                original, dataset_size=DATASET_SIZE, example_inputs=example_inputs(case, inputs)
            )
        res.convert_s = round(time.perf_counter() - t0, 2)
        report = cd_convert.report(converted)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error("convert", err)
        converted = None
    if converted is not None:
        sites = report.sites
        res.sites_by_kind = dict(sorted(Counter(r.kind for r in sites).items()))
        res.other_rows = dict(sorted(Counter(r.status for r in report.rows if r not in sites).items()))
        res.report_method = report.method
        res.report_notes = list(report.notes) + sorted({n for r in report.rows for n in r.notes})
        res.sites = [
            {
                k: v
                for k, v in asdict(r).items()
                if k in ("name", "kind", "original", "original_p", "consumer", "found_by", "called")
            }
            for r in sites
        ]
        res.set("convert", True, sites_text(res.sites_by_kind))
        _check_converted(case, original, converted, inputs, reference, res)
        del converted

    # (e) targeted conversions.
    if case.trainable:
        _check_targets(case, original, inputs, reference, res, nn.Linear, "Linear targets")
        if case.name in CONV_TARGETS and not case.variant:
            _check_targets(case, original, inputs, reference, res, CONV_TARGETS[case.name], "Conv targets")
    else:
        res.set("Linear targets", None, "n/a (quantized)")


def _check_converted(
    case: Case,
    original: nn.Module,
    converted: nn.Module,
    inputs: Inputs,
    reference: List[torch.Tensor],
    res: ModelResult,
) -> None:
    """Checks (b), (d) freeze, (c), mc and (d) unconvert of a default conversion."""
    # (b) eval equal.
    try:
        ok, text = compare(reference, eval_outputs(converted, inputs.eval_args))
        res.set("eval equal", ok, text)
        if not ok:
            res.errors.append({"check": "eval equal", "type": "check failed", "message": text, "frames": []})
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error("eval equal", err)

    # (d) freeze, before training, against the original.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = cd_convert.freeze(converted)
        left = has_cd_modules(frozen)
        ok, text = compare(reference, eval_outputs(frozen, inputs.eval_args))
        if left:
            res.fail("freeze equal", f"{left} cd modules left", f"{left} ConcreteDropoutBase modules left after freeze")
        else:
            res.set("freeze equal", ok, text)
            if not ok:
                res.errors.append({"check": "freeze equal", "type": "check failed", "message": text, "frames": []})
        del frozen
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error("freeze equal", err)
        if isinstance(err, cd_convert.FreezeError):  # what strict=False (original rates kept) gives
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loose = cd_convert.freeze(converted, strict=False)
                ok, text = compare(reference, eval_outputs(loose, inputs.eval_args))
                res.checks["freeze equal"].text += f"; strict=False: {text}"
                del loose
            except Timeout:
                raise
            except Exception as err2:  # noqa: BLE001
                res.checks["freeze equal"].text += f"; strict=False raised {type(err2).__name__}"

    # (c) training step.
    if case.trainable:
        calls = train_step(case, converted, inputs, res, "train", "grads")
        if calls is None:
            res.set("no fixed dropout", False, "no step")
        elif calls:
            res.fail(
                "no fixed dropout",
                f"NO: {len(calls)} left",
                f"{len(calls)} fixed-rate dropout op(s) left in training, e.g. " + "; ".join(sorted(set(calls))[:3]),
            )
        else:
            res.set("no fixed dropout", True, f"yes (was {res.original_dropout_ops})")
    else:
        for check in ("train", "grads", "no fixed dropout"):
            res.set(check, None, "n/a (quantized)")

    # mc_predict, classification and video.
    if case.trainable and case.task in ("classification", "quantization", "video") and p_logits(converted):
        try:
            pred = cd_convert.mc_predict(converted, inputs.eval_args[0], samples=2)
            probs = pred.probs
            ok = bool(torch.isfinite(probs).all()) and tuple(probs.shape) == (inputs.eval_args[0].shape[0], NUM_CLASSES)
            res.set("mc", ok, "ok" if ok else f"NO: shape {tuple(probs.shape)}")
            if not ok:
                res.fail("mc", "NO", f"mc_predict probs shape {tuple(probs.shape)} or not finite")
        except Timeout:
            raise
        except Exception as err:  # noqa: BLE001
            res.error("mc", err)
    else:
        res.set("mc", None, "-")

    # (d) unconvert the (trained) model in place.
    try:
        restored = cd_convert.unconvert(converted)
        keys_ok = list(restored.state_dict().keys()) == list(original.state_dict().keys())
        left = has_cd_modules(restored)
        if not keys_ok:
            missing = set(original.state_dict()) - set(restored.state_dict())
            extra = set(restored.state_dict()) - set(original.state_dict())
            res.fail(
                "unconvert",
                "keys differ",
                f"state_dict keys differ: missing {sorted(missing)[:4]}, extra {sorted(extra)[:4]}, order "
                f"{'same' if not missing and not extra else '-'}",
            )
        elif left:
            res.fail("unconvert", f"{left} cd modules left", f"{left} ConcreteDropoutBase modules left after unconvert")
        else:
            restored.load_state_dict(original.state_dict(), strict=True)
            ok, text = compare(reference, eval_outputs(restored, inputs.eval_args))
            res.set("unconvert", ok, "keys, " + text)
            if not ok:
                res.errors.append({"check": "unconvert", "type": "check failed", "message": text, "frames": []})
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error("unconvert", err)


def _check_targets(
    case: Case,
    original: nn.Module,
    inputs: Inputs,
    reference: List[torch.Tensor],
    res: ModelResult,
    layer: type,
    check: str,
) -> None:
    """Check (e): convert with ``targets=[layer]``, eval equal, one training step and the grads check."""
    if not any(isinstance(m, layer) for m in original.modules()):
        res.set(check, None, f"n/a (no {layer.__name__})")
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cd_convert.convert(
                original, [layer], dataset_size=DATASET_SIZE, example_inputs=example_inputs(case, inputs)
            )
        n_sites = len(cd_convert.report(model).sites)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error(check, err)
        return
    rows = cd_convert.report(model).rows
    others = dict(
        sorted(Counter(r.status for r in rows if r.status not in ("converted", "planned", "existing")).items())
    )
    if check == "Linear targets":
        res.linear_sites, res.linear_other_rows = n_sites, others
    else:
        res.conv_sites, res.conv_other_rows = n_sites, others
    try:
        ok, text = compare(reference, eval_outputs(model, inputs.eval_args))
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        res.error(check, err)
        return
    if not ok:
        res.fail(check, f"eval {text}", f"{check}: eval output differs: {text}")
        return
    sub = f"{check} grads"
    train_step(case, model, inputs, res, check, sub)
    grads = res.checks.pop(sub, None)
    if grads is not None and grads.ok is False:
        res.set(check, False, f"{n_sites} sites, grads {grads.text}")
        for e in res.errors:
            if e["check"] == sub:
                e["check"] = check
    elif res.checks.get(check, Check(True, "")).ok:
        res.set(check, True, f"{n_sites} sites, ok")


# --------------------------------------------------------------------------------------------------- output


def print_table(results: List[ModelResult]) -> None:
    """The markdown table, then the failures (type, message, cd_convert frames) and the summary counts."""
    header = (
        "model",
        "task",
        "input",
        "Mparams",
        "dropout mods p>0 (p=0)",
        "dropout ops (orig)",
        "sites by kind",
        "other rows",
        *CHECKS[1:],
        "s",
        "result",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        cells = [
            r.name + (f" [{r.variant}]" if r.variant else ""),
            r.task,
            r.input or "-",
            f"{r.params_m:g}",
            f"{r.dropout_modules_p} ({r.dropout_modules_p0})",
            "-"
            if r.original_dropout_ops is None
            else str(r.original_dropout_ops) + (f" +{r.stochastic_depth_ops} sd" if r.stochastic_depth_ops else ""),
        ]
        if "convert" in r.checks:
            convert = r.checks["convert"]
            cells.append(convert.text if convert.ok else f"FAIL: {convert.text}")
        else:
            cells.append(r.result if r.result in ("not built", "timeout") else "-")
        cells.append(", ".join(f"{k} {v}" for k, v in r.other_rows.items()) or "-")
        for c in CHECKS[1:]:
            check = r.checks.get(c)
            cells.append("-" if check is None else (check.text if check.ok is not False else f"**FAIL** {check.text}"))
        cells += [f"{r.seconds:.0f}", r.result]
        print("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    print()
    for r in results:
        label = r.name + (f" [{r.variant}]" if r.variant else "")
        if r.reinitialised:
            print(f"- {label}: all-zero weights redrawn: {', '.join(r.reinitialised)}")
        for note in r.notes:
            print(f"- {label}: {note}")
    print()
    for r in results:
        label = r.name + (f" [{r.variant}]" if r.variant else "")
        for e in r.errors:
            print(f"- {label}: {e['check']}: {e['type']}: {e['message']}")
            for fr in e.get("frames", []):
                print(f"    - {fr}")
            if e.get("last_frame"):
                print(f"    - raised at {e['last_frame']}")
    print()
    print(summary(results))


def summary(results: List[ModelResult]) -> str:
    """The counts: models, built, converted, each check's pass / fail / n/a, results."""
    built = [r for r in results if r.result != "not built"]
    head = (
        f"{len(results)} rows ({sum(1 for r in results if not r.variant)} registry models, "
        f"{sum(1 for r in results if r.variant)} variants); built {len(built)}; "
        f"converted {sum(1 for r in results if r.checks.get('convert', Check(False, '')).ok)}; "
        f"with sites {sum(1 for r in results if r.sites_by_kind)}"
    )
    lines = [head]
    for c in CHECKS:
        outcomes = Counter({True: "pass", False: "FAIL", None: "n/a"}[r.checks[c].ok] for r in results if c in r.checks)
        lines.append(f"  {c}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    lines.append("results: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.result for r in results).items())))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--json", default=None, help="write every record to this JSON file")
    parser.add_argument("--no-variants", action="store_true", help="skip the dropout-rate and quantize=True variants")
    parser.add_argument("--timeout", type=float, default=300.0, help="wall-clock guard per case in s (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the sweep, print the table, write the JSON; returns the exit status (0)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    env = environment(args.threads, "torchvision")
    cases = all_cases(variants=not args.no_variants)
    if args.models:
        wanted = [n.strip() for n in args.models.split(",") if n.strip()]
        known = {c.name for c in cases}
        unknown = sorted(set(wanted) - known)
        if unknown:
            print(f"unknown models {unknown}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.name in wanted]
    print(
        f"cd_convert torchvision coverage: torchvision {env['torchvision']}, torch {env['torch']}, "
        f"{args.threads} thread(s), dataset_size {DATASET_SIZE}\n"
    )
    wall = time.perf_counter()
    results = []
    for case in cases:
        res = run_case(case, args.timeout)
        results.append(res)
        print(f"  {case.label:45s} {res.result:10s} {res.seconds:7.1f} s", file=sys.stderr, flush=True)
    print_table(results)
    wall_s = time.perf_counter() - wall
    print(f"\nwall time {wall_s:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "results": [asdict(r) for r in results], "wall_s": wall_s}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
