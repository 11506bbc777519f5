"""cd_convert: turn any PyTorch model into a Concrete Dropout model.

Public API, exported here::

    convert, plan, report, unconvert, freeze, set_regularizer      conversion lifecycle
    ConvertOptions                                                 convert()'s options as one object
    regularization, dropout_rates, RateLogger                      training
    mc_mode, mc_predict                                            Monte Carlo prediction
    ConcreteDropout, ConcreteDropout1d/2d/3d, concrete_dropout     the layers
    ConcreteDropoutBase                                            their base class (isinstance checks)
    metrics, losses; plots, timm, transformers, integrations (imported on first use; timm and
    transformers need their extras)

Public modules: what ``cd_convert`` exports above, and the modules ``cd_convert.metrics``, ``losses``,
``plots``, ``mc``, ``prior``, ``options``, ``report``, ``errors``, ``layers``, ``timm``, ``cpu_extension``
(the opt-in C++ CPU path) and ``integrations.transformers`` (each lists its public names in ``__all__``). Every
other module (``discover``, ``planning``, ``sites/``, ``consumers``, ``dry_run``, ``callsites``, ``interception``,
``fused``, ``_triton_kernels``, ...) is internal: it may change in any release.
"""

import importlib
import importlib.util
from typing import Any, List

from . import losses, metrics
from .collector import dropout_rates, regularization
from .convert import convert, freeze, plan, report, set_regularizer, unconvert
from .errors import ConversionError, FreezeError, TargetError
from .history import RateLogger
from .layers import (
    ConcreteDropout,
    ConcreteDropout1d,
    ConcreteDropout2d,
    ConcreteDropout3d,
    ConcreteDropoutBase,
    concrete_dropout,
)
from .mc import ClassificationPrediction, RegressionPrediction, mc_mode, mc_predict
from .options import ConvertOptions
from .report import Report
from .targets import register_dropout_module

__all__ = [
    "convert",
    "ConvertOptions",
    "plan",
    "report",
    "unconvert",
    "freeze",
    "set_regularizer",
    "register_dropout_module",
    "regularization",
    "dropout_rates",
    "RateLogger",
    "mc_mode",
    "mc_predict",
    "ClassificationPrediction",
    "RegressionPrediction",
    "ConcreteDropout",
    "ConcreteDropout1d",
    "ConcreteDropout2d",
    "ConcreteDropout3d",
    "ConcreteDropoutBase",
    "concrete_dropout",
    "Report",
    "ConversionError",
    "TargetError",
    "FreezeError",
    "metrics",
    "losses",
]
__version__ = "0.1.0"

# Optional integrations, imported on first attribute access (``cd_convert.timm.create_model(...)`` without
# ``import cd_convert.timm``). Their frameworks are optional extras: ``import cd_convert`` never imports them.
# attribute -> (module, third-party framework it needs or None, pip extra that installs that framework)
_LAZY_MODULES = {
    "timm": ("cd_convert.timm", "timm", "timm"),
    "transformers": ("cd_convert.integrations.transformers", "transformers", "transformers"),
    "plots": ("cd_convert.plots", "matplotlib", "bench"),
    "integrations": ("cd_convert.integrations", None, None),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, framework, extra = _LAZY_MODULES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    try:
        if framework is not None:
            importlib.import_module(framework)
        module = importlib.import_module(module_name)
    except ImportError as err:
        # Only a missing framework becomes the install hint; an ImportError from our own code (or from
        # inside an installed but broken framework) propagates as raised.
        if framework is None or err.name != framework:
            raise
        raise ImportError(
            f'cd_convert.{name} needs {framework}, which is not installed: pip install "cd_convert[{extra}]"',
            name=framework,
        ) from err
    globals()[name] = module
    return module


def _available(module_name: str, framework: Any) -> bool:
    try:
        return (framework is None or importlib.util.find_spec(framework) is not None) and (
            importlib.util.find_spec(module_name) is not None
        )
    except (ImportError, ValueError):
        return False


def __dir__() -> List[str]:
    # Lazy names are listed when they can be imported (found without importing them), so that dir()-driven
    # tools (help(), inspect.getmembers) do not stop on an optional integration whose extra is missing.
    lazy = [name for name, (module_name, framework, _) in _LAZY_MODULES.items() if _available(module_name, framework)]
    return sorted(set(globals()) | set(lazy))
