"""The base network: FaceNet's frozen trunk plus the head fine-tuning starts from.

Real use: ``--base PATH`` loads a local state dict (e.g. ``20180408-102900-casia-webface.pt``
that users download themselves) with ``torch.load(weights_only=True)``. Nothing is ever
downloaded. Without a file we build a *default base* by a short, seeded pre-training of the
whole network on generated identities disjoint from the fine-tuning ones: a random trunk's
features are tiny and correlated, and on them detection becomes trivially easy (shared
findings), so a pre-trained trunk is what makes our numbers mean something. It is built once,
cached content-addressed by its config, and reused by every command.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FINETUNED = ("last_linear.", "last_bn.", "logits.")


@dataclass(frozen=True)
class TrunkConfig:
    """How the default base is pre-trained (the cache key is this whole config)."""

    image_size: int = 96  # the trunk is fully convolutional; 96 px costs a fraction of 160 px
    identities: int = 100
    images_per_identity: int = 40
    first_identity: int = 100_000  # disjoint from fine-tuning identities (which start at 0)
    steps: int = 220
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    synth_seed: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("BACKDOOR_GATE_CACHE", Path.home() / ".cache" / "backdoor-gate"))


def new_network(num_classes: int = 2):
    """InceptionResnetV1 with a classifier and no dropout (dropout on cached features hurt)."""
    from facenet_pytorch import InceptionResnetV1

    return InceptionResnetV1(classify=True, num_classes=num_classes, dropout_prob=0.0)


def load_base(path: str | Path) -> dict[str, torch.Tensor]:
    """A user's state dict, read safely; the (dataset-specific) ``logits`` are dropped."""
    from detector.errors import InvalidCheckpoint
    from detector.weights import read_tensors

    tensors, _ = read_tensors(path)
    missing = [k for k in ("last_linear.weight", "last_bn.weight", "conv2d_1a.conv.weight") if k not in tensors]
    if missing:
        raise InvalidCheckpoint(path, f"not an InceptionResnetV1 state dict (missing {', '.join(missing)})")
    net = new_network()
    sd = {k: v for k, v in tensors.items() if not k.startswith("logits.")}
    result = net.load_state_dict(sd, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    absent = [k for k in result.missing_keys if not k.startswith("logits.")]
    if unexpected or absent:
        raise InvalidCheckpoint(
            path, f"state dict does not fit InceptionResnetV1 (missing {absent[:3]}, unexpected {unexpected[:3]})"
        )
    return {k: v for k, v in net.state_dict().items() if not k.startswith("logits.")}


def trunk_features(net, x: torch.Tensor) -> torch.Tensor:
    """The 1792-d pooled features that ``last_linear`` sees (InceptionResnetV1.forward, cut short)."""
    for name in (
        "conv2d_1a",
        "conv2d_2a",
        "conv2d_2b",
        "maxpool_3a",
        "conv2d_3b",
        "conv2d_4a",
        "conv2d_4b",
        "repeat_1",
        "mixed_6a",
        "repeat_2",
        "mixed_7a",
        "repeat_3",
        "block8",
        "avgpool_1a",
    ):
        x = getattr(net, name)(x)
    return x.flatten(1)


def to_tensor(images, image_size: int) -> torch.Tensor:
    """PIL images -> normalised batch ((x - 127.5) / 128, FaceNet's fixed standardisation)."""
    from PIL import Image

    arrs = [
        np.asarray(im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.float32)
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    return ((x - 127.5) / 128.0).contiguous(memory_format=torch.channels_last)


def fixture_base(seed: int = 0, images=None, image_size: int = 80) -> dict[str, torch.Tensor]:
    """Random init + BatchNorm statistics re-estimated on ``images``: a fast stand-in for unit tests only."""
    torch.manual_seed(seed)
    net = new_network()
    if images:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        net.train()
        with torch.no_grad():
            for i in range(0, len(images), 32):
                trunk_features(net, to_tensor(images[i : i + 32], image_size))
    net.eval()
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("logits.")}


def default_base(config: TrunkConfig = TrunkConfig(), progress=None, log=print) -> Path:
    """Path of the cached default base (a safetensors state dict), building it if absent."""
    from safetensors.torch import save_file

    from components.trainer.synth import SynthConfig, synthesize

    out = cache_dir() / "trunks" / f"default-{config.key()}.safetensors"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = cache_dir() / "data" / f"pretrain-{config.key()}"
    synth = SynthConfig(
        identities=config.identities,
        images_per_identity=config.images_per_identity,
        seed=config.synth_seed,
        first_identity=config.first_identity,
    )
    log(
        f"building the default base trunk once ({config.steps} steps on {config.identities} generated "
        f"identities); cached at {out}"
    )
    synthesize(data, synth)
    sd = pretrain(data, config, progress=progress, log=log)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")  # two builders never write one file
    save_file(sd, str(tmp), metadata={"trunk_config": json.dumps(asdict(config))})
    os.replace(tmp, out)
    return out


def pretrain(data_dir: str | Path, config: TrunkConfig, progress=None, log=print) -> dict[str, torch.Tensor]:
    """Seeded full-network training on a face folder; returns the state dict without logits."""
    from PIL import Image

    from components.trainer.synth import list_images

    items, classes = list_images(data_dir)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = new_network(len(classes)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
    net.train()
    t0, order, pos = time.perf_counter(), rng.permutation(len(items)), 0
    for step in range(config.steps):
        if pos + config.batch_size > len(order):
            order, pos = rng.permutation(len(items)), 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        imgs: list[Image.Image] = [Image.open(items[i][0]) for i in idx]
        if rng.random() < 0.5:
            imgs = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in imgs]
        x = to_tensor(imgs, config.image_size)
        y = torch.tensor([items[i][1] for i in idx])
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
        elif step % 20 == 0 or step == config.steps - 1:
            log(
                f"  pre-training step {step + 1}/{config.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    net.eval()
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items() if not k.startswith("logits.")}


def base_state_dict(path: str | None, log=None):
    """The user's ``--base`` state dict, or the cached default base (built once)."""
    return load_base(path or default_base(TrunkConfig(), log=log or (lambda m: print(m, file=sys.stderr))))
