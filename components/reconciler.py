"""Keep the registry consistent with signed state, whatever deliveries were missed.

Webhooks are best effort: the receiver may be down when a version is registered or an alias
moved, and MLflow does not redeliver forever. The reconciler re-derives the truth from signed
records on every delivery *and* on a periodic resync (default every 60 s), so a missed
delivery heals within one interval:

- every version of a watched model without a valid signed verdict is gated, whatever its tags
  say (a hand-written ``integrity.verdict=passed`` hides nothing), and so is every version
  whose signed verdict allows promotion but whose registered bytes are no longer the judged
  ones (swapped after the pass);
- ``production`` is re-derived (:func:`components.policy.guard_alias`): it stays only on a
  version with a signed pass or a signed override for its exact bytes, else goes back to the
  newest such version or is deleted;
- the reference alias (``@current``) stays only on a reference signed by a trusted key.

It is idempotent (each step reads state, then converges it), so two replicas are safe, and
it fails closed: a version whose records cannot be read is gated again or left unpromotable,
and one version's failure never stops the pass over the others.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable

from components import gate as G
from components import policy
from components import tags as T
from components.config import GateConfig
from components.reference_store import check_reference_dir
from components.registry import Registry
from detector.decision import BLOCKED, PASSED

log = logging.getLogger("backdoor_gate.reconciler")


class Reconciler:
    def __init__(
        self,
        registry: Registry,
        models: tuple[str, ...] = ("facenet",),
        config: GateConfig = GateConfig(),
        interval: float = 60.0,
        gate_fn: Callable[[str, str], object] | None = None,
    ):
        self.registry, self.models, self.config = registry, tuple(models), config
        self.interval = interval
        self.gate_fn = gate_fn or (lambda m, v: G.gate(m, v, registry=self.registry, config=self.config))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._locks = {m: threading.Lock() for m in self.models}
        self.resyncs = 0

    # -- one pass ------------------------------------------------------------------------------
    def reconcile(self, model: str) -> list[str]:
        """Gate what has no valid signed verdict for its bytes, then re-derive ``production``."""
        if model not in self._locks:
            return []
        done = []
        with self._locks[model]:
            for info in self.registry.versions(model):
                try:
                    why = self._needs_gate(info)
                    if why:
                        result = self.gate_fn(model, info.version)
                        done.append(f"gated v{info.version} ({why}): {getattr(result, 'verdict', result)}")
                except Exception as e:  # noqa: BLE001 — one version's fault never stops the others
                    log.warning("%s v%s: %s", model, info.version, e)
                    done.append(f"v{info.version}: {e.__class__.__name__}: {e}")
            violation = policy.guard_alias(model, registry=self.registry, config=self.config)
            if violation:
                done.append(violation)
        return done

    def _needs_gate(self, info) -> str | None:
        """Why ``info`` must be gated (None when its signed records stand). Tags are never read.

        Bytes are re-hashed only where the signed verdict allows promotion: those are the bytes
        that can reach production; a blocked or invalid verdict allows nothing whatever the bytes.
        """
        try:
            envelope, doc = policy.signed_verdict(self.registry, info, self.config)
        except Exception as e:  # noqa: BLE001 — missing, oversized, forged, unparsable: judge it
            return f"no valid signed verdict: {e}"
        if doc.get("verdict") == PASSED or (doc.get("verdict") == BLOCKED and info.tags.get(T.OVERRIDE_BY)):
            artifact = self.registry.download_artifact(info, self.config.max_checkpoint_bytes)
            if doc.get("artifact_sha256") != artifact.sha256:
                return "registered bytes are not the ones the signed verdict judged"
        return None

    def guard_reference(self) -> str | None:
        """``@current`` on a reference no trusted key signed goes back to the newest signed one (or is removed)."""
        name, alias = self.config.reference_model, self.config.reference_alias
        current = self.registry.version_by_alias(name, alias)
        if current is None or not self.config.require_signed_reference or self._signed_reference(current):
            return None
        for v in self.registry.versions(name):
            if v.version != current.version and self._signed_reference(v):
                self.registry.set_alias(name, alias, v.version)
                return f"{name}@{alias} was on unsigned v{current.version}; moved back to v{v.version}"
        self.registry.delete_alias(name, alias)
        return f"{name}@{alias} was on unsigned v{current.version}; alias deleted (no signed reference)"

    def _signed_reference(self, info) -> bool:
        with tempfile.TemporaryDirectory(prefix="backdoor-gate-ref-") as tmp:
            try:
                check_reference_dir(self.registry.download(info.source, tmp), self.config)
                return True
            except Exception:  # noqa: BLE001 — unreadable or unverifiable counts as unsigned
                return False

    def resync(self) -> list[str]:
        done = []
        try:
            if msg := self.guard_reference():
                done.append(msg)
        except Exception as e:  # noqa: BLE001 — the next model is still resynced
            log.warning("reference guard: %s", e)
        for model in self.models:
            try:
                done += self.reconcile(model)
            except Exception as e:  # noqa: BLE001 — registry down: nothing can be judged; try next time
                log.warning("resync of %s: %s", model, e)
        self.resyncs += 1
        for line in done:
            log.info("%s", line)
        return done

    # -- periodic ------------------------------------------------------------------------------
    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="reconciler")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.resync()
            except Exception:  # noqa: BLE001 — keep resyncing whatever one pass hit
                log.exception("resync failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=300)
