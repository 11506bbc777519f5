"""cd_convert: turn any PyTorch model into a Concrete Dropout model.

Public API (everything else is internal)::

    convert, plan, report, unconvert, freeze, set_regularizer      conversion lifecycle
    regularization, dropout_rates, RateLogger                      training
    mc_mode, mc_predict                                            Monte Carlo prediction
    ConcreteDropout, ConcreteDropout1d/2d/3d, concrete_dropout     the layers
    metrics, losses (plots: ``import cd_convert.plots``; timm: ``import cd_convert.timm``)
"""

from . import losses, metrics
from .collector import dropout_rates, regularization
from .convert import convert, freeze, plan, report, set_regularizer, unconvert
from .errors import ConversionError, FreezeError, TargetError
from .history import RateLogger
from .layers import ConcreteDropout, ConcreteDropout1d, ConcreteDropout2d, ConcreteDropout3d, concrete_dropout
from .mc import ClassificationPrediction, RegressionPrediction, mc_mode, mc_predict
from .report import Report

__all__ = [
    "convert",
    "plan",
    "report",
    "unconvert",
    "freeze",
    "set_regularizer",
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
    "concrete_dropout",
    "Report",
    "ConversionError",
    "TargetError",
    "FreezeError",
    "metrics",
    "losses",
]
__version__ = "0.1.0"
