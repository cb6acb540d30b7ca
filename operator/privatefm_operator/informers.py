"""Plain list-and-watch of the operator's children: one thread per kind, no kopf.

kopf would keep a memory, and run a worker, for every object it watches: about six children per
learner, each of whose events needs one comparison (``reconcilers.children``) and nothing else. A
watch here keeps no state of its own apart from a resourceVersion, so the operator's memory for a
learner's children is what ``Children`` records.

Each ``Informer`` lists its kind (by the managed-by label; Namespaces all of them; in pages), then
watches from the list's resourceVersion, with bookmarks, in windows the API server ends after a few
minutes; a window that ends is followed by the next from the last version seen. A ``410 Gone`` (the
version was compacted) relists, and whatever the operator remembers of that kind but the new list lacks is
reported deleted: a child deleted while nobody watched is still repaired. Any other error (the API
server restarting, a dropped connection) is retried with a capped backoff. ``stop()`` ends every
thread after its current event or window.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

from privatefm_operator.kube import Kube

log = logging.getLogger("privatefm.informers")

Handler = Callable[[str, dict[str, Any], bool], None]  # kind, object, deleted
PAGE = 500
WINDOW_SECONDS = 240  # each watch request: the server ends it after this long plus a jitter of up to a quarter
MAX_BACKOFF = 30.0


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class Informer:
    def __init__(self, kube: Kube, kind: str, selector: str, handle: Handler,
                 known: Callable[[str], Iterable[tuple[str, str]]], stop: threading.Event) -> None:
        """``handle(kind, object, deleted)`` is called for every object listed and every event;
        ``known(kind)`` gives the (namespace, name) of each object of the kind the handler remembers."""
        self.kube, self.kind, self.selector = kube, kind, selector
        self.handle, self.known, self.stop = handle, known, stop
        self.synced = threading.Event()  # the first list was handed over
        self.thread = threading.Thread(target=self.run, name=f"watch-{kind}", daemon=True)

    def run(self) -> None:
        version: str | None = None
        backoff = 1.0
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self.relist()
                    self.synced.set()
                version = self.watch(version)
                backoff = 1.0
            except Gone:
                log.info("watch of %s expired: listing again", self.kind)
                version = None
            except Exception as err:  # the API server is away or refused: try again, less often
                log.warning("watch of %s failed (%s): retrying in %.0f s", self.kind, err, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def relist(self) -> str:
        seen: set[tuple[str, str]] = set()
        continue_: str | None = None
        while True:
            page = self.kube.list_page(self.kind, self.selector, PAGE, continue_)
            for obj in page.get("items") or []:
                obj.setdefault("kind", self.kind)
                meta = obj["metadata"]
                seen.add((meta.get("namespace") or "", meta["name"]))
                self.handle(self.kind, obj, False)
            continue_ = (page.get("metadata") or {}).get("continue")
            if not continue_:
                break
        for namespace, name in set(self.known(self.kind)) - seen:  # deleted while nobody watched
            self.handle(self.kind, {"kind": self.kind, "metadata": {"namespace": namespace or None, "name": name}},
                        True)
        return str(page["metadata"]["resourceVersion"])

    def watch(self, version: str) -> str:
        seconds = WINDOW_SECONDS + random.randint(0, WINDOW_SECONDS // 4)
        for event in self.kube.watch(self.kind, self.selector, version, seconds):
            if self.stop.is_set():
                break
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(obj.get("message"))
                raise RuntimeError(f"watch error: {obj.get('message')}")
            version = str(obj["metadata"]["resourceVersion"])
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                obj.setdefault("kind", self.kind)
                self.handle(self.kind, obj, kind == "DELETED")
        return version


class Informers:
    """One ``Informer`` per kind, started and stopped together."""

    def __init__(self, kube: Kube, kinds: Iterable[str], selector: str, handle: Handler,
                 known: Callable[[str], Iterable[tuple[str, str]]]) -> None:
        self.stop_event = threading.Event()
        self.informers = [Informer(kube, kind, selector, handle, known, self.stop_event) for kind in kinds]

    def start(self) -> Informers:
        for informer in self.informers:
            informer.thread.start()
        return self

    def wait_synced(self, timeout: float) -> bool:
        return all(informer.synced.wait(timeout) for informer in self.informers)

    def stop(self) -> None:
        self.stop_event.set()
