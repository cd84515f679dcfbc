"""Who may read and write what in MLflow: the deployment's permission model, in one table.

The reference artifact (class centres, medians, scales, thresholds) is what a white-box attacker
needs to tune a backdoor against the detector, so only the gate identity may read it. MLflow's
basic-auth app decides per registered model and per experiment, and a run's artifacts, proxied
as ``/api/2.0/mlflow-artifacts/artifacts/<experiment id>/<run id>/artifacts/…``, are judged by
the experiment id in that path (``_authorize_flask_artifact_proxy`` in MLflow 3.17.2's
``mlflow/server/auth/__init__.py``). So the reference has its own registered model *and* its own
experiment, and the server runs with ``default_permission = NO_PERMISSIONS``: a user sees exactly
what a grant names.

=============  ======================  ====================  ===============  ====================
identity       candidate models        candidate experiment  reference model  reference experiment
=============  ======================  ====================  ===============  ====================
gate           MANAGE                  EDIT                  READ             READ
publisher      —                       —                     EDIT             EDIT
registrants    EDIT                    EDIT                  —                —
reviewers      EDIT                    EDIT                  —                —
readers        READ                    READ                  —                —
=============  ======================  ====================  ===============  ====================

Why each cell: the gate tags versions, moves ``production`` and writes verdicts and reports into
the versions' runs (EDIT), and deletes ``production`` when no version may hold it, which MLflow
allows only with MANAGE; it reads the reference and nothing writes it but the publisher (the
reference pipeline's ``publish_reference`` task). Registering a version, in MLflow, needs EDIT
on the model and on the experiment its run is logged in; a reviewer's override sets the alias
and writes ``override.json`` into the version's run, so reviewers need the same. Readers
(deployers running ``pull``, auditors running ``verify``) read versions and their runs.
Experiments and models are created here, as the admin, so that no service or person holds the
MANAGE that MLflow gives whoever creates them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from components.config import GateConfig
from components.registry import CANDIDATE_EXPERIMENT

MODEL, EXPERIMENT = "registered_model", "experiment"
CANDIDATE, REFERENCE = "candidate", "reference"
NO_PERMISSIONS = "NO_PERMISSIONS"
_RANK = {NO_PERMISSIONS: 0, "READ": 1, "USE": 2, "EDIT": 3, "MANAGE": 4}

#: role -> {(candidate|reference, registered_model|experiment): permission}; absent = none.
TABLE: dict[str, dict[tuple[str, str], str]] = {
    "gate": {
        (CANDIDATE, MODEL): "MANAGE",
        (CANDIDATE, EXPERIMENT): "EDIT",
        (REFERENCE, MODEL): "READ",
        (REFERENCE, EXPERIMENT): "READ",
    },
    "publisher": {(REFERENCE, MODEL): "EDIT", (REFERENCE, EXPERIMENT): "EDIT"},
    "registrant": {(CANDIDATE, MODEL): "EDIT", (CANDIDATE, EXPERIMENT): "EDIT"},
    "reviewer": {(CANDIDATE, MODEL): "EDIT", (CANDIDATE, EXPERIMENT): "EDIT"},
    "reader": {(CANDIDATE, MODEL): "READ", (CANDIDATE, EXPERIMENT): "READ"},
}


class AccessError(RuntimeError):
    """The grants could not be applied (unknown user, not the admin, server unreachable)."""


@dataclass(frozen=True)
class Grant:
    user: str
    kind: str  # registered_model | experiment
    name: str  # the model's or the experiment's name
    permission: str


@dataclass(frozen=True)
class AccessPolicy:
    """The identities of one deployment and the objects they touch; :meth:`grants` is the table applied."""

    gate: str = "backdoor-gate"
    publisher: str = "backdoor-gate-publisher"
    registrants: tuple[str, ...] = ()
    reviewers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    models: tuple[str, ...] = ("facenet",)
    candidate_experiment: str = CANDIDATE_EXPERIMENT
    reference_model: str = GateConfig.reference_model
    reference_experiment: str = GateConfig.reference_experiment

    def members(self) -> dict[str, tuple[str, ...]]:
        return {
            "gate": (self.gate,),
            "publisher": (self.publisher,),
            "registrant": tuple(self.registrants),
            "reviewer": tuple(self.reviewers),
            "reader": tuple(self.readers),
        }

    def outsiders(self) -> list[str]:
        """Named identities that must not read the reference: everyone but the gate and the publisher."""
        return sorted({u for u in (*self.registrants, *self.reviewers, *self.readers)})

    def objects(self, scope: str, kind: str) -> tuple[str, ...]:
        if kind == MODEL:
            return tuple(self.models) if scope == CANDIDATE else (self.reference_model,)
        return (self.candidate_experiment,) if scope == CANDIDATE else (self.reference_experiment,)

    def grants(self) -> list[Grant]:
        """One grant per (user, object): the highest permission any of the user's roles asks for."""
        insiders = {self.gate, self.publisher}
        if clash := sorted(set(self.outsiders()) & insiders):
            raise ValueError(
                f"{', '.join(clash)} would read the reference: registrants, reviewers and readers must be "
                f"identities other than the gate ({self.gate}) and the publisher ({self.publisher})"
            )
        if self.reference_model in self.models or self.reference_experiment == self.candidate_experiment:
            raise ValueError("the reference needs its own registered model and its own experiment")
        best: dict[tuple[str, str, str], str] = {}
        for role, users in self.members().items():
            for (scope, kind), permission in TABLE[role].items():
                for user in users:
                    for name in self.objects(scope, kind):
                        key = (user, kind, name)
                        if _RANK[permission] > _RANK[best.get(key, NO_PERMISSIONS)]:
                            best[key] = permission
        return [Grant(u, k, n, p) for (u, k, n), p in sorted(best.items())]


def _error_code(e: Exception) -> str:
    return str(getattr(e, "error_code", ""))


class _Server:
    """The two clients the grants need, with MLflow's errors turned into :class:`AccessError`."""

    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient
        from mlflow.server.auth.client import AuthServiceClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.auth = AuthServiceClient(tracking_uri)

    def experiment_id(self, name: str, created: list[str]) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        created.append(f"created experiment {name}")
        return self.client.create_experiment(name)

    def ensure_model(self, name: str, created: list[str]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
            created.append(f"created registered model {name}")
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise

    def permission(self, user: str, kind: str, resource: str) -> str:
        return self.auth.get_user_permission(user, kind, resource).permission

    def set(self, user: str, kind: str, resource: str, permission: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.auth.grant_user_permission(user, kind, resource, permission)
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            self.auth.revoke_user_permission(user, kind, resource)  # a different level: replace it
            self.auth.grant_user_permission(user, kind, resource, permission)


def _wrap(what: str, fn, *args):
    try:
        return fn(*args)
    except AccessError:
        raise
    except Exception as e:  # noqa: BLE001 — MlflowException, requests errors …: one message the admin can act on
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        hint = " (run it as the MLflow admin: MLFLOW_TRACKING_USERNAME/PASSWORD)" if "PERMISSION" in first else ""
        raise AccessError(f"{what} failed: {e.__class__.__name__}: {first}{hint}") from e


def apply(policy: AccessPolicy, tracking_uri: str) -> tuple[list[str], list[str]]:
    """Create what is missing and set every grant of ``policy``; returns (changes, problems).

    Run as the admin. Idempotent: a grant already at its level is left alone, one at another
    level is replaced. ``problems`` (from :func:`check`) is empty when no registrant, reviewer
    or reader can read the reference; anything else means the server's ``default_permission``
    is not ``NO_PERMISSIONS`` or someone was granted access by hand.
    """
    server = _wrap("connecting", _Server, tracking_uri)
    grants = policy.grants()  # ValueError first: nothing is touched for an impossible policy
    users = sorted({g.user for g in grants})
    missing = [u for u in users if not _exists(server, u)]
    if missing:
        raise AccessError(
            f"no such MLflow user: {', '.join(missing)}; create them first (AuthServiceClient.create_user, "
            "docs/deploying.md step 5)"
        )
    changes: list[str] = []
    ids = {}
    for name in (policy.candidate_experiment, policy.reference_experiment):
        ids[name] = _wrap(f"reading/creating experiment {name}", server.experiment_id, name, changes)
    for name in (*policy.models, policy.reference_model):
        _wrap(f"creating registered model {name}", server.ensure_model, name, changes)
    for g in grants:
        resource = ids[g.name] if g.kind == EXPERIMENT else g.name
        now = _wrap(f"reading {g.user}'s permission on {g.kind} {g.name}", server.permission, g.user, g.kind, resource)
        if now == g.permission:
            continue
        _wrap(
            f"granting {g.user} {g.permission} on {g.kind} {g.name}", server.set, g.user, g.kind, resource, g.permission
        )
        changes.append(f"{g.user}: {g.kind} {g.name} {now} -> {g.permission}")
    return changes, _check(server, policy, ids)


def _check(server: _Server, policy: AccessPolicy, ids: dict[str, str]) -> list[str]:
    problems = []
    resources: list[tuple[str, str, str]] = [(MODEL, policy.reference_model, policy.reference_model)]
    if policy.reference_experiment in ids:
        resources.append((EXPERIMENT, policy.reference_experiment, ids[policy.reference_experiment]))
    for user in policy.outsiders():
        for kind, name, resource in resources:
            now = _wrap(f"reading {user}'s permission on {kind} {name}", server.permission, user, kind, resource)
            if _RANK.get(now, 1) > 0:  # READ or more (an unknown level counts as a leak)
                problems.append(
                    f"{user} has {now} on {kind} {name}: it can read the reference "
                    "(is the server's default_permission NO_PERMISSIONS?)"
                )
    return problems


def _exists(server: _Server, user: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        server.auth.get_user(user)
        return True
    except MlflowException as e:
        if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise AccessError(f"reading user {user} failed: {e} (run it as the MLflow admin)") from e


def table(grants: Iterable[Grant]) -> str:
    rows = [f"{g.user:28s} {g.kind:17s} {g.name:32s} {g.permission}" for g in grants]
    return "\n".join([f"{'user':28s} {'resource':17s} {'name':32s} permission", *rows])
