"""One-call conversion of timm models: ``cd_convert.timm.create_model(name, ...)``.

timm is an optional dependency (``pip install cd_convert[timm]``). ``cd_convert.convert`` already uses
timm's own notrace lists for any timm model; this module adds the one-call constructor.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .convert import convert
from .options import OPTION_NAMES, resolve_options

__all__ = ["create_model"]


def create_model(name: str, *, targets: Optional[Any] = None, **kwargs: Any) -> nn.Module:
    """Create a timm model and convert it in one call.

    Args:
        name: a timm model name (``timm.list_models()``).
        targets: as for :func:`cd_convert.convert` (None: every dropout site).
        **kwargs: :func:`cd_convert.convert`'s option keywords (``dataset_size``, ``length_scale``, ``loss``,
            ``include_zero_rate``, ``fused_attention``, ...) or ``options=ConvertOptions(...)``; everything
            else goes to ``timm.create_model`` (``pretrained``, ``num_classes``, ``drop_rate``,
            ``features_only``, ...). The options are checked before the timm model is built.

    Returns:
        The converted model, still an instance of the timm class.

    Note:
        timm models default to ``drop_rate=0``. Head dropout written as ``if self.drop_rate: F.dropout(...)``
        only exists when ``drop_rate > 0``, so pass e.g. ``drop_rate=0.1`` to get a learned head rate.
        Rate-0 ``nn.Dropout`` modules (ViT blocks) become learned sites starting at ``init_p`` unless
        ``include_zero_rate=False``.
    """
    try:
        import timm
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("cd_convert.timm needs timm: pip install 'cd_convert[timm]'") from err
    keywords = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
    options = resolve_options(kwargs.pop("options", None), keywords, "create_model")
    model = timm.create_model(name, **kwargs)
    return convert(model, targets, inplace=True, options=options)
