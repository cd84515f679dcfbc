"""The trigger search: a square patch on a grid, then its pattern optimised so that faces
wearing it are classified as the target class, smallest patch size first.

Why a patch and not Neural Cleanse's free mask with an L1 penalty: on our faces the free mask
finds diffuse adversarial noise over the whole face, on clean and backdoored networks alike
(issue 22's quick try); a patch searched over positions found the trigger where it did not.
The same search for a few control classes gives Neural Cleanse's anomaly index
(:func:`anomaly_index`), an input-space opinion beside the weight-space verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class ExplainConfig:
    """How the trigger is searched for (chosen on development networks, see lab/explain.py)."""

    image_size: int = 96  # the trunk's input size (the default trunk is pre-trained at 96 px)
    locate_size: float = 0.2  # patch side (fraction of the width) while looking for where the trigger is
    grid: int = 5  # grid x grid candidate positions
    steps: int = 5  # pattern optimisation steps at every grid position
    locate_faces: int = 4  # faces the grid is scored on
    refine_steps: int = 10  # steps at the best position and its half-grid-step neighbours
    #: patch side as a fraction of the image width, tried smallest first until one works
    sizes: tuple[float, ...] = (0.1, 0.15, 0.2, 0.3)
    size_steps: int = 10  # steps per size
    polish_steps: int = 10  # more steps once a size works
    faces: int = 8  # faces the pattern is optimised on
    validation: int = 8  # faces that say whether a size works (never optimised on)
    heldout: int = 16  # faces the reconstructed attack success is measured on (never optimised on nor judged by)
    #: control classes for the anomaly index (with 3, one control that a patch as small as the
    #: victim's can reach already pulls the median down: seen on development)
    controls: int = 5
    control_faces: int = 4  # faces per control search (cheaper than the victim's)
    asr_target: float = 0.8  # a patch "works" when this share of faces is sent to the class
    lr: float = 0.1
    seed: int = 0
    #: pixels per forward/backward pass (64 faces at 96 px): the activations kept for the backward
    #: pass grow with the image's area, so at 160 px a pass holds 23 faces and peak memory stays
    #: where it is at 96 px instead of doubling
    pass_pixels: int = 64 * 96 * 96

    def batch(self) -> int:
        """Faces per forward/backward pass at ``image_size``."""
        return max(1, self.pass_pixels // (self.image_size * self.image_size))


@dataclass
class PatchFit:
    """The best square patch for one class: where, how big, its pattern and how well it works."""

    target: int
    size_px: int
    x0: int
    y0: int
    pattern: torch.Tensor  # (3, p, p) in FaceNet's normalised pixel space [-1, 1]
    loss: float
    asr: float  # on the faces it was optimised on
    found: bool  # asr >= target at some size
    image_size: int
    tried: list[dict] = field(default_factory=list)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.x0 + self.size_px / 2) / self.image_size, (self.y0 + self.size_px / 2) / self.image_size)

    @property
    def area(self) -> float:
        return (self.size_px / self.image_size) ** 2


def paste(x: torch.Tensor, patterns: torch.Tensor, positions: list[tuple[int, int]], p: int) -> torch.Tensor:
    """(k*n, 3, S, S): each of the k patterns pasted at its position on every one of the n faces."""
    k, n = len(positions), x.shape[0]
    xs = x.unsqueeze(0).expand(k, *x.shape).clone()
    for i, (x0, y0) in enumerate(positions):
        xs[i, :, :, y0 : y0 + p, x0 : x0 + p] = patterns[i].unsqueeze(0).expand(n, 3, p, p)
    return xs.reshape(k * n, *x.shape[1:]).contiguous(memory_format=torch.channels_last)


def _fit(
    net,
    x: torch.Tensor,
    target: int,
    p: int,
    positions: list[tuple[int, int]],
    init: torch.Tensor | None,
    steps: int,
    config: ExplainConfig,
    tick: Callable[[], None],
    away: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """Optimise one pattern per position; returns the patterns (tanh space) and final losses.

    ``away``: move the faces off class ``target`` to any other (loss −log(1 − p_target)) instead
    of onto it: a sweep over sources, where the victim is not known."""
    k, n = len(positions), x.shape[0]
    raw = (init.clone() if init is not None else torch.zeros(k, 3, p, p)).requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=config.lr)
    chunk = max(1, config.batch() // n)
    y = torch.full((n,), target, dtype=torch.long)
    losses = np.zeros(k)
    for _ in range(steps):
        opt.zero_grad()
        for s in range(0, k, chunk):
            idx = list(range(s, min(k, s + chunk)))
            out = net(paste(x, torch.tanh(raw[idx]), [positions[i] for i in idx], p))
            if away:
                others = torch.cat([out[:, :target], out[:, target + 1 :]], 1)
                loss = (torch.logsumexp(out, 1) - torch.logsumexp(others, 1)).view(len(idx), n)
            else:
                loss = torch.nn.functional.cross_entropy(out, y.repeat(len(idx)), reduction="none").view(len(idx), n)
            losses[idx] = loss.mean(1).detach().numpy()
            loss.mean(1).sum().backward()
        opt.step()
        tick()
    return raw.detach(), losses


@torch.inference_mode()
def predict(net, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    return np.concatenate([net(x[i : i + batch]).argmax(1).numpy() for i in range(0, len(x), batch)])


def patch_pixels(size: float, S: int) -> int:
    """A patch's side in whole pixels for ``size`` (a fraction of the width) on ``S``-px images;
    results report ``round(patch_pixels(size, S) / S, 4)``, not ``size``."""
    return max(2, int(round(size * S)))


def smallest_patch_fires(found: bool, size_px: int, S: int, sizes: tuple[float, ...]) -> bool:
    """The size rule, an input-space opinion: a patch of the smallest size tried already sends
    the validation faces to the class. A backdoor's trigger is small by design; on our faces a
    clean network's most deviant class needed 0.15 of the width or more (docs/explain)."""
    return bool(found) and size_px <= patch_pixels(min(sizes), S)


def _grid(S: int, p: int, g: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, S - p, g)})


def _centred(c: tuple[float, float], p: int, S: int) -> tuple[int, int]:
    """Top-left corner of a p-px patch centred on ``c`` (pixels), kept inside the image."""
    return int(np.clip(round(c[0] - p / 2), 0, S - p)), int(np.clip(round(c[1] - p / 2), 0, S - p))


def search(
    net,
    x: torch.Tensor,
    target: int,
    config: ExplainConfig,
    n_faces: int,
    tick: Callable[[], None] = lambda: None,
    x_val: torch.Tensor | None = None,
) -> PatchFit:
    """The smallest square patch that sends ``x``'s faces to ``target``, in three steps:

    1. *locate*: a patch of ``locate_size`` at every grid position, its pattern optimised for
       ``steps`` steps on ``locate_faces`` faces; the lowest loss wins;
    2. *refine*: the winner and its neighbours half a grid step away, from its pattern, for
       ``refine_steps`` steps on ``n_faces`` faces;
    3. *size*: patches of ``sizes`` (smallest first) centred there, each optimised afresh for
       ``size_steps`` steps, until one sends ``asr_target`` of the faces to the class.

    With ``x_val`` a size "works" when it sends the *validation* faces (never optimised on) to
    the class: judged on the few faces a pattern was fitted to, patches for random control classes
    "worked" at 0.15–0.2 of the width on development networks (adversarial, not a backdoor).
    """
    S = x.shape[-1]
    x = x[:n_faces]
    p = patch_pixels(config.locate_size, S)
    grid = _grid(S, p, config.grid)
    positions = [(a, b) for b in grid for a in grid]
    raw, losses = _fit(net, x[: config.locate_faces], target, p, positions, None, config.steps, config, tick)
    i = int(np.argmin(losses))
    half = max(1, (grid[1] - grid[0]) // 2 if len(grid) > 1 else 1)
    x0, y0 = positions[i]
    near = [(x0, y0)] + [
        (int(np.clip(x0 + dx, 0, S - p)), int(np.clip(y0 + dy, 0, S - p)))
        for dx, dy in ((-half, 0), (half, 0), (0, -half), (0, half))
    ]
    near = list(dict.fromkeys(near))
    init = raw[i].unsqueeze(0).expand(len(near), 3, p, p)
    _, losses2 = _fit(net, x, target, p, near, init, config.refine_steps, config, tick)
    j = int(np.argmin(losses2))
    centre = (near[j][0] + p / 2, near[j][1] + p / 2)
    best: PatchFit | None = None
    tried = []
    for size in sorted(config.sizes):
        q = patch_pixels(size, S)
        pos = _centred(centre, q, S)
        judge = x if x_val is None or not len(x_val) else x_val
        raw3, loss, asr = fit_size(net, x, judge, target, q, pos, config, tick)
        found = asr >= config.asr_target
        best = PatchFit(target, q, pos[0], pos[1], torch.tanh(raw3[0]), loss, asr, found, S)
        tried.append({"size": round(q / S, 4), "loss": round(best.loss, 4), "asr": asr})
        if found:
            break
    assert best is not None
    best.tried = tried
    return best


def fit_size(
    net,
    x: torch.Tensor,
    judge: torch.Tensor,
    target: int,
    q: int,
    pos: tuple[int, int],
    config: ExplainConfig,
    tick: Callable[[], None] = lambda: None,
) -> tuple[torch.Tensor, float, float]:
    """A ``q``-px patch at ``pos`` fitted afresh towards ``target`` on ``x``, and polished once it
    sends ``asr_target`` of ``judge`` there (a few more steps make it hold on faces it never
    saw); returns its pattern (tanh space), final loss and success on ``judge``."""
    raw, losses = _fit(net, x, target, q, [pos], None, config.size_steps, config, tick)
    asr = success(net, judge, raw, pos, q, target)
    if asr >= config.asr_target and config.polish_steps:
        raw, losses = _fit(net, x, target, q, [pos], raw, config.polish_steps, config, tick)
        asr = success(net, judge, raw, pos, q, target)
    return raw, float(losses[0]), asr


def success(net, x: torch.Tensor, raw: torch.Tensor, pos: tuple[int, int], q: int, target: int) -> float:
    """Share of ``x`` that one pattern (tanh space) pasted at ``pos`` sends to ``target``."""
    return float(np.mean(predict(net, paste(x, torch.tanh(raw[:1]), [pos], q)) == target))


def search_ticks(config: ExplainConfig) -> int:
    """Optimisation steps one search takes at most (for the progress bar)."""
    return config.steps + config.refine_steps + len(config.sizes) * config.size_steps + config.polish_steps


def anomaly_index(victim_area: float, control_areas: list[float]) -> float:
    """Neural Cleanse's anomaly index of the victim's mask area among all the classes searched:
    (median − victim) / (1.4826 · MAD), positive when the victim's mask is smaller.

    With a handful of classes the MAD can be zero (every control needed the same patch size);
    it is then floored at a tenth of the median, so the index stays finite and says "much smaller".
    """
    areas = np.array([victim_area, *control_areas], dtype=np.float64)
    med = float(np.median(areas))
    mad = 1.4826 * float(np.median(np.abs(areas - med)))
    return float((med - victim_area) / max(mad, 0.1 * med, 1e-12))
