"""Training a converted model with the HuggingFace ``Trainer``: the regulariser added to the training loss.

Use :class:`ConcreteDropoutTrainer` in place of ``transformers.Trainer`` (reachable as
``cd_convert.integrations.transformers.ConcreteDropoutTrainer``)::

    model = cd_convert.convert(AutoModelForSequenceClassification.from_pretrained(...), dataset_size=len(train))
    trainer = ConcreteDropoutTrainer(model=model, args=TrainingArguments(...), train_dataset=train)
    trainer.train()
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from transformers import Trainer

from ..collector import regularization, require_collector
from ..convert import set_regularizer

__all__ = ["ConcreteDropoutTrainer"]


class ConcreteDropoutTrainer(Trainer):
    """A ``Trainer`` whose training loss carries the Concrete Dropout regulariser, once per optimiser step.

    * The regulariser is added to the loss of training steps only (evaluation losses stay the data loss).
    * With gradient accumulation it is scaled as the Trainer scales the data loss, so each optimiser step
      sees it once; under data parallelism every rank adds the same term, so the averaged gradient is that
      of one regulariser.
    * The sites' ``p_logit`` parameters get no weight decay: their prior is the regulariser itself.

    Args:
        *args: as for ``transformers.Trainer``.
        dataset_size: the training-set size N for the regulariser when it was not given to ``convert``;
            without either, ``len(train_dataset)`` is used.
        **kwargs: as for ``transformers.Trainer``.

    Raises:
        ConversionError: when the model was not converted.
    """

    def __init__(self, *args: Any, dataset_size: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        collector = require_collector(
            self.model, "call cd_convert.convert(model, dataset_size=N) before building the ConcreteDropoutTrainer."
        )
        if dataset_size is None and collector.scale is None and self.train_dataset is not None:
            try:
                dataset_size = len(self.train_dataset)
            except TypeError:
                dataset_size = None
        if dataset_size is not None:
            set_regularizer(self.model, dataset_size=dataset_size)

    def get_decay_parameter_names(self, model: nn.Module) -> List[str]:
        """The Trainer's weight-decay parameters, less the sites' ``p_logit``."""
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("p_logit")]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Any]]:
        """The Trainer's loss plus, in training, the regulariser of the (unwrapped) model."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            term = regularization(self.accelerator.unwrap_model(model))
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # The Trainer will not divide this loss by the accumulation steps: do it for the regulariser.
                term = term / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Optional[Union[torch.Tensor, int]]) -> bool:
        # The rule Trainer.training_step uses to decide whether to divide the loss by the accumulation steps.
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )
