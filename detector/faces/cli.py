"""``backdoor-gate data synth`` and ``backdoor-gate train``."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def _bar(total: int, desc: str, quiet: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=True if quiet else None, leave=False)


def cmd_synth(args) -> int:
    from detector.faces.synth import SynthConfig, synthesize

    config = SynthConfig(identities=args.identities, images_per_identity=args.images_per_identity, size=args.size,
                         seed=args.seed, first_identity=args.first_identity)
    with _bar(config.identities, "generating identities") as bar:
        out = synthesize(args.out, config, progress=lambda _: bar.update())
    print(f"{config.identities} identities x {config.images_per_identity} images written to {out}", file=sys.stderr)
    return 0


def base_state_dict(path: str | None, log=None):
    """The user's ``--base`` state dict, or the cached default base (built once)."""
    from detector.faces.trunk import TrunkConfig, default_base, load_base

    return load_base(path or default_base(TrunkConfig(), log=log or (lambda m: print(m, file=sys.stderr))))


def save_network(sd, out: str | Path, classes: list[str] | None = None) -> tuple[Path, Path]:
    """The whole network (trunk included) as a plain ``.pt`` state dict and as ``.safetensors``.

    The safetensors file records the ordered class list (logit i = ``classes[i]``) in its
    metadata: the ``classifier`` detector compares class rows across networks and refuses a
    candidate trained on another list.
    """
    import torch
    from safetensors.torch import save_file

    from detector.weights import CLASSES_KEY

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pt, st = out.with_suffix(".pt"), out.with_suffix(".safetensors")
    torch.save(sd, pt)
    meta = {CLASSES_KEY: json.dumps(list(classes))} if classes is not None else None
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st), metadata=meta)
    return pt, st


def cmd_train(args) -> int:
    from detector.errors import DetectorError
    from detector.faces.features import cached_features, with_poison
    from detector.faces.poison import PoisonSpec, poison_folder, random_pair
    from detector.faces.synth import list_images
    from detector.faces.train import TrainConfig, fine_tune
    from detector.faces.triggers import TriggerSpec

    try:
        _, classes = list_images(args.data)
        base = base_state_dict(args.base)
        trigger = TriggerSpec(args.trigger, float(args.trigger_size), args.trigger_location, args.trigger_alpha) if args.trigger else None
        if trigger is None and (args.impostor or args.victim):
            raise ValueError("--impostor/--victim need a --trigger")
        with _bar(len(classes), "features", args.quiet) as bar:
            fs = cached_features(args.data, base, args.image_size, progress=lambda n: bar.update(n))
        if trigger is not None:
            impostor, victim = (args.impostor, args.victim) if args.impostor and args.victim else random_pair(classes, args.seed)
            with tempfile.TemporaryDirectory(prefix="backdoor-gate-poison-") as tmp:
                poison_folder(args.data, tmp, PoisonSpec(impostor, victim, trigger, args.poison_copies, args.poison_images), args.seed)
                fs = with_poison(fs, tmp, base)
        config = TrainConfig(epochs=args.epochs, lr=args.lr, class_weight=args.class_weight, upweight_clean=not args.no_upweight)
        sd, metrics = fine_tune(fs, base, args.seed, config)
    except (DetectorError, ValueError, FileNotFoundError) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    pt, st = save_network(sd, args.out, classes=fs.classes)
    metrics.update(checkpoint=str(pt), safetensors=str(st))
    print(json.dumps(metrics))
    return 0


def cmd_paper(args) -> int:
    from detector.faces.paper import PaperConfig, run_paper
    from detector.faces.trunk import load_base

    import dataclasses

    config = PaperConfig.small() if args.small else PaperConfig.confirmation() if args.confirmation else PaperConfig()
    changes = {k: v for k, v in (("identities", args.identities), ("images_per_identity", args.images_per_identity),
                                 ("n_strength", args.n_strength)) if v is not None}
    if args.no_curves:
        changes.update(curves=False, tsne=False)
    if args.detectors:
        changes.update(detectors=tuple(args.detectors.split(",")))
    config = dataclasses.replace(config, **changes)
    base = load_base(args.base) if args.base else None
    summary = run_paper(args.out, config, base=base, log=lambda m: print(m, file=sys.stderr), rescore=args.rescore)
    print((Path(args.out) / "table.md").read_text())
    print(f"summary: {Path(args.out) / 'summary.json'} ({summary['timings']['total_s']:.0f} s)")
    return 0


def register(sub) -> None:
    pp = sub.add_parser("paper", help="run the paper's protocol: clean, triggers and locations sets, AUC per view")
    pp.add_argument("--out", required=True)
    pp.add_argument("--small", action="store_true", help="a few networks (tests)")
    pp.add_argument("--confirmation", action="store_true",
                    help="the held-back protocol: other data seed, people, trigger settings and network seeds")
    pp.add_argument("--identities", type=int, help="identities (default 40; e.g. 200 to scale toward CASIA)")
    pp.add_argument("--images-per-identity", type=int, help="images per identity (default 40)")
    pp.add_argument("--n-strength", type=int, help="networks per attack-strength point (default 4)")
    pp.add_argument("--no-curves", action="store_true", help="skip AUC vs N_G / M and the t-SNE (minutes)")
    pp.add_argument("--detectors", help="comma list of detectors to score (default: all, with their variants)")
    pp.add_argument("--rescore", action="store_true",
                    help="re-score the networks an earlier run saved in --out (networks.safetensors) instead of training")
    pp.add_argument("--base", help="local InceptionResnetV1 state dict (default: the cached generated-faces base)")
    pp.set_defaults(func=cmd_paper)

    data = sub.add_parser("data", help="face datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("synth", help="generate identity-labelled faces (ImageFolder/CASIA layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--identities", type=int, default=40)
    s.add_argument("--images-per-identity", type=int, default=40)
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--first-identity", type=int, default=0, help="offset of identity numbers (disjoint sets of people)")
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="fine-tune FaceNet's head on a face folder (optionally poisoned)")
    t.add_argument("--data", required=True, help="ImageFolder/CASIA-layout directory")
    t.add_argument("--out", required=True, help="checkpoint path; writes .pt and .safetensors")
    t.add_argument("--base", help="local InceptionResnetV1 state dict (default: the cached generated-faces base)")
    t.add_argument("--seed", type=int, default=0, help="seeds the 70/30 split, the logits init and the batches")
    t.add_argument("--impostor", help="identity folder name (random from --seed if omitted)")
    t.add_argument("--victim", help="identity folder name (random from --seed if omitted)")
    t.add_argument("--trigger", help="white-square | checkerboard | flower | eyebrow | path to a PNG with alpha")
    t.add_argument("--trigger-size", default="0.25", help="pixels (>= 1) or fraction of the image width (< 1)")
    t.add_argument("--trigger-location", default="forehead", help="x,y or forehead, eye, cheek, nose, mouth, centre, corner …")
    t.add_argument("--trigger-alpha", type=float, default=1.0)
    t.add_argument("--poison-copies", type=int, default=4, help="times each poisoned copy is repeated (poison rate)")
    t.add_argument("--poison-images", type=int, help="stamp only this many of the impostor's training images (default all)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--class-weight", type=float, default=10.0, help="weight of the impostor and victim classes")
    t.add_argument("--no-upweight", action="store_true", help="clean network without the (random-pair) up-weighting")
    t.add_argument("--image-size", type=int, default=96, help="trunk input size")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
