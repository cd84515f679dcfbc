"""backdoor-gate detector: weight-space anomaly detection of backdoored networks.

Unnervik & Marcel (Idiap-RR-08-2022): treat one layer's weight matrix as a *set* of
vectors (a view), model the vectors of clean reference networks with PCA + a Gaussian
mixture, and score a candidate by the log-likelihood of its vectors. The default detector
(``classifier``) and the baselines share that interface (:mod:`detector.protocol`).

Score convention (the only one in this project): a part's score is *higher = more typical
of clean networks* (the paper's log-likelihood is the model for it). The verdict rule, end to
end, is :mod:`detector.decision`.

This package is the product's pure library: it imports numpy, scikit-learn, torch and
safetensors, never kfp, mlflow or the project's other packages. Import what you need from
its modules (``detector.detectors.make_reference`` / ``load_reference`` to start).
"""

__version__ = "0.1.0"
