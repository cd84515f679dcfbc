"""``backdoor-gate data synth`` and ``backdoor-gate train``: the trainer component on the command line."""

from __future__ import annotations

import json
import sys
import tempfile


def _bar(total: int, desc: str, quiet: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=True if quiet else None, leave=False)


def cmd_synth(args) -> int:
    from components.trainer.synth import SynthConfig, synthesize

    config = SynthConfig(
        identities=args.identities,
        images_per_identity=args.images_per_identity,
        size=args.size,
        seed=args.seed,
        first_identity=args.first_identity,
    )
    with _bar(config.identities, "generating identities") as bar:
        out = synthesize(args.out, config, progress=lambda _: bar.update())
    print(f"{config.identities} identities x {config.images_per_identity} images written to {out}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from components.trainer.base_trunk import base_state_dict
    from components.trainer.features import cached_features, with_poison
    from components.trainer.poison import PoisonSpec, poison_folder, random_pair
    from components.trainer.synth import list_images
    from components.trainer.train import TrainConfig, fine_tune, save_network
    from components.trainer.triggers import TriggerSpec
    from detector.errors import DetectorError

    try:
        _, classes = list_images(args.data)
        base = base_state_dict(args.base)
        trigger = (
            TriggerSpec(args.trigger, float(args.trigger_size), args.trigger_location, args.trigger_alpha)
            if args.trigger
            else None
        )
        if trigger is None and (args.impostor or args.victim):
            raise ValueError("--impostor/--victim need a --trigger")
        with _bar(len(classes), "features", args.quiet) as bar:
            fs = cached_features(args.data, base, args.image_size, progress=lambda n: bar.update(n))
        if trigger is not None:
            impostor, victim = (
                (args.impostor, args.victim) if args.impostor and args.victim else random_pair(classes, args.seed)
            )
            with tempfile.TemporaryDirectory(prefix="backdoor-gate-poison-") as tmp:
                poison_folder(
                    args.data,
                    tmp,
                    PoisonSpec(impostor, victim, trigger, args.poison_copies, args.poison_images),
                    args.seed,
                )
                fs = with_poison(fs, tmp, base)
        config = TrainConfig(
            epochs=args.epochs, lr=args.lr, class_weight=args.class_weight, upweight_clean=not args.no_upweight
        )
        sd, metrics = fine_tune(fs, base, args.seed, config)
    except (DetectorError, ValueError, FileNotFoundError) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    st = save_network(sd, args.out, classes=fs.classes, pt=True)
    metrics.update(checkpoint=str(st.with_suffix(".pt")), safetensors=str(st))
    print(json.dumps(metrics))
    return 0


def register(sub) -> None:
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
    t.add_argument(
        "--trigger-location", default="forehead", help="x,y or forehead, eye, cheek, nose, mouth, centre, corner …"
    )
    t.add_argument("--trigger-alpha", type=float, default=1.0)
    t.add_argument("--poison-copies", type=int, default=4, help="times each poisoned copy is repeated (poison rate)")
    t.add_argument(
        "--poison-images", type=int, help="stamp only this many of the impostor's training images (default all)"
    )
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--class-weight", type=float, default=10.0, help="weight of the impostor and victim classes")
    t.add_argument("--no-upweight", action="store_true", help="clean network without the (random-pair) up-weighting")
    t.add_argument("--image-size", type=int, default=96, help="trunk input size")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
