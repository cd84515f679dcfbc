"""One red-team trigger default: the pipeline, its components, the task and ``train`` agree with
:class:`TriggerSpec` (KFP reads literal defaults from signatures, so they are repeated there)."""

import inspect

import pytest

from backdoor_gate.cli import build_parser
from components import definitions, tasks
from components.trainer.triggers import TriggerSpec
from pipelines import facenet

FIELDS = {"trigger": "name", "trigger_size": "size", "trigger_location": "location", "trigger_alpha": "alpha"}


def _defaults(fn) -> dict:
    sig = inspect.signature(fn)
    return {spec: sig.parameters[arg].default for arg, spec in FIELDS.items()}


@pytest.mark.parametrize(
    "fn",
    [definitions.poison_faces.python_func, tasks.poison_faces, facenet.candidate_pipeline.pipeline_func],
    ids=["component", "task", "pipeline"],
)
def test_every_signature_defaults_to_the_trigger_spec(fn):
    spec = TriggerSpec()
    assert _defaults(fn) == {f: getattr(spec, f) for f in FIELDS.values()}


def test_train_defaults_to_the_trigger_spec():
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--trigger", "white-square"])
    spec = TriggerSpec()
    got = (float(args.trigger_size), args.trigger_location, args.trigger_alpha)
    assert got == (spec.size, spec.location, spec.alpha)
