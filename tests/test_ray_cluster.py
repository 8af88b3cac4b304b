"""Ray placement on a local 2-node ray.cluster_utils.Cluster (skips without Ray or when it
cannot start): one server per node, rollout actors filling their node's ring, a trainer
actor pulling everything exactly once through the RayDirectory while one node's server
actor is killed and restarted, and a shutdown that leaves no ring, process or actor."""

import glob
import os
import time

import pytest

# before Ray is imported (it reads these at import): no usage stats, and 127.0.0.1 stays itself
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ucxx-transport[ray]'")

from tests.helpers import REPO  # noqa: E402
from ucxx_transport import ray_cluster  # noqa: E402

pytestmark = pytest.mark.timeout(240)
PER_NODE = 20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    env = dict(ray_cluster.QUIET_RAY_ENV,  # its proxy settings keep Ray's cloud probes on loopback
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    node = dict(num_cpus=1, object_store_memory=100 << 20, node_ip_address="127.0.0.1")
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
        c.add_node(**node)
        ray.init(address=c.address, log_to_driver=False, namespace="test", _node_ip_address="127.0.0.1")
    except Exception as exc:  # noqa: BLE001 - any reason Ray cannot run here is a skip
        if c is not None:
            c.shutdown()
        pytest.skip(f"Ray cannot start a local cluster here: {exc!r:.300}")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


class Rollout:
    def produce(self, ring, n):
        import numpy as np

        from tests.helpers import checksum

        node = ray.get_runtime_context().get_node_id()
        r = ray_cluster.attach_local_ring(ring)
        refs = []
        for i in range(n):
            p = {"tokens": np.arange(i + 1, dtype=np.int32), "reward": np.float32(i)}
            refs.append(r.put(p, meta={"crc": checksum(p), "node": node, "i": i}))
        r.close()
        return refs  # small picklable refs travel through Ray


class Trainer:
    def pull(self, total, timeout):
        from clients import FanIn, TransportClient
        from tests.helpers import checksum

        seen, bad = [], 0
        d = ray_cluster.RayDirectory()
        deadline = time.monotonic() + timeout
        with TransportClient(timeout=3.0, local_fast_path=False) as c, \
                FanIn(c, d, refresh_s=0.5, round_s=0.5, retry_s=0.5, max_retry_s=2.0) as fan:
            while len(seen) < total and time.monotonic() < deadline:
                for p in fan.take(2, wait=0.2):
                    bad += checksum(p) != p.meta["crc"]
                    seen.append((p.meta["node"], p.meta["i"]))
                    p.release()
                time.sleep(0.05)  # a slow trainer: the kill lands mid-run
            return seen, bad, fan.stats()["failures"]


def _on(node_id):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def test_one_server_per_node_exactly_once_through_a_server_restart(cluster):
    ring = f"raytest-{os.getpid()}"
    servers = ray_cluster.start_node_servers(ring=ring, slots=32, slot_bytes=1 << 16, timeout=120)
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert sorted(servers.actors) == sorted(nodes) and len(nodes) == 2, "exactly one server per node"
        assert len(servers.wait_live(2, timeout=30)) == 2
        rollout = ray.remote(num_cpus=0)(Rollout)
        actors = [rollout.options(scheduling_strategy=_on(nid)).remote() for nid in nodes]
        refs = ray.get([a.produce.remote(ring, PER_NODE) for a in actors], timeout=60)
        assert {r.ring for rs in refs for r in rs} == {ray_cluster.ring_name(ring, nid) for nid in nodes}
        trainer = ray.remote(num_cpus=0)(Trainer).remote()
        result = trainer.pull.remote(2 * PER_NODE, 90)
        time.sleep(0.5)
        victim = nodes[1]
        ray.kill(servers.actors[victim], no_restart=False)  # restarted on its node: attaches its ring again
        seen, bad, failures = ray.get(result, timeout=120)
        assert bad == 0
        assert len(seen) == len(set(seen)) == 2 * PER_NODE, (len(seen), len(set(seen)))
        assert {n for n, _ in seen} == set(nodes)
        live = servers.wait_live(2, timeout=30)
        assert {e.node_id for e in live} == set(nodes)
        pids = [servers.infos[n]["pid"] for n in nodes]
    finally:
        servers.shutdown(timeout=30)
    assert not glob.glob(f"/dev/shm/{ring}-*"), "shutdown unlinks every ring"
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in named if n.startswith("ucxx-transport")], named
    deadline = time.monotonic() + 20
    import psutil

    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_core_works_without_ray_and_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"pip install 'ucxx-transport\[ray\]'"):
        ray_cluster.start_node_servers()


def test_ray_pipeline_example_runs_on_one_machine():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "ray_pipeline.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "step 1: 8 rollouts" in out.stdout and "pulled 8 of 8" in out.stdout, out.stdout
