"""backdoor-gate detector: weight-space anomaly detection of backdoored networks.

Unnervik & Marcel (Idiap-RR-08-2022): treat one layer's weight matrix as a *set* of
vectors (a view), model the vectors of clean reference networks with PCA + a Gaussian
mixture, and score a candidate by the log-likelihood of its vectors.

Score convention (the only one in this project): a score is a log-likelihood, so
**higher = more typical of clean networks**. A network is blocked when a view's score is
**below** that view's threshold. See :mod:`detector.scoring`.

This package is the pure library: it imports numpy, scikit-learn, torch and safetensors,
never kfp or mlflow.
"""

__version__ = "0.1.0"

from detector.config import ReferenceConfig  # noqa: E402
from detector.errors import InvalidCheckpoint, InvalidReference  # noqa: E402
from detector.reference import Reference, ViewReference  # noqa: E402
from detector.weights import load_layer  # noqa: E402

__all__ = [
    "__version__",
    "InvalidCheckpoint",
    "InvalidReference",
    "Reference",
    "ReferenceConfig",
    "ViewReference",
    "load_layer",
]
