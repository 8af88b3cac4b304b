"""Ray placement: one TransportServer per Ray node, a directory in a Ray actor.

Needs ``pip install 'ucxx-transport[ray]'`` (imported lazily: the rest of the
package works without Ray).

* :func:`start_node_servers` starts exactly one server actor per alive Ray node
  (``NodeAffinitySchedulingStrategy``, hard), each creating its node's ring
  ``f"{ring}-{node_id[:12]}"`` (distinct names: nodes of a one-machine test
  cluster share ``/dev/shm``) and registering it in a :class:`RayDirectory`.
  A restarted server actor (``max_restarts``) attaches to the ring it left, so
  what was published there is served again, under the same ring id.
* :func:`attach_local_ring` inside any actor or task: its own node's ring.
* :meth:`NodeServers.shutdown` is bounded and unlinks every ring.
* :class:`RayDirectory`: the :class:`~ucxx_transport.directory.Directory` in a
  named detached actor; liveness uses the actor's clock (no clock skew).

Refs (``shm.SlotRef``) are small picklable objects: pass them through Ray calls.
See docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import logging
import os
import time

from .directory import DEFAULT_TTL_S, Directory, DirectoryError, ServerEntry, register_server

log = logging.getLogger("ucxx_transport.ray_cluster")

RAY_HINT = "pip install 'ucxx-transport[ray]'"
NAMESPACE = "ucxx-transport"
DIRECTORY_ACTOR = "ucxx-transport-directory"
#: port 9 (discard) on loopback: nothing listens, so an HTTP request through this "proxy" fails at once
_CLOSED_PROXY = "http://127.0.0.1:9"
#: environment that keeps Ray from dialling out (usage stats, cloud probes) on a laptop or a closed network
QUIET_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
                 # Ray probes cloud metadata (169.254.169.254, metadata.google.internal) at start: send any
                 # such HTTP request to a closed loopback port; loopback itself goes direct
                 "http_proxy": _CLOSED_PROXY, "https_proxy": _CLOSED_PROXY,
                 "HTTP_PROXY": _CLOSED_PROXY, "HTTPS_PROXY": _CLOSED_PROXY,
                 "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
                 # resolve "127.0.0.1" as itself, not as the address that routes to the internet
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"ucxx_transport.ray_cluster needs Ray ({exc}): {RAY_HINT}") from None
    return ray


def init_local(**kwargs):
    """``ray.init()`` for one machine that dials nowhere: no dashboard, no usage stats,
    node IP 127.0.0.1 (``kwargs`` override, e.g. ``num_cpus``). Call it before anything
    imports Ray (Ray reads some of ``QUIET_RAY_ENV`` at import)."""
    for k, v in QUIET_RAY_ENV.items():
        os.environ.setdefault(k, v)
    ray = _ray()
    kwargs.setdefault("address", "local")  # a new instance, never one another program started
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("_node_ip_address", "127.0.0.1")
    kwargs.setdefault("object_store_memory", 100 << 20)
    kwargs.setdefault("log_to_driver", False)
    return ray.init(**kwargs)


def ring_name(ring: str, node_id: str) -> str:
    """The ring name of ``ring`` on node ``node_id``."""
    return f"{ring}-{node_id[:12]}"


# ------------------------------------------------------------ directory ---
class _DirectoryState:
    """Body of the directory actor: entries by ring id, stamped with the actor's clock."""

    def __init__(self):
        self.entries: dict[str, ServerEntry] = {}

    def register(self, ring_id, ring, host, ports, node_id=None):
        import uuid

        e = ServerEntry(ring_id, ring, host, tuple(ports), node_id, time.time(), uuid.uuid4().hex[:12])
        self.entries[ring_id] = e
        return e.to_dict()

    def heartbeat(self, ring_id) -> bool:
        e = self.entries.get(ring_id)
        if e is None:
            return False
        from dataclasses import replace

        self.entries[ring_id] = replace(e, heartbeat=time.time())
        return True

    def unregister(self, ring_id) -> None:
        self.entries.pop(ring_id, None)

    def all(self) -> list[dict]:
        return [e.to_dict() for e in self.entries.values()]

    def live(self, ttl_s: float) -> list[dict]:
        now = time.time()
        return [e.to_dict() for e in self.entries.values() if e.live(ttl_s, now)]


class RayDirectory(Directory):
    """The directory in a named detached actor (``name`` in namespace ``NAMESPACE``),
    created by the first user (:func:`start_node_servers`). Every call waits at most
    ``timeout`` seconds and raises :class:`DirectoryError` when the actor does not answer.
    Picklable: pass it to actors and tasks."""

    def __init__(self, name: str = DIRECTORY_ACTOR, *, ttl_s: float = DEFAULT_TTL_S, timeout: float = 10.0,
                 create: bool = False):
        self.name, self.ttl_s, self.timeout = name, ttl_s, timeout
        ray = _ray()
        if create:
            cls = ray.remote(num_cpus=0, max_restarts=-1)(_DirectoryState)
            self._actor = cls.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                      get_if_exists=True).remote()
        else:
            try:
                self._actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError as exc:
                raise DirectoryError(f"no Ray directory actor {name!r} (start_node_servers() creates it)") from exc

    def __reduce__(self):
        return (RayDirectory, (self.name,), {"ttl_s": self.ttl_s, "timeout": self.timeout})

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _call(self, method: str, *args):
        ray = _ray()
        try:
            return ray.get(getattr(self._actor, method).remote(*args), timeout=self.timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            raise DirectoryError(f"Ray directory {self.name!r} did not answer {method}: {exc!r:.200}") from None

    def register(self, ring_id, ring, host, ports, node_id=None) -> ServerEntry:
        return ServerEntry.from_dict(self._call("register", ring_id, ring, host, list(ports), node_id))

    def heartbeat(self, ring_id) -> bool:
        return self._call("heartbeat", ring_id)

    def unregister(self, ring_id) -> None:
        self._call("unregister", ring_id)

    def entries(self) -> list[ServerEntry]:
        return [ServerEntry.from_dict(d) for d in self._call("all")]

    def live(self) -> list[ServerEntry]:
        return sorted((ServerEntry.from_dict(d) for d in self._call("live", self.ttl_s)), key=lambda e: e.ring_id)

    def destroy(self) -> None:
        """Kill the directory actor (bounded; idempotent)."""
        try:
            _ray().kill(self._actor)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("directory actor kill: %r", exc)


# ------------------------------------------------------------- servers ---
class _NodeServerBody:
    """Body of the per-node server actor (made a Ray actor class in start_node_servers)."""

    def __init__(self, ring: str, slots: int, slot_bytes: int, token, n_ports: int, host, directory_name: str,
                 ttl_s: float):
        import ray

        import shm
        from .server import TransportServer

        self.node_id = ray.get_runtime_context().get_node_id()
        self.name = ring_name(ring, self.node_id)
        try:
            self.ring = shm.RingBuffer.attach(self.name)  # a restart: serve what was left there
            log.info("attached existing ring %r", self.name)
        except FileNotFoundError:
            self.ring = shm.RingBuffer.create(self.name, slots=slots, slot_bytes=slot_bytes)
        self.srv = TransportServer(self.ring, host=host or ray.util.get_node_ip_address(), n_ports=n_ports,
                                   token=token)
        self.srv.start()
        self.reg = register_server(RayDirectory(directory_name, ttl_s=ttl_s), self.srv, node_id=self.node_id)

    def info(self) -> dict:
        return dict(self.reg.entry.to_dict(), pid=os.getpid())

    def stop(self, unlink: bool = True) -> bool:
        import shm

        self.reg.stop()
        self.srv.stop()
        self.ring.close()
        if unlink:
            shm.RingBuffer.unlink_name(self.name)
        return True


def _unlink_ring(name: str) -> bool:
    import shm

    return shm.RingBuffer.unlink_name(name)


class NodeServers:
    """What :func:`start_node_servers` started: ``actors`` {node id: actor handle},
    ``infos`` {node id: entry dict}, ``directory`` (a :class:`RayDirectory`)."""

    def __init__(self, ring: str, directory: RayDirectory, actors: dict, infos: dict):
        self.ring, self.directory, self.actors, self.infos = ring, directory, actors, infos

    def wait_live(self, n: int | None = None, timeout: float = 60.0) -> list[ServerEntry]:
        """Wait until ``n`` (default: one per node) servers are live in the directory."""
        n = len(self.actors) if n is None else n
        deadline = time.monotonic() + timeout
        while True:
            live = self.directory.live()
            if len(live) >= n or time.monotonic() >= deadline:
                return live
            time.sleep(0.2)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every server (unlinking its ring), kill the actors and the directory;
        a ring whose server did not stop in time is unlinked by a task on its node."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        deadline = time.monotonic() + timeout
        refs = {nid: a.stop.remote() for nid, a in self.actors.items()}
        left = []
        for nid, ref in refs.items():
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - dead or stuck: killed and cleaned below
                log.warning("server on node %s did not stop cleanly (%r): killing it", nid[:12], exc)
                left.append(nid)
        for a in self.actors.values():
            ray.kill(a)
        if left:
            task = ray.remote(num_cpus=0)(_unlink_ring)
            cleanups = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(
                ring_name(self.ring, nid)) for nid in left]
            try:
                ray.get(cleanups, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - the node is gone: so is its /dev/shm
                log.warning("could not unlink rings on %d node(s): %r", len(left), exc)
        self.directory.destroy()


def start_node_servers(ring: str = "rollouts", *, slots: int = 16, slot_bytes: int = 4 << 20, token=None,
                       n_ports: int = 2, host: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                       max_restarts: int = -1, timeout: float = 120.0) -> NodeServers:
    """One server actor per alive Ray node, each serving its node's new ring (``slots`` x
    ``slot_bytes`` of that node's /dev/shm); waits until all are serving (``timeout``).
    ``host``: the address advertised (default: each node's Ray IP). ``token``: the shared
    secret clients must present (``TransportClient(token=...)``). Call ``ray.init()`` first."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError("call ray.init() (or ucxx_transport.ray_cluster.init_local()) first")
    directory = RayDirectory(ttl_s=ttl_s, create=True)
    cls = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)(_NodeServerBody)
    token = token.decode() if isinstance(token, bytes) else token
    actors = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        nid = node["NodeID"]
        actors[nid] = cls.options(
            name=f"ucxx-transport-server-{ring_name(ring, nid)}", namespace=NAMESPACE,
            scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
        ).remote(ring, slots, slot_bytes, token, n_ports, host, directory.name, ttl_s)
    try:
        infos = dict(zip(actors, ray.get([a.info.remote() for a in actors.values()], timeout=timeout)))
    except Exception:
        NodeServers(ring, directory, actors, {}).shutdown(timeout=10.0)
        raise
    log.info("started %d node server(s) for ring %r", len(infos), ring)
    return NodeServers(ring, directory, actors, infos)


def attach_local_ring(ring: str = "rollouts", timeout: float = 30.0):
    """This node's ring (a :class:`shm.RingBuffer`), from inside any Ray actor or task;
    waits up to ``timeout`` for its server to create it."""
    ray = _ray()
    import shm

    name = ring_name(ring, ray.get_runtime_context().get_node_id())
    deadline = time.monotonic() + timeout
    while True:
        try:
            return shm.RingBuffer.attach(name)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise FileNotFoundError(f"no ring {name!r} on this node after {timeout:.0f} s: did "
                                        f"start_node_servers(ring={ring!r}) run?") from None
            time.sleep(0.2)
