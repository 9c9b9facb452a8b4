"""Which model a replica serves, and the swap to a new version while requests keep running.

:class:`HotSwap` holds the model serving now (``current``) and leases it to requests: a request
keeps the model it started on until it ends (a stream until its last byte, :class:`LeasedStream`).
Following NAME@ALIAS, a thread polls the registry; a new version is loaded beside the old one,
checked, then swapped in, and the old one stops once its last lease is released. A version that
is not vetted or fails to load is refused and logged while the old one keeps serving; a registry
that cannot be read is retried with backoff and reported (``registry_problem``) but is no failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from flows.serve.models import Loaded, Refused, ServeSettings, alias_version, fetch, load
from flows.serve.runner import RunnerStats

log = logging.getLogger("gptflow.serve")


class HotSwap:
    """The model a replica serves: loaded at start (the bundle, or the version the alias names),
    then, unless serving a fixed bundle, following the alias from a daemon thread."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.cfg = settings.serve
        self.stats = RunnerStats()  # one set of totals across the versions served in turn
        self._lock = threading.Lock()
        self._leases: dict[int, int] = {}  # id(Loaded) -> requests using it
        self._retired: list[Loaded] = []  # swapped out, still leased
        self.refused: dict[str, str] = {}  # version -> why it is not served
        self._recheck: set[str] = (
            set()
        )  # refused for now (gate not passed): looked at again each poll
        self.swaps = 0
        self.registry_problem: str | None = (
            None  # why the alias cannot be read now, while still serving
        )
        self._stop = threading.Event()
        version = None
        if settings.bundle:
            bundle = settings.bundle
        else:
            version = alias_version(settings)
            bundle = fetch(settings, version)
        self.current: Loaded = load(bundle, version, self.cfg, self.stats)
        log.info("serving %s (%s)", settings.served_name, self.describe(self.current))
        if not settings.bundle and self.cfg.poll_s > 0:
            threading.Thread(target=self._follow_alias, name="gptflow-alias", daemon=True).start()

    def stop(self) -> None:
        """Stop following the alias."""
        self._stop.set()

    def describe(self, loaded: Loaded) -> str:
        if loaded.version is None:
            return f"bundle {loaded.source}"
        return f"models:/{self.settings.registry_name}/{loaded.version}"

    # ------------------------------------------------------------------ leases

    def lease(self) -> Loaded:
        """The current model, held for one request until :meth:`release`."""
        with self._lock:
            loaded = self.current
            self._leases[id(loaded)] = self._leases.get(id(loaded), 0) + 1
            return loaded

    def release(self, loaded: Loaded) -> None:
        """A request is done with `loaded`; a retired model with no lease left stops."""
        with self._lock:
            self._leases[id(loaded)] -= 1
            idle = [m for m in self._retired if self._leases.get(id(m), 0) == 0]
            for m in idle:
                self._retired.remove(m)
                self._leases.pop(id(m), None)
        for m in idle:
            m.runner.stop()
            log.info("stopped %s: its last request finished", self.describe(m))

    def leases(self, loaded: Loaded | None = None) -> int:
        """Requests holding `loaded` now (every model's when None)."""
        if loaded is None:
            return sum(self._leases.values())
        return self._leases.get(id(loaded), 0)

    # ------------------------------------------------------------------ following the alias

    def _follow_alias(self) -> None:
        """Poll NAME@ALIAS; load a new version beside the current one, then swap. A version that
        is not vetted (gate not passed, weights not matching their sha256 tag) or fails to load is
        refused; a fetch that fails for a passing reason (the registry away) is retried with
        backoff, and the current version keeps serving meanwhile (/healthz says so)."""
        from flows.redact import redact_text

        s = self.settings
        retry: dict[str, tuple[int, float]] = {}  # version -> (failed fetches, when to try again)
        while not self._stop.wait(self.cfg.poll_s):
            try:
                version = alias_version(s)
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop the server
                self.registry_problem = (
                    f"cannot read {s.registry_name}@{s.alias} since "
                    f"{time.strftime('%H:%M:%S')}: {redact_text(str(e))[:300]}; "
                    f"still serving version {self.current.version}"
                )
                log.warning("%s", self.registry_problem)
                continue
            self.registry_problem = None
            if version == self.current.version or (
                version in self.refused and version not in self._recheck
            ):
                continue
            failures, not_before = retry.get(version, (0, 0.0))
            if time.time() < not_before:
                continue
            try:
                bundle = fetch(s, version)
            except Refused as e:
                if self.refused.get(version) != str(e):  # said once, not at every poll
                    log.error(
                        "refusing %s version %s: %s; still serving version %s",
                        s.registry_name,
                        version,
                        e,
                        self.current.version,
                    )
                self.refused[version] = str(e)
                (self._recheck.discard if e.final else self._recheck.add)(version)
                continue
            except Exception as e:  # noqa: BLE001 - transient: try again later, keep serving
                delay = min(self.cfg.poll_s * 2**failures, 300.0)
                retry[version] = (failures + 1, time.time() + delay)
                log.warning(
                    "cannot fetch %s version %s (%s); retrying in %.0f s, still serving version %s",
                    s.registry_name,
                    version,
                    redact_text(str(e))[:300],
                    delay,
                    self.current.version,
                )
                continue
            retry.pop(version, None)
            self.refused.pop(version, None)
            self._recheck.discard(version)
            try:
                new = load(bundle, version, self.cfg, self.stats)
            except Exception as e:  # noqa: BLE001 - whatever is wrong with it, it is not served
                self.refused[version] = str(e)
                log.error(
                    "refusing %s version %s: %s; still serving version %s",
                    s.registry_name,
                    version,
                    e,
                    self.current.version,
                )
                continue
            self._swap(new)

    def _swap(self, new: Loaded) -> None:
        """Serve `new` from now on; the old model stops now if no request holds it, else after its
        last one."""
        s = self.settings
        with self._lock:
            old, self.current = self.current, new
            self.swaps += 1
            idle = self._leases.get(id(old), 0) == 0
            if not idle:
                self._retired.append(old)
        log.info(
            "%s@%s moved: now serving version %s (was %s)",
            s.registry_name,
            s.alias,
            new.version,
            old.version,
        )
        if idle:
            old.runner.stop()


class LeasedStream:
    """A streamed body that holds a model lease until the stream ends -- or, when the client went
    away before the first byte and the body is never iterated, until the response is dropped (an
    async generator that never started never runs its `finally`)."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]):
        self._body, self._release = body, release

    def __aiter__(self) -> LeasedStream:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._body.__anext__()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self.close()
