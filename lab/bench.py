"""``backdoor-gate bench``: what the method costs here, as ratios measured in one run.

The paper names two costs as the method's limits: training many clean networks and fitting
large Gaussian mixtures. This measures both against the obvious alternative on this machine,
plus what a promotion gate costs, and writes ``bench/results.json`` (``--quick``:
``bench/results-quick.json``) and a small plot of how EM cost grows.

Honesty rules followed here:

- every speed-up compares two things run back to back in this process, single-threaded
  unless stated, on the same data; ratios use process CPU time (the machine may be shared),
  wall-clock seconds are recorded beside them;
- the EM comparison starts both implementations from the same initial mixture and checks
  they did the same number of iterations and reached the same log-likelihood;
- the trunk has seeded random weights: a forward pass of InceptionResnetV1 costs the same
  whatever the values (dense convolutions), and building the pre-trained default base takes
  ~5 min — a speed measure does not need it;
- weight matrices are synthetic (:mod:`lab.synthetic`: one shared base plus per-network
  noise), projected to exactly the paper's PCA sizes (76 forward, 297 backward) for the EM
  comparison, and to 95 % variance (what ``reference fit`` does) for the gate.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: CASIA-WebFace, as in the paper
CASIA_IDENTITIES = 10_575
CASIA_IMAGES = 494_414
PAPER_DIMS = {"forward": 76, "backward": 297}
PAPER_NG = {"forward": 1792, "backward": 512}
#: the gate rows: the default detector, and the weights-only gate beside it (``run``)
GATE_ROWS = ("gate_default", "gate_weights_only")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    wall: float
    cpu: float

    def to_dict(self) -> dict:
        return {"wall_s": round(self.wall, 4), "cpu_s": round(self.cpu, 4)}


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, Timing]:
    """Run ``fn`` ``repeat`` times; the result of the last run and the median timing."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return out, Timing(float(np.median(walls)), float(np.median(cpus)))


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("inf")


def machine() -> dict:
    import sklearn
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        pass
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scikit_learn": sklearn.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": commit,
    }


# --------------------------------------------------------------------------------------------
# Synthetic reference vectors at the paper's scale
# --------------------------------------------------------------------------------------------
def paper_family(seed: int = 0):
    """Clean (and backdoored) last_linear matrices, 512 x 1792, around one shared base."""
    from lab.synthetic import FamilyConfig, WeightFamily

    return WeightFamily(FamilyConfig(out_features=512, in_features=1792, seed=seed))


def weight_matrices(n: int, seed: int = 0) -> list[np.ndarray]:
    """n clean last_linear matrices of one family."""
    family = paper_family(seed)
    return [family.clean() for _ in range(n)]


def view_vectors_pca(matrices: list[np.ndarray], view: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(X (M*n, dims), groups (M, n, dims)): a view's vectors of every network, PCA-reduced."""
    from sklearn.decomposition import PCA

    from detector.views import view_vectors

    V = np.stack([view_vectors(W, view) for W in matrices])
    M, n, d = V.shape
    Z = PCA(n_components=dims, svd_solver="randomized", random_state=0).fit_transform(V.reshape(M * n, d))
    return Z, Z.reshape(M, n, dims)


def _reg(Z: np.ndarray) -> float:
    """What ViewReference uses: reg_covar (1e-3) relative to the mean per-dimension variance."""
    from detector.config import ReferenceConfig

    return float(ReferenceConfig().reg_covar * Z.var(axis=0).mean())


# --------------------------------------------------------------------------------------------
# 1. head training on cached features vs the trunk in the loop
# --------------------------------------------------------------------------------------------
def _random_trunk(seed: int = 0):
    import torch

    from components.trainer.base_trunk import new_network

    torch.manual_seed(seed)
    net = new_network()
    net.eval().to(memory_format=torch.channels_last)
    return net


def head_training(quick: bool, threads: int, log) -> dict:
    """One fine-tuning epoch (Adam, batch 64): cached features vs trunk forward + the same head step.

    Measured for CASIA-WebFace's 10,575 identities (the paper's setting: the 512 x 10,575
    classifier is most of the head's cost) and for the demo's 40.
    """
    import torch

    from components.trainer.base_trunk import trunk_features
    from components.trainer.train import Head, adam

    n_cached = 2048 if quick else 8192
    n_trunk = 64 if quick else 192
    size, batch = 160, 64
    net = _random_trunk()
    base = {k: v for k, v in net.state_dict().items() if k.startswith(("last_linear.", "last_bn."))}
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n_cached, 1792, generator=g)
    images = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)

    def epoch(classes, get_features, n):
        labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
        head = Head(base, classes, seed=0)
        head.train()
        opt = adam(head, 2e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        for s in range(0, n, batch):
            x = get_features(s, min(n, s + batch))
            opt.zero_grad()
            loss_fn(head(x), labels[s : s + len(x)]).backward()
            opt.step()

    def cached(s, e):
        return feats[s:e]

    def through_trunk(s, e):
        with torch.no_grad():  # the trunk is frozen: forward only
            return trunk_features(net, images[: e - s])

    out: dict[str, Any] = {"image_size": size, "threads": threads, "batch": batch}
    trunk_flops = _flops_per_image(lambda: through_trunk(0, 4), 4)
    out["trunk_mflop_per_image"] = round(trunk_flops / 1e6, 1)
    with torch_threads(threads):
        for classes in (CASIA_IDENTITIES, 40):
            log(
                f"head training, {classes} classes: one epoch on {n_cached} cached features vs {n_trunk} images "
                f"through the trunk ({size} px)"
            )
            epoch(classes, cached, 2 * batch)  # warm-up, both paths: a cold trunk
            through_trunk(0, 8)  # (oneDNN primitive creation) would flatter the cached side
            _, t_cached = timed(lambda: epoch(classes, cached, n_cached))
            _, t_trunk = timed(lambda: epoch(classes, through_trunk, n_trunk))
            per_cached, per_trunk = t_cached.cpu / n_cached, t_trunk.cpu / n_trunk
            flops = _flops_per_image(lambda: epoch(classes, cached, batch), batch)  # one step of what was timed
            out[f"{classes}_classes"] = {
                "speedup": round(_ratio(per_trunk, per_cached), 1),
                "cached_ms_per_image": round(1e3 * per_cached, 4),
                "trunk_in_loop_ms_per_image": round(1e3 * per_trunk, 2),
                "cached_epoch": t_cached.to_dict() | {"images": n_cached},
                "trunk_in_loop": t_trunk.to_dict() | {"images": n_trunk},
                "flop_ratio": round(trunk_flops / flops, 1),
                "head_mflop_per_image": round(flops / 1e6, 2),
            }
            log(
                f"  {classes} classes: {1e3 * per_trunk:.1f} ms vs {1e3 * per_cached:.3f} ms per image "
                f"({_ratio(per_trunk, per_cached):.0f}x; FLOP ratio {trunk_flops / flops:.0f}x)"
            )
    out["head_training_speedup"] = out[f"{CASIA_IDENTITIES}_classes"]["speedup"]
    out["head_training_speedup_40_classes"] = out["40_classes"]["speedup"]
    out["head_training_flop_ratio"] = out[f"{CASIA_IDENTITIES}_classes"]["flop_ratio"]
    out["note"] = (
        "CPU time per image; same head, optimiser and batch size; the trunk-in-loop epoch is timed on "
        "a subset of images; seeded random trunk weights (same cost as trained ones). flop_ratio = trunk "
        "forward FLOPs / head forward+backward FLOPs per image: the speedup the same arithmetic at equal "
        "efficiency allows; at 10,575 classes the three 512 x 10,575 classifier matmuls bound it"
    )
    return out


def _flops_per_image(step: Callable[[], Any], images: int) -> float:
    """FLOPs of one call per image (torch's counter: matmuls and convolutions only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / images


# --------------------------------------------------------------------------------------------
# 2. trunk feature extraction throughput
# --------------------------------------------------------------------------------------------
def feature_extraction(quick: bool, log) -> dict:
    import torch

    from components.trainer.base_trunk import trunk_features

    net = _random_trunk()
    batch = 32
    n = 64 if quick else 160
    sizes = (160,) if quick else (160, 96)
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(1)
    for size in sizes:
        x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        for threads in (1, 2):
            with torch_threads(threads), torch.inference_mode():
                trunk_features(net, x[:8])  # warm-up
                _, t = timed(lambda: [trunk_features(net, x) for _ in range(n // batch)])
            ips = n / t.wall
            out[f"{size}px_{threads}_thread{'s' if threads > 1 else ''}"] = round(ips, 1)
            log(f"feature extraction {size} px, {threads} thread(s): {ips:.1f} images/s")
    first = f"{sizes[0]}px"
    return {
        "feature_extraction_images_per_s": out,
        "thread_scaling_2_vs_1": round(out[f"{first}_2_threads"] / out[f"{first}_1_thread"], 2),
        "batch": batch,
        "note": "InceptionResnetV1 trunk, eval + inference_mode + channels_last, as components.trainer.features; "
        "image decoding excluded; wall clock (the 2-thread figure is sensitive to other load on the machine)",
    }


# --------------------------------------------------------------------------------------------
# 3. reference GMM fit at the paper's scale: ours vs scikit-learn, same init, same iterations
# --------------------------------------------------------------------------------------------
def _sklearn_fit(Z, k, init, reg, max_iter, tol):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from detector.gmm import _to_sklearn_precisions

    gm = GaussianMixture(
        k,
        covariance_type=init.covariance,
        reg_covar=reg,
        max_iter=max_iter,
        tol=tol,
        random_state=0,
        weights_init=init.weights,
        means_init=init.means,
        precisions_init=_to_sklearn_precisions(init),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(Z)
    return gm


def reference_fit(quick: bool, matrices: list[np.ndarray], threads: int, log) -> dict:
    from detector import em
    from detector.gmm import Mixture, neuron_init

    out: dict[str, Any] = {"views": {}}
    ours_cpu = sk_cpu = sk_em_cpu = 0.0
    for view in ("forward", "backward"):
        Z, groups = view_vectors_pca(matrices, view, PAPER_DIMS[view])
        M, n, d = groups.shape
        reg = _reg(Z)
        init, t_init = timed(lambda: neuron_init(groups, "diag", reg))
        hint = np.tile(np.arange(n), M)
        log(f"reference fit, {view}: {M}x{n} vectors, {d} dims, N_G={n}, diag — ours")
        stats: dict = {}
        ours, t_ours = timed(
            lambda: em.fit(Z, n, covariance="diag", reg=reg, init=init, hint=hint, threads=threads, stats=stats),
            repeat=3,
        )
        log(f"reference fit, {view}: scikit-learn GaussianMixture from the same init")
        gm, t_sk = timed(lambda: _sklearn_fit(Z, n, init, reg, 100, 1e-3), repeat=1 if view == "forward" else 3)
        # scikit-learn's fit ends with one more E-step (labels for fit_predict); time it alone too
        _, t_e = timed(lambda: gm._e_step(Z))
        sk = Mixture(gm.weights_, gm.means_, gm.precisions_cholesky_, "diag", int(gm.n_iter_), bool(gm.converged_))
        method = "pruned" if quick else "dense"
        ll_ours = float(ours.score_samples(Z, method=method).sum())
        ll_sk = float(sk.score_samples(Z, method=method).sum())
        rel = abs(ll_ours - ll_sk) / abs(ll_sk)
        sk_em = Timing(t_sk.wall - t_e.wall, t_sk.cpu - t_e.cpu)
        out["views"][view] = {
            "vectors": [M, n],
            "pca_dims": d,
            "n_components": n,
            "covariance": "diag",
            "init": "neuron (one Gaussian per neuron, closed form)",
            "init_seconds": round(t_init.wall, 3),
            "n_iter": {"ours": ours.n_iter, "sklearn": int(gm.n_iter_)},
            "ours": t_ours.to_dict(),
            "sklearn_fit": t_sk.to_dict(),
            "sklearn_em_only": sk_em.to_dict(),
            "speedup": round(_ratio(t_sk.cpu, t_ours.cpu), 1),
            "speedup_vs_em_only": round(_ratio(sk_em.cpu, t_ours.cpu), 1),
            "log_likelihood": {"ours": ll_ours, "sklearn": ll_sk, "relative_difference": rel, "evaluated": method},
            "components_evaluated_per_vector": [round(c, 1) for c in stats.get("columns_per_point", [])],
        }
        ours_cpu += t_ours.cpu
        sk_cpu += t_sk.cpu
        sk_em_cpu += sk_em.cpu
        log(
            f"  {view}: ours {t_ours.cpu:.2f} s, sklearn {t_sk.cpu:.2f} s (EM only {sk_em.cpu:.2f} s), "
            f"iterations {ours.n_iter}/{gm.n_iter_}, log-likelihood rel. diff {rel:.1e}"
        )
        if ours.n_iter != gm.n_iter_ or rel > 1e-4:
            out["views"][view]["warning"] = "iterations or log-likelihood differ beyond 1e-4"
    out["reference_fit_speedup"] = round(_ratio(sk_cpu, ours_cpu), 1)
    out["reference_fit_speedup_vs_em_only"] = round(_ratio(sk_em_cpu, ours_cpu), 1)
    out["threads"] = threads
    out["note"] = (
        "CPU seconds, ours median of 3; sklearn's fit includes a final labelling E-step, "
        "'em_only' subtracts it (timed separately)"
    )
    return out


# --------------------------------------------------------------------------------------------
# 4. the AIC sweep over the paper's grid
# --------------------------------------------------------------------------------------------
def aic_sweep(quick: bool, matrices: list[np.ndarray], log) -> dict:
    from detector.config import PAPER_GRID
    from detector.gmm import select_mixture

    out: dict[str, Any] = {"views": {}}
    views = ("backward",) if quick else ("forward", "backward")
    total = Timing(0.0, 0.0)
    for view in views:
        Z, groups = view_vectors_pca(matrices, view, PAPER_DIMS[view])
        cap = groups.shape[1] if quick else len(Z)
        grid = [g for g in PAPER_GRID if g <= cap]
        log(f"AIC sweep, {view}: grid {grid}")
        rows: list = []
        (best, _), t = timed(
            lambda: select_mixture(Z, groups, grid, covariance="diag", reg=_reg(Z), progress=rows.append)
        )
        total = Timing(total.wall + t.wall, total.cpu + t.cpu)
        out["views"][view] = {
            "grid": grid,
            "best_n_components": best.n_components,
            **t.to_dict(),
            "per_size": [
                {"n_components": r.n_components, "init": r.init, "seconds": round(r.seconds, 2), "n_iter": r.n_iter}
                for r in rows
            ],
        }
        log(f"  {view}: {t.wall:.1f} s, AIC picks N_G = {best.n_components}")
    out["aic_sweep_seconds"] = round(total.wall, 1)
    out["aic_sweep_cpu_seconds"] = round(total.cpu, 1)
    out["scope"] = (
        "backward view, grid up to N_G = 512 (quick)"
        if quick
        else "both views, the paper's grid capped at the number of vectors"
    )
    out["note"] = "k-means initialisations (scikit-learn KMeans, as GaussianMixture's default) included"
    return out


# --------------------------------------------------------------------------------------------
# 5. the gate: one candidate checkpoint on disk, load + hash + score both views
# --------------------------------------------------------------------------------------------
_GATE_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch, safetensors.torch  # imported once by any gate process; timed apart from the work
from detector.detectors import load_reference
t1 = time.perf_counter()
def _hwm():  # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, kept across exec)
    return int(dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)["VmHWM"].split()[0]) / 1024
hwm_import = _hwm()
faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ref = load_reference(sys.argv[1])
hwm_load = _hwm()
t2 = time.perf_counter()
a = ref.assess(sys.argv[2])
t3 = time.perf_counter()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
hwm_gate = _hwm()
# the same candidate again in this process: the arithmetic without the first touch of new memory
ref.assess(sys.argv[2])
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_reference_s": t2 - t1, "assess_s": t3 - t2, "gate_s": t3 - t1,
                  "verdict": a.decision.verdict, "trunk": a.trunk.status,
                  "peak_rss_mb": hwm_gate, "page_faults": faults, "warm_assess_s": t4 - t3,
                  "peak_rss_after_import_mb": hwm_import, "peak_rss_after_reference_load_mb": hwm_load,
                  }))
"""


def _gate_child_runs(reference: Path, candidate: Path, n: int) -> list[dict]:
    """Gate ``candidate`` ``n`` times, each in a fresh process (_GATE_CHILD); its JSON lines, plus
    each process's wall time (``process_wall_s``)."""
    runs = []
    for _ in range(n):
        w0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", _GATE_CHILD, str(reference), str(candidate)],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        if p.returncode != 0:
            raise RuntimeError(f"gate subprocess failed: {p.stderr[-2000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = time.perf_counter() - w0
        runs.append(r)
    return runs


def _paper_sizes_reference():
    """A GMM reference with N_G fixed at the paper's choice per view (the sweep is measured apart)."""
    from detector.config import ReferenceConfig
    from detector.reference import Reference

    class PaperSizes(Reference):
        def _view_estimator(self, view):
            return super()._view_estimator(view).set_params(n_components=PAPER_NG[view])

    return PaperSizes(ReferenceConfig())


def gate(quick: bool, matrices: list[np.ndarray], family, log) -> dict:
    import torch
    from safetensors.torch import save_file

    net = _random_trunk()
    base = {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("logits.")}
    base["last_linear.weight"] = torch.from_numpy(family.base.astype(np.float32))
    heldout = [family.clean() for _ in range(4)]  # drawn after the reference networks: unseen
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        log(f"gate: fitting a reference on {len(matrices)} networks (PCA to 95 % variance, N_G 1792 / 512)")
        ref, t_fit = timed(lambda: _paper_sizes_reference().fit(matrices, base=base).calibrate(heldout))
        ref.save(Path(tmp) / "reference")
        candidate = dict(base)
        candidate["last_linear.weight"] = torch.from_numpy(family.backdoored().astype(np.float32))
        path = Path(tmp) / "candidate.safetensors"
        save_file({k: v.contiguous() for k, v in candidate.items()}, str(path))
        size_mb = path.stat().st_size / 1024**2
        log(f"gate: scoring a {size_mb:.0f} MB candidate in a fresh process")
        runs = _gate_child_runs(Path(tmp) / "reference", path, 1 if quick else 3)
    med = {
        k: float(np.median([r[k] for r in runs]))
        for k in ("import_s", "load_reference_s", "assess_s", "gate_s", "peak_rss_mb", "process_wall_s")
    }
    return {
        "gate_seconds": round(med["gate_s"], 3),
        "gate_peak_rss_mb": round(med["peak_rss_mb"], 1),
        "breakdown_s": {k: round(med[k], 3) for k in ("load_reference_s", "assess_s", "import_s", "process_wall_s")},
        "candidate_mb": round(size_mb, 1),
        "verdict": runs[-1]["verdict"],
        "trunk_check": runs[-1]["trunk"],
        "pca_dims": {v: est.n_pca_ for v, est in ref.views_.items()},
        "n_components": {v: est.n_components_ for v, est in ref.views_.items()},
        "reference_fit_seconds": round(t_fit.wall, 1),
        "runs": len(runs),
        "note": "fresh Python process: load_reference (digests verified) + assess (read, sha256, parse without "
        "pickle, frozen-trunk check of every tensor, both views scored); gate_seconds excludes the interpreter and "
        "the imports of torch, safetensors and detector (import_s, paid once per process); peak RSS (VmHWM) is the "
        "whole process's, imports included (torch alone is ~650 MB resident here)",
    }


def _head(family, rng, classes: int, L0: np.ndarray, victim: int | None = None) -> dict:
    """A fine-tuned head around the family's base: last_linear from the family, last_bn and
    logits with small per-network noise; a backdoor moves the victim's logits row."""
    import torch

    W = family.backdoored() if victim is not None else family.clean()
    L = L0 + rng.normal(0, 0.01, L0.shape).astype(np.float32)
    if victim is not None:
        L[victim] += rng.normal(0, 0.2, L0.shape[1]).astype(np.float32)
    return {
        "last_linear.weight": torch.from_numpy(W.astype(np.float32)),
        "last_bn.weight": torch.from_numpy((1 + rng.normal(0, 0.01, 512)).astype(np.float32)),
        "last_bn.bias": torch.zeros(512),
        "last_bn.running_mean": torch.zeros(512),
        "last_bn.running_var": torch.from_numpy((1 + rng.uniform(0, 0.1, 512)).astype(np.float32)),
        "logits.weight": torch.from_numpy(L),
        "logits.bias": torch.zeros(classes),
    }


def _random_gallery(classes: int):
    """A gallery of the default size with random features (the margins part's cost does not
    depend on what the faces are); its own generator, so every detector is timed on the same heads."""
    from detector.margins import DEFAULT_FACES, DEFAULT_SOURCES, FaceGallery, draw_people

    rng = np.random.default_rng(1)
    people = draw_people(classes, DEFAULT_SOURCES, rng)
    features = rng.normal(0, 1, (len(people), DEFAULT_FACES, 1792)).astype(np.float32)
    return FaceGallery(features, people, tuple(f"id{c:05d}" for c in range(classes)))


def shipped_members(detector: str, gallery=None) -> dict:
    """The deciding members, unfitted, exactly as ``make_reference`` builds ``detector`` (``head`` with
    the views it has there: the offset share and toward beside ``margins``). Built one by one, by
    name, the bench's ``head`` had neither (2026-12-05, before this function)."""
    from detector.composite import CompositeReference
    from detector.detectors import make_reference

    ref = make_reference(detector, gallery=gallery)
    return dict(ref.members) if isinstance(ref, CompositeReference) else {detector: ref}


def gate_default(quick: bool, matrices: list[np.ndarray], family, log, detector: str | None = None) -> dict:
    """The gate as shipped: the default detector deciding (or ``detector``), the paper's GMM
    (N_G 1792 / 512) as evidence, one whole-network candidate, at 40 classes (our demo) and
    10,575 (CASIA). A detector with ``margins`` gets a gallery of the default size
    (:func:`_random_gallery`)."""
    import torch
    from safetensors.torch import save_file

    from detector.composite import CompositeReference
    from detector.config import DEFAULT_DETECTOR, FUSION
    from detector.detectors import reads_gallery

    detector = detector or DEFAULT_DETECTOR

    rng = np.random.default_rng(0)
    trunk = {
        k: v.detach().clone() for k, v in _random_trunk().state_dict().items() if not k.startswith(("logits.", "last_"))
    }
    base = {**trunk, "last_linear.weight": torch.from_numpy(family.base.astype(np.float32))}
    log("gate (default detector): fitting the paper's GMM once (evidence member)")
    gmm = _paper_sizes_reference().fit(matrices, base=base)
    out: dict[str, Any] = {}
    for classes in (40,) if quick else (40, CASIA_IDENTITIES):
        L0 = rng.normal(0, 0.05, (classes, 512)).astype(np.float32)
        n_ref = (
            18 if classes <= 1000 else 6
        )  # the fit holds every reference's classes x 1792 matrix; the gate's cost does not depend on it
        refs = [{**trunk, **_head(family, rng, classes, L0)} for _ in range(n_ref)]
        cal = [{**trunk, **_head(family, rng, classes, L0)} for _ in range(4)]
        log(f"gate ({detector}): {classes} classes, fitting it on {n_ref} synthetic heads")
        comp = CompositeReference(
            decide_by=FUSION if detector == "fusion" else tuple(detector.split("+")), evidence=("gmm",)
        )
        gallery = _random_gallery(classes) if reads_gallery(detector) else None
        comp.members_ = {m: ref.fit(refs, base=base) for m, ref in shipped_members(detector, gallery).items()}
        comp.members_["gmm"] = gmm
        comp.trunk_digests_, comp.n_reference_ = gmm.trunk_digests_, n_ref
        comp.reference_checkpoints_, comp.shape_ = gmm.reference_checkpoints_, gmm.shape_
        comp.calibrate(cal)
        with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
            comp.save(Path(tmp) / "reference")
            ref_mb = sum(f.stat().st_size for f in (Path(tmp) / "reference").rglob("*") if f.is_file()) / 1024**2
            cand = {**trunk, **_head(family, rng, classes, L0, victim=3)}
            path = Path(tmp) / "candidate.safetensors"
            save_file({k: v.contiguous() for k, v in cand.items()}, str(path))
            runs = _gate_child_runs(Path(tmp) / "reference", path, 1 if quick else 3)
            med = {
                k: float(np.median([r[k] for r in runs]))
                for k in ("load_reference_s", "assess_s", "gate_s", "peak_rss_mb", "page_faults", "warm_assess_s")
            }
            out[f"{classes}_classes"] = {
                "gate_seconds": round(med["gate_s"], 3),
                "gate_peak_rss_mb": round(med["peak_rss_mb"], 1),
                "peak_rss_after_import_mb": round(runs[-1]["peak_rss_after_import_mb"], 1),
                "peak_rss_after_reference_load_mb": round(runs[-1]["peak_rss_after_reference_load_mb"], 1),
                "load_reference_s": round(med["load_reference_s"], 3),
                "assess_s": round(med["assess_s"], 3),
                "warm_assess_s": round(med["warm_assess_s"], 3),
                "page_faults": int(med["page_faults"]),
                "reference_mb": round(ref_mb, 1),
                "candidate_mb": round(path.stat().st_size / 1024**2, 1),
                "verdict": runs[-1]["verdict"],
                "runs": len(runs),
            }
            log(f"  {classes} classes: {out[f'{classes}_classes']}")
    out["detector"] = detector
    out["parts"] = sorted(comp.thresholds_)
    out["note"] = (
        "the shipped composite: default detector deciding + the paper's GMM (N_G 1792/512) as evidence; "
        "synthetic heads "
        "around the paper-scale weight family; fresh process, as gate_seconds"
    )
    return out


def reference_fit_default(quick: bool, family, log) -> dict:
    """``reference fit`` as shipped, at our 40 identities: the default detector deciding and the
    paper's GMM as evidence (the default config: one Gaussian per neuron), on 10 whole networks; the
    thresholds from leave-one-out (no ``--calibrate``) and from 20 held-out networks. The margins
    part gets a gallery of the default size (:func:`_random_gallery`)."""
    import torch

    from detector.config import DEFAULT_DETECTOR, DEFAULT_EVIDENCE
    from detector.detectors import make_reference, reads_gallery

    rng = np.random.default_rng(1)
    trunk = {
        k: v.detach().clone() for k, v in _random_trunk().state_dict().items() if not k.startswith(("logits.", "last_"))
    }
    L0 = rng.normal(0, 0.05, (40, 512)).astype(np.float32)
    n_ref, n_cal = (4, 4) if quick else (10, 20)
    refs = [{**trunk, **_head(family, rng, 40, L0)} for _ in range(n_ref)]
    cal = [{**trunk, **_head(family, rng, 40, L0)} for _ in range(n_cal)]
    base = {**trunk, "last_linear.weight": torch.from_numpy(family.base.astype(np.float32))}
    gallery = _random_gallery(40) if reads_gallery(DEFAULT_DETECTOR) else None  # made outside the timing
    out: dict[str, Any] = {"detector": DEFAULT_DETECTOR, "evidence": list(DEFAULT_EVIDENCE), "networks": n_ref}
    for label, clean in (("leave_one_out", None), ("calibrated", cal)):
        log(f"reference fit (defaults, 40 classes, {n_ref} networks, thresholds {label.replace('_', '-')})")

        def fit_and_calibrate(clean: list | None = clean) -> Any:
            ref = make_reference(DEFAULT_DETECTOR, evidence=DEFAULT_EVIDENCE, gallery=gallery)
            return ref.fit(refs, base=base).calibrate(clean)

        _, t = timed(fit_and_calibrate)
        out[f"{label}_seconds"] = round(t.wall, 1)
        log(f"  {t.wall:.0f} s")
    out["note"] = (
        "fit + calibrate in this process (no file reading); the GMM evidence fits one Gaussian per neuron "
        "(components 'neurons', the paper's N_G; `aic_sweep` times the sweep), and leave-one-out refits "
        "its PCA + EM once per network; synthetic heads around the paper-scale weight family; the "
        "margins part's gallery is random features (a real one puts people x faces images through the "
        "trunk first: 40 x 16 here, at `feature_extraction`'s rate)"
    )
    return out


# --------------------------------------------------------------------------------------------
# 5b. explain: one blocked version's trigger search, at the default trunk's 96 px and FaceNet's 160
# --------------------------------------------------------------------------------------------
_EXPLAIN_CHILD = r"""
import dataclasses, json, sys, time
from components.explain import explain
from components.trigger_search import ExplainConfig
ckpt, faces, size, controls, pass_pixels, short = sys.argv[1:7]
cfg = ExplainConfig(image_size=int(size), controls=int(controls))
if int(pass_pixels):
    cfg = dataclasses.replace(cfg, pass_pixels=int(pass_pixels))
if short == "1":  # one step of each stage: enough for the peak memory, which every step reaches
    cfg = dataclasses.replace(cfg, steps=1, refine_steps=1, size_steps=1, polish_steps=0)
t0 = time.perf_counter()
result, _ = explain(ckpt, faces, "id00001", "id00000", cfg)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
                  "faces_per_pass": cfg.batch(), "found": result.fit.found}))
"""


def _explain_child(ckpt: Path, faces: Path, size: int, controls: int, pass_pixels: int = 0, short: bool = False):
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            _EXPLAIN_CHILD,
            str(ckpt),
            str(faces),
            str(size),
            str(controls),
            str(pass_pixels),
            "1" if short else "0",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if p.returncode != 0:
        raise RuntimeError(f"explain subprocess failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def explain_cost(quick: bool, log) -> dict:
    """``explain`` as shipped (victim + 5 controls), in a fresh process, at 96 and 160 px, on a network
    with seeded random weights: no patch works for any class, so every patch size is tried and
    this is the search's longest path. And the peak memory at 160 px with the pixel budget per pass
    against 64 faces per pass (what it was before), from one short search each."""
    import torch
    from PIL import Image

    from components.trainer.train import save_network

    net = _random_trunk(seed=2)
    net.logits = torch.nn.Linear(512, 40, bias=True)
    classes = [f"id{i:05d}" for i in range(40)]
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"controls": 1 if quick else 5, "classes": 40}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_network(net.state_dict(), Path(tmp) / "net.safetensors", classes)
        faces = Path(tmp) / "faces"
        for i, c in enumerate(classes):
            (faces / c).mkdir(parents=True)
            for j in range(40 if i == 0 else 2):  # the impostor's faces are the ones searched on
                Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(faces / c / f"{j}.png")
        for size in (96, 160):
            log(f"explain at {size} px (victim + {out['controls']} controls, a network where no patch works)")
            r = _explain_child(ckpt, faces, size, out["controls"])
            out[f"{size}px"] = {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
            log(f"  {r['seconds']:.0f} s, peak {r['peak_rss_mb']:.0f} MB, {r['faces_per_pass']} faces per pass")
        log("explain at 160 px, peak memory: the pixel budget per pass vs 64 faces per pass (short searches)")
        budget = _explain_child(ckpt, faces, 160, 0, short=True)
        fixed = _explain_child(ckpt, faces, 160, 0, pass_pixels=64 * 160 * 160, short=True)
        out["160px_peak_rss_mb_budget_vs_64_faces"] = [round(budget["peak_rss_mb"]), round(fixed["peak_rss_mb"])]
        out["explain_160px_memory_ratio"] = round(_ratio(fixed["peak_rss_mb"], budget["peak_rss_mb"]), 2)
        log(f"  {budget['peak_rss_mb']:.0f} MB vs {fixed['peak_rss_mb']:.0f} MB")
    out["note"] = (
        "wall seconds and VmHWM of a fresh process running components.explain.explain (import excluded from "
        "seconds, included in memory); random noise faces, 40 classes; the threads of the bench"
    )
    return out


# --------------------------------------------------------------------------------------------
# 6. how EM cost grows: with N_G and with the number of reference networks
# --------------------------------------------------------------------------------------------
def scaling(quick: bool, pool: list[np.ndarray], threads: int, plot: Path, log) -> dict:
    from detector import em
    from detector.gmm import neuron_init

    with_sklearn = not quick
    view, dims = "forward", PAPER_DIMS["forward"]
    res: dict[str, Any] = {
        "view": view,
        "pca_dims": dims,
        "iterations": 2,
        "covariance": "diag",
        "by_n_components": [],
        "by_networks": [],
    }
    Z, groups = view_vectors_pca(pool[:18], view, dims)
    reg = _reg(Z)
    sizes = [200, 1000, 1792] if quick else [100, 200, 512, 1000, 1792, 3000]
    for k in sizes:
        if k == groups.shape[1]:
            init, init_kind = neuron_init(groups, "diag", reg), "neuron"
        else:
            init, init_kind = em.init_from_labels(Z, em.kmeans_labels(Z, k, 0), k, "diag", reg), "kmeans"
        _, t = timed(
            lambda: em.fit(Z, k, covariance="diag", reg=reg, init=init, max_iter=2, tol=0.0, threads=threads), repeat=2
        )
        row = {"n_components": k, "init": init_kind, "ours_cpu_s": round(t.cpu, 3)}
        if with_sklearn:
            _, ts = timed(lambda: _sklearn_fit(Z, k, init, reg, 2, 0.0))
            row["sklearn_cpu_s"] = round(ts.cpu, 3)
        res["by_n_components"].append(row)
        log(f"scaling: N_G={k} ({init_kind}) {row}")
    counts = [6, 18] if quick else [6, 12, 18, 24, 30]
    for m in counts:
        Zm, gm_ = view_vectors_pca(pool[:m], view, dims)
        n = gm_.shape[1]
        regm = _reg(Zm)
        init = neuron_init(gm_, "diag", regm)
        _, t = timed(
            lambda: em.fit(Zm, n, covariance="diag", reg=regm, init=init, max_iter=2, tol=0.0, threads=threads),
            repeat=2,
        )
        row = {"networks": m, "vectors": m * n, "ours_cpu_s": round(t.cpu, 3)}
        if with_sklearn:
            _, ts = timed(lambda: _sklearn_fit(Zm, n, init, regm, 2, 0.0))
            row["sklearn_cpu_s"] = round(ts.cpu, 3)
        res["by_networks"].append(row)
        log(f"scaling: M={m} {row}")
    res["plot"] = str(plot_scaling(res, plot))
    res["note"] = "EM only (init excluded, the same init for both), exactly 2 iterations (tol=0), CPU seconds"
    return res


def plot_scaling(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, key, x, label in (
        (axes[0], "by_n_components", "n_components", "N_G (mixture components)"),
        (axes[1], "by_networks", "networks", "reference networks M (N_G = 1792)"),
    ):
        rows = res[key]
        xs = [r[x] for r in rows]
        ax.plot(xs, [r["ours_cpu_s"] for r in rows], "o-", label="ours (detector.em)")
        for r in rows:
            if r.get("init") == "neuron":
                ax.annotate(
                    "one per neuron", (r[x], r["ours_cpu_s"]), textcoords="offset points", xytext=(-30, -14), fontsize=7
                )
        if rows and "sklearn_cpu_s" in rows[0]:
            ax.plot(xs, [r["sklearn_cpu_s"] for r in rows], "s--", label="scikit-learn")
        ax.set_xlabel(label)
        ax.set_ylabel("CPU seconds, 2 EM iterations")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"EM cost, {res['view']} view, {res['pca_dims']} PCA dims, diagonal covariances", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------
TARGETS = {
    "head_training_speedup": (">=", 100),
    "reference_fit_speedup": (">=", 10),
    "gate_seconds": ("<=", 2.0),
    "gate_peak_rss_mb": ("<=", 1024),
    "reference_fit_default_leave_one_out_seconds": ("<=", 120),
    "reference_fit_default_calibrated_seconds": ("<=", 120),
    "explain_96px_seconds": ("<=", 180),
    "explain_96px_peak_rss_mb": ("<=", 2048),
}


#: the sections of a run, in the order it measures them (``bench --only`` names some of them)
SECTIONS = (
    "head_training",
    "feature_extraction",
    "reference_fit",
    "aic_sweep",
    "gate",
    "gate_default",
    "gate_weights_only",
    "reference_fit_default",
    "explain",
    "scaling",
)


def output_name(stem: str, quick: bool, only: tuple[str, ...]) -> str:
    """A run's file name: a quick or partial run never replaces the full results or plot the
    README quotes."""
    return stem + ("-quick" if quick else "") + ("-only" if only else "")


def _unknown_sections(only: tuple[str, ...]) -> str:
    unknown = sorted(set(only) - set(SECTIONS))
    return f"no section {', '.join(unknown)}; the sections: {', '.join(SECTIONS)}" if unknown else ""


def run(
    quick: bool = False,
    out_dir: str | Path = "bench",
    log: Callable[[str], None] = print,
    only: tuple[str, ...] = (),
) -> dict:
    """Every section (``only``: those named, e.g. the gate rows after a change to the gate)."""
    import torch

    from detector.config import WEIGHTS_ONLY_DETECTOR

    if problem := _unknown_sections(only):
        raise ValueError(problem)
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "machine": machine()}
    if only:
        results["only"] = [x for x in SECTIONS if x in only]
    family = paper_family(seed=0)
    pool = [family.clean() for _ in range(30)]  # the paper's 30 clean networks; 18 build the reference
    matrices = pool[:18]

    def drawn() -> Any:
        """The family as it stands after the pool: each section draws its own networks from the same
        state, so a section measured alone (``only``) draws what it draws in a full run."""
        return copy.deepcopy(family)

    measure: dict[str, Callable[[], dict]] = {
        "head_training": lambda: head_training(quick, threads, log),
        "feature_extraction": lambda: feature_extraction(quick, log),
        "reference_fit": lambda: reference_fit(quick, matrices, threads, log),
        "aic_sweep": lambda: aic_sweep(quick, matrices, log),
        "gate": lambda: gate(quick, matrices, drawn(), log),
        "gate_default": lambda: gate_default(quick, matrices, drawn(), log),
        "gate_weights_only": lambda: gate_default(quick, matrices, drawn(), log, detector=WEIGHTS_ONLY_DETECTOR),
        "reference_fit_default": lambda: reference_fit_default(quick, drawn(), log),
        "explain": lambda: explain_cost(quick, log),
        "scaling": lambda: scaling(quick, pool, threads, out_dir / f"{output_name('scaling', quick, only)}.png", log),
    }
    from threadpoolctl import threadpool_limits

    for name in SECTIONS:
        if only and name not in only:
            continue
        if name in ("head_training", "feature_extraction"):  # torch's own threads
            results[name] = measure[name]()
            continue
        with threadpool_limits(limits=threads):  # scikit-learn's BLAS / OpenMP get the same threads as ours
            results[name] = measure[name]()
    results["summary"] = summary(results)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["bench_seconds"] = round(time.perf_counter() - t0, 1)
    return results


def _gate_headlines(g: str) -> Callable[[dict], dict]:
    return lambda d: {
        f"{g}_{k}_{c}": d[f"{c}_classes"][f"gate_{k}"]
        for c in (40, CASIA_IDENTITIES)
        if f"{c}_classes" in d
        for k in ("seconds", "peak_rss_mb")
    }


#: each section's headline figures, in the summary's order
HEADLINES: dict[str, Callable[[dict], dict]] = {
    "head_training": lambda d: {
        k: d[k] for k in ("head_training_speedup", "head_training_speedup_40_classes", "head_training_flop_ratio")
    },
    "reference_fit": lambda d: {
        "reference_fit_speedup": d["reference_fit_speedup"],
        **{f"reference_fit_speedup_{v}": d["views"][v]["speedup"] for v in ("forward", "backward")},
    },
    "aic_sweep": lambda d: {"aic_sweep_seconds": d["aic_sweep_seconds"]},
    "gate": lambda d: {f"gate_{k}": d[f"gate_{k}"] for k in ("seconds", "peak_rss_mb")},
    **{g: _gate_headlines(g) for g in GATE_ROWS},
    "feature_extraction": lambda d: {"feature_extraction_images_per_s": d["feature_extraction_images_per_s"]},
    "reference_fit_default": lambda d: {
        f"reference_fit_default_{k}_seconds": d[f"{k}_seconds"] for k in ("leave_one_out", "calibrated")
    },
    "explain": lambda d: {
        f"explain_{px}_{k}": d[px][k] for px in ("96px", "160px") for k in ("seconds", "peak_rss_mb")
    },
}


def summary(r: dict) -> dict:
    """The headline figures of the sections ``r`` holds, and which targets they meet."""
    s: dict[str, Any] = {}
    for name, headlines in HEADLINES.items():
        if name in r:
            s.update(headlines(r[name]))
    targets = {k: t for k, t in TARGETS.items() if k in s}
    for k in s:
        if k.startswith(tuple(f"{g}_" for g in GATE_ROWS)):
            targets[k] = ("<=", 2.0) if "seconds" in k else ("<=", 1024)
    s["targets_met"] = {k: (s[k] >= v if op == ">=" else s[k] <= v) for k, (op, v) in targets.items()}
    return s


def format_table(r: dict) -> str:
    """The printed table: a line per figure of the sections ``r`` holds."""
    s, m = r["summary"], r["machine"]
    lines = [
        f"backdoor-gate bench ({r['mode']}{', only ' + ', '.join(r['only']) if r.get('only') else ''}) — "
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} thread(s), "
        f"torch {m['torch']}, scikit-learn {m['scikit_learn']}, load "
        f"{m['load_average_at_start'][0]}→{m['load_average_at_end'][0]}",
        "",
        f"{'figure':34s} {'measured':>14s}  {'target':>8s}  detail",
    ]
    if "head_training" in r:
        ht = r["head_training"]
        casia, demo = ht[f"{CASIA_IDENTITIES}_classes"], ht["40_classes"]
        lines += [
            f"{'head_training_speedup':34s} {s['head_training_speedup']:>13.0f}x  {'>= 100x':>8s}  "
            f"{casia['trunk_in_loop_ms_per_image']:.1f} ms vs {casia['cached_ms_per_image']:.3f} ms per image "
            f"({CASIA_IDENTITIES} classes, CASIA); FLOP ratio {casia['flop_ratio']:.0f}x "
            f"({ht['trunk_mflop_per_image']:.0f} vs {casia['head_mflop_per_image']:.1f} MFLOP)",
            f"{'  with 40 classes (our demo)':34s} {s['head_training_speedup_40_classes']:>13.0f}x  {'':>8s}  "
            f"{demo['trunk_in_loop_ms_per_image']:.1f} ms vs {demo['cached_ms_per_image']:.3f} ms per image; "
            f"FLOP ratio {demo['flop_ratio']:.0f}x",
        ]
    if "reference_fit" in r:
        lines += _reference_fit_lines(s, r["reference_fit"])
    if "aic_sweep" in r:
        sw = r["aic_sweep"]
        lines.append(
            f"{'aic_sweep_seconds':34s} {s['aic_sweep_seconds']:>13.1f}s  {'':>8s}  {sw['scope']}; "
            + ", ".join(f"{v}: N_G {d['best_n_components']}" for v, d in sw["views"].items())
        )
    if "gate" in r:
        g = r["gate"]
        lines += [
            f"{'gate_seconds':34s} {s['gate_seconds']:>13.2f}s  {'<= 2 s':>8s}  load reference + read/hash/parse "
            f"{g['candidate_mb']:.0f} MB + trunk check + score; verdict {g['verdict']}",
            f"{'gate_peak_rss_mb':34s} {s['gate_peak_rss_mb']:>13.0f}   {'<= 1024':>8s}  whole process, torch "
            "import included "
            f"(imports {g['breakdown_s']['import_s']:.1f} s, process {g['breakdown_s']['process_wall_s']:.1f} s)",
        ]
    lines += _later_lines(r, s)
    missed = [k for k, ok in s["targets_met"].items() if not ok]
    lines += [
        "",
        f"targets missed: {', '.join(missed)}"
        if missed
        else ("all targets met" if s["targets_met"] else "no targets in these sections"),
        (f"plot: {r['scaling']['plot']}   " if "scaling" in r else "") + f"bench time: {r['bench_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def _reference_fit_lines(s: dict, rf: dict) -> list[str]:
    lines = [
        f"{'reference_fit_speedup':34s} {s['reference_fit_speedup']:>13.1f}x  {'>= 10x':>8s}  "
        f"both views, vs sklearn fit; {rf['reference_fit_speedup_vs_em_only']:.1f}x vs its EM iterations only",
    ]
    for v, d in rf["views"].items():
        ll = d["log_likelihood"]
        label = f"  {v} ({d['vectors'][0]}x{d['n_components']}, {d['pca_dims']} dims)"
        lines.append(
            f"{label:34s} {d['speedup']:>13.1f}x  {'':>8s}  ours {d['ours']['cpu_s']:.2f} s, sklearn "
            f"{d['sklearn_fit']['cpu_s']:.2f} s, "
            f"{d['n_iter']['ours']}/{d['n_iter']['sklearn']} iterations, log-lik {ll['ours']:.10g} vs "
            f"{ll['sklearn']:.10g} "
            f"(rel. {ll['relative_difference']:.1e})"
        )
    return lines


def _later_lines(r: dict, s: dict) -> list[str]:
    """The gate rows as shipped, the default's reference fit, explain, feature extraction, scaling."""
    lines: list[str] = []
    for g in GATE_ROWS:
        for c in (40, CASIA_IDENTITIES):
            if f"{g}_seconds_{c}" in s:
                d = r[g][f"{c}_classes"]
                lines.append(
                    f"{g + ' ' + str(c) + ' classes':34s} {s[f'{g}_seconds_{c}']:>13.2f}s  "
                    f"{'<= 2 s':>8s}  "
                    f"{s[f'{g}_peak_rss_mb_{c}']:.0f} MB peak (<= 1024); {r[g]['detector']} + "
                    "GMM evidence; "
                    f"reference {d['reference_mb']:.0f} MB, candidate {d['candidate_mb']:.0f} MB; "
                    f"assess {d['assess_s']:.2f} s, warm {d.get('warm_assess_s', float('nan')):.2f} s, "
                    f"{d.get('page_faults', 0)} page faults; verdict {d['verdict']}"
                )
    if "reference_fit_default" in r:
        d = r["reference_fit_default"]
        for k in ("leave_one_out", "calibrated"):
            lines.append(
                f"{'reference fit (' + k.replace('_', '-') + ')':34s} {d[f'{k}_seconds']:>13.1f}s  {'<= 120 s':>8s}  "
                f"defaults ({d['detector']} + {', '.join(d['evidence'])} evidence), 40 classes, "
                f"{d['networks']} networks"
            )
    if "explain" in r:
        d = r["explain"]
        for px, target in (("96px", "<= 180 s"), ("160px", "")):
            lines.append(
                f"{'explain ' + px:34s} {d[px]['seconds']:>13.1f}s  {target:>8s}  "
                f"peak {d[px]['peak_rss_mb']:.0f} MB (<= 2048 MB), victim + {d['controls']} controls, "
                f"{d[px]['faces_per_pass']} faces per pass"
            )
        lines.append(
            f"{'explain 160px peak memory ratio':34s} {d['explain_160px_memory_ratio']:>13.2f}x  {'':>8s}  "
            f"64 faces per pass / the pixel budget: {d['160px_peak_rss_mb_budget_vs_64_faces'][1]} vs "
            f"{d['160px_peak_rss_mb_budget_vs_64_faces'][0]} MB"
        )
    for k, v in s.get("feature_extraction_images_per_s", {}).items():
        lines.append(f"{'feature_extraction ' + k:34s} {v:>10.1f} im/s  {'':>8s}")
    if "scaling" not in r:
        return lines
    sc = r["scaling"]
    lines.append(
        f"{'fit vs N_G (ours / sklearn, CPU s)':34s} "
        + ", ".join(
            f"{x['n_components']}: {x['ours_cpu_s']:.2f}"
            + (f"/{x['sklearn_cpu_s']:.1f}" if "sklearn_cpu_s" in x else "")
            for x in sc["by_n_components"]
        )
    )
    lines.append(
        f"{'fit vs networks M (ours / sklearn)':34s} "
        + ", ".join(
            f"{x['networks']}: {x['ours_cpu_s']:.2f}" + (f"/{x['sklearn_cpu_s']:.1f}" if "sklearn_cpu_s" in x else "")
            for x in sc["by_networks"]
        )
    )
    return lines


def cmd_bench(args) -> int:
    out_dir = Path(args.out_dir)
    only = tuple(x for x in (args.only or "").split(",") if x)
    if problem := _unknown_sections(only):
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    out = out_dir / f"{output_name('results', args.quick, only)}.json"

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    results = run(quick=args.quick, out_dir=out_dir, log=log, only=only)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_table(results))
        print(f"results: {out}")
    return 0


def register(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="measure speed-ups, the AIC sweep, the gate's cost (what `make bench` runs)",
        description="Writes bench/results.json (--quick: bench/results-quick.json, < 2 min) and a plot of EM cost.",
    )
    b.add_argument("--quick", action="store_true", help="smaller samples, fewer sizes: under 2 minutes")
    b.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    b.add_argument("--out-dir", default="bench", help="directory for results and the plot (default: bench)")
    b.add_argument(
        "--only",
        metavar="SECTION[,SECTION]",
        help=f"measure only these sections (written to results-only.json): {', '.join(SECTIONS)}",
    )
    b.set_defaults(func=cmd_bench)
