"""UCXXDataPackerMixin: plug the transport into a trainer's data-packer class.

::

    class MyPacker(UCXXDataPackerMixin):
        def __init__(self):
            self.setup_ucxx_transport(timeout=5.0)

        def next_batch(self, refs):
            handle = self.prefetch_rollouts(refs)      # starts fetching now
            ...                                        # do other work
            return self.collect_prefetch(handle, timeout=30)

Every prefetch result is tied to its handle: a batch that timed out keeps its
own results (collect it again later, or drop the handle); a late result never
fills another batch.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time

from .client import FetchResult, TransportClient

log = logging.getLogger("clients.mixin")
_handle_ids = itertools.count(1)


class PrefetchHandle:
    """One prefetched batch. ``done()`` tells whether collecting would block."""

    def __init__(self, refs, future: concurrent.futures.Future):
        self.id = next(_handle_ids)
        self.refs = list(refs)
        self.created = time.monotonic()
        self._future = future
        self.collected = False

    def done(self) -> bool:
        """Would collecting this batch return at once (every fetch finished)?"""
        return self._future.done()

    def __repr__(self):
        return f"PrefetchHandle(id={self.id}, refs={len(self.refs)}, done={self.done()})"


class UCXXDataPackerMixin:
    """Adds rollout fetching to a data packer. Call :meth:`setup_ucxx_transport` first."""

    _ucxx_client: TransportClient | None = None
    _ucxx_owns_client = False

    def setup_ucxx_transport(self, client: TransportClient | None = None, **client_kwargs) -> TransportClient:
        """Use ``client``, or create a :class:`TransportClient` with ``client_kwargs``."""
        if client is not None and client_kwargs:
            raise ValueError("pass either a client or client kwargs, not both")
        self._ucxx_client = client or TransportClient(**client_kwargs)
        self._ucxx_owns_client = client is None
        return self._ucxx_client

    @property
    def ucxx_client(self) -> TransportClient:
        """The client :meth:`setup_ucxx_transport` made or was given."""
        if self._ucxx_client is None:
            raise RuntimeError("call setup_ucxx_transport() before fetching rollouts")
        return self._ucxx_client

    def _deliver(self, results: list[FetchResult], *, presented: bool) -> list:
        """The payloads of ``results`` (as the client hands them out, once); failures to the hook."""
        out = []
        for r in results:
            if r.ok:
                out.append(r.payload if presented else self.ucxx_client.present(r.payload))
            else:
                self.on_rollout_fetch_failed(r.ref, r.error)
        return out

    def warm_up_ucxx_transport(self, *addresses) -> dict:
        """Connect to the servers now (see :meth:`TransportClient.connect`) so the
        first training step does not pay for the connections."""
        return self.ucxx_client.connect(*addresses)

    def fetch_rollouts(self, refs) -> list:
        """Fetch ``refs`` now; returns the payloads that arrived, in order.
        Each failure goes to :meth:`on_rollout_fetch_failed`."""
        return self._deliver(self.ucxx_client.fetch_many(list(refs)), presented=True)

    def prefetch_rollouts(self, refs) -> PrefetchHandle:
        """Start fetching ``refs`` in the background; collect with :meth:`collect_prefetch`."""
        return PrefetchHandle(refs, self.ucxx_client.submit_many(refs))

    def collect_prefetch(self, handle: PrefetchHandle, timeout: float | None = None) -> list:
        """The payloads of ``handle``'s batch. Raises ``TimeoutError`` if not done
        within ``timeout`` (the handle stays valid: collect it again later)."""
        if handle.collected:
            raise RuntimeError(f"{handle!r} was already collected")
        try:
            results = handle._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"prefetch batch {handle.id} ({len(handle.refs)} refs) not done within "
                               f"{timeout} s; collect the same handle again later") from None
        handle.collected = True
        return self._deliver(results, presented=False)  # submit_many hands out raw results

    def on_rollout_fetch_failed(self, ref, error: BaseException) -> None:
        """Hook: a ref could not be fetched (override to re-queue, count, alert...)."""
        log.warning("rollout %s could not be fetched: %s: %s", getattr(ref, "key", ref),
                    type(error).__name__, error)

    def shutdown_ucxx_transport(self) -> None:
        """Close the client if this mixin created it (bounded)."""
        if self._ucxx_client is not None and self._ucxx_owns_client:
            self._ucxx_client.close()
        self._ucxx_client = None
