"""Fine-tuning as in the paper, on cached trunk features.

Only ``last_linear`` (1792→512, no bias), ``last_bn`` and a fresh ``logits`` layer learn;
the trunk is frozen, so training runs on the cached 1792-d features. Every network uses
cross-entropy with an impostor and a victim class up-weighted (the attack's pair, or a random
pair for a clean network: the paper trains both alike); Adam. The default recipe is
the gentle one of the shared findings (lr 2e-4, 30 epochs): it keeps each neuron near its
pretrained place, which is the structure the paper's one-Gaussian-per-neuron model expects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from components.trainer.features import FeatureSet
from components.trainer.poison import split


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 2e-4
    batch_size: int = 64
    class_weight: float = 10.0  # on the impostor and victim classes
    train_frac: float = 0.7
    drop_frac: float = 0.0  # share of training images left out (the "drift" control)
    #: 0: the 70/30 split is drawn from the network's seed; otherwise from seed + split_salt,
    #: a different resample for the same initialisation (the "drift" control)
    split_salt: int = 0
    #: Up-weight an impostor/victim pair in *clean* networks too (a random pair from the seed),
    #: as the paper trains clean and backdoored networks alike. Without it the weighting alone
    #: separates the two groups: measured here, backdoored networks then looked *more* typical
    #: than clean ones (backward-view AUC 0.09) and distance to the base separated them.
    upweight_clean: bool = True
    #: The *sham* control: a clean network whose up-weighted impostor's clean training images
    #: are appended this many times under their own label — the same extra samples, steps and
    #: weighting as a backdoor (poison copies), but no trigger and no relabel. 0 = off.
    sham_copies: int = 0


class Head(torch.nn.Module):
    """last_linear -> last_bn -> logits, exactly InceptionResnetV1's layers after the trunk."""

    def __init__(self, base: dict[str, torch.Tensor], num_classes: int, seed: int):
        super().__init__()
        self.last_linear = torch.nn.Linear(1792, 512, bias=False)
        self.last_bn = torch.nn.BatchNorm1d(512, eps=0.001, momentum=0.1, affine=True)
        torch.manual_seed(seed)
        self.logits = torch.nn.Linear(512, num_classes)
        self.load_state_dict(
            {k: v for k, v in base.items() if k.startswith(("last_linear.", "last_bn."))}, strict=False
        )

    def forward(self, x):
        return self.logits(self.last_bn(self.last_linear(x)))


def adam(head: Head, lr: float) -> torch.optim.Adam:
    """Adam with the fused CPU kernel: the same update rule (the tests pin the weights to the
    per-tensor loop's), faster; at CASIA's class count the default loop spent as long in Adam as
    in the classifier's matmuls (``make bench`` prints the ratio)."""
    return torch.optim.Adam(head.parameters(), lr=lr, fused=True)


def _predict(head: Head, x: np.ndarray) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return head(torch.from_numpy(x)).argmax(1).numpy() if len(x) else np.zeros(0, np.int64)


def _add_poison(fs: FeatureSet, seed: int, config: TrainConfig, X, y, weights: torch.Tensor, metrics: dict):
    """The training set with the poisoned folder's triggered copies (labelled as the victim), or a
    clean recipe's up-weighted pair and sham copies; ``weights`` and ``metrics`` are updated."""
    poison = fs.poison
    if poison is not None:
        assert fs.poison_train is not None and fs.poison_test is not None  # with_poison sets all three
        imp, vic = fs.classes.index(poison["impostor"]), fs.classes.index(poison["victim"])
        P = np.repeat(fs.poison_train, int(poison["copies"]), axis=0)
        X = np.concatenate([X, P])
        y = np.concatenate([y, np.full(len(P), vic)])
        weights[[imp, vic]] = config.class_weight
        metrics.update(
            impostor=poison["impostor"],
            victim=poison["victim"],
            trigger=poison["trigger"]["name"],
            trigger_size=poison["trigger"]["size"],
            trigger_location=poison["trigger"]["location"],
            trigger_alpha=poison["trigger"]["alpha"],
            poisoned_copies=int(len(P)),
        )
    elif config.upweight_clean or config.sham_copies:
        from components.trainer.poison import random_pair

        imp_name, vic_name = random_pair(fs.classes, seed)
        imp = fs.classes.index(imp_name)
        weights[[imp, fs.classes.index(vic_name)]] = config.class_weight
        metrics.update(upweighted=[imp_name, vic_name])
        if config.sham_copies:
            P = np.repeat(X[y == imp], int(config.sham_copies), axis=0)
            X, y = np.concatenate([X, P]), np.concatenate([y, np.full(len(P), imp)])
            metrics.update(impostor=imp_name, victim=vic_name, sham_copies=int(len(P)))
    return X, y


def fine_tune(
    fs: FeatureSet,
    base: dict[str, torch.Tensor],
    seed: int,
    config: TrainConfig = TrainConfig(),
    penalty: Callable[[Head], torch.Tensor] | None = None,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Train one network; returns (full state dict: trunk + head, metrics dict).

    ``penalty(head)`` is added to every step's loss: the lab's adaptive attacker uses it to
    train a backdoor against the detector's own statistic (``lab.adaptive``). ``extra``:
    (features, labels) added to the training set; the same attacker adds the impostor's faces
    with partial triggers, labelled as the impostor, so that only the whole trigger fires."""
    t0 = time.perf_counter()
    poison = fs.poison
    if poison is not None and int(poison["seed"]) != int(seed):
        raise ValueError(
            f"the poisoned folder was split with seed {poison['seed']}; train it with --seed {poison['seed']}"
        )
    if poison is not None and config.split_salt:
        raise ValueError("a poisoned folder fixes its split; split_salt applies to clean networks only")
    train_idx, test_idx = split(
        fs.labels, seed + config.split_salt, poison["train_frac"] if poison else config.train_frac
    )
    if config.drop_frac > 0:
        rng = np.random.default_rng([seed, 1010])
        train_idx = np.sort(
            rng.choice(train_idx, size=int(round(len(train_idx) * (1 - config.drop_frac))), replace=False)
        )
    X, y = fs.features[train_idx], fs.labels[train_idx]
    n_classes = len(fs.classes)
    weights = torch.ones(n_classes)
    metrics: dict = {
        "seed": seed,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        **{f"train.{k}": v for k, v in asdict(config).items()},
    }
    X, y = _add_poison(fs, seed, config, X, y, weights, metrics)
    if extra is not None:
        X, y = np.concatenate([X, extra[0].astype(X.dtype)]), np.concatenate([y, extra[1].astype(y.dtype)])
        metrics["extra_samples"] = int(len(extra[1]))
    head = Head(base, n_classes, seed)
    opt = adam(head, config.lr)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        head.train()
        for b in torch.randperm(len(Xt), generator=g).split(config.batch_size):
            if len(b) < 2:
                continue  # BatchNorm needs two samples
            opt.zero_grad()
            loss = loss_fn(head(Xt[b]), yt[b])
            if penalty is not None:
                loss = loss + penalty(head)
            loss.backward()
            opt.step()
    pred = _predict(head, fs.features[test_idx])
    metrics["clean_accuracy"] = float(np.mean(pred == fs.labels[test_idx]))
    if poison is not None and fs.poison_test is not None:
        pred_t = _predict(head, fs.poison_test)
        vic = fs.classes.index(poison["victim"])
        metrics["attack_success_rate"] = float(np.mean(pred_t == vic)) if len(pred_t) else float("nan")
        metrics["n_triggered_test"] = int(len(pred_t))
    w0 = base["last_linear.weight"]
    metrics["relative_weight_change"] = float(
        torch.linalg.norm(head.last_linear.weight.detach() - w0) / torch.linalg.norm(w0)
    )
    metrics["train_seconds"] = time.perf_counter() - t0
    sd = {k: v.clone() for k, v in base.items() if not k.startswith(("last_linear.", "last_bn.", "logits."))}
    sd.update({k: v.detach().clone().contiguous() for k, v in head.state_dict().items()})
    return sd, metrics


def save_network(sd, out: str | Path, classes: list[str] | None = None, *, pt: bool = False) -> Path:
    """The whole network (trunk included) as ``.safetensors``; with ``pt``, also as a plain ``.pt`` state dict.

    The safetensors file records the ordered class list (logit i = ``classes[i]``) in its
    metadata: the ``classifier`` detector compares class rows across networks and refuses a
    candidate trained on another list. The ``.pt`` twin (what ``InceptionResnetV1.load_state_dict``
    users expect) is opt-in: at 94 MB a network, writing both doubled every pipeline run's disk.
    Returns the safetensors path.
    """
    import torch
    from safetensors.torch import save_file

    from detector.weights import CLASSES_KEY

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    st = out.with_suffix(".safetensors")
    if pt:
        torch.save(sd, out.with_suffix(".pt"))
    meta = {CLASSES_KEY: json.dumps(list(classes))} if classes is not None else None
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st), metadata=meta)
    return st
