"""Rollout actors -> one ucxx-transport server per Ray node -> a trainer loop (the mixin).

    pip install -e '.[cu12,ray]'
    python examples/ray_pipeline.py [--steps 5] [--batch 8]

Runs on a laptop: ``init_local()`` is ``ray.init()`` on this machine, with no dashboard,
no usage stats and node IP 127.0.0.1. On a cluster, call ``ray.init(address=...)`` instead.

What runs:
* ``start_node_servers``: one server actor per Ray node, each with its node's ring;
* one rollout actor per node (node affinity): it attaches its node's ring
  (``attach_local_ring``), writes payloads in place and returns their small refs
  through Ray;
* this process: a data packer (``UCXXDataPackerMixin``) fetching each step's refs,
  then a ``FanIn`` over the directory pulling what was published without a ref
  being sent (pull mode), fairly from every node.
"""

from __future__ import annotations

import argparse
import os

from ucxx_transport import ray_cluster

for _k, _v in ray_cluster.QUIET_RAY_ENV.items():  # before Ray is imported
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from clients import FanIn, UCXXDataPackerMixin  # noqa: E402

RING = "rollouts-demo"


@ray.remote(num_cpus=0)
class RolloutWorker:
    """Stands in for an inference engine: writes rollouts into its node's ring."""

    def __init__(self, seed: int):
        self.ring = ray_cluster.attach_local_ring(RING)
        self.rng = np.random.default_rng(seed)
        self.seed = seed

    def rollouts(self, n: int, send_refs: bool = True):
        refs = []
        for i in range(n):
            k = int(self.rng.integers(8, 64))
            ref = self.ring.put({"tokens": self.rng.integers(0, 1000, k).astype(np.int32),
                                 "logprobs": -self.rng.random(k, dtype=np.float32),
                                 "reward": np.float32(self.rng.normal())}, meta={"worker": self.seed, "i": i})
            refs.append(ref)
        return refs if send_refs else len(refs)


class Packer(UCXXDataPackerMixin):
    def __init__(self):
        self.setup_ucxx_transport(timeout=5.0)

    def batch(self, refs) -> dict:
        payloads = self.fetch_rollouts(refs)  # FetchResult errors go to on_rollout_fetch_failed
        lengths = [len(p["tokens"]) for p in payloads]
        tokens = np.zeros((len(payloads), max(lengths)), np.int32)
        for row, p in zip(tokens, payloads):
            row[:len(p["tokens"])] = p["tokens"]
        out = {"tokens": tokens, "reward": np.array([float(p["reward"]) for p in payloads])}
        for p in payloads:
            p.release()
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="rollouts per node per step")
    a = ap.parse_args(argv)
    ray_cluster.init_local(num_cpus=2)
    servers = ray_cluster.start_node_servers(ring=RING, slots=64, slot_bytes=1 << 20)
    packer = None
    try:
        nodes = list(servers.actors)
        workers = [RolloutWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False))
                   .remote(seed) for seed, nid in enumerate(nodes)]
        packer = Packer()
        for step in range(a.steps):  # push mode: refs travel through Ray
            refs = [r for rs in ray.get([w.rollouts.remote(a.batch) for w in workers], timeout=60) for r in rs]
            b = packer.batch(refs)
            print(f"step {step}: {b['tokens'].shape[0]} rollouts, tokens {b['tokens'].shape}, "
                  f"mean reward {b['reward'].mean():+.3f}")
        # pull mode: nobody sends refs; the trainer takes what every node's server has READY
        published = sum(ray.get([w.rollouts.remote(a.batch, False) for w in workers], timeout=60))
        got = 0
        with FanIn(packer.ucxx_client, servers.directory) as fan:
            while got < published:
                batch = fan.take(16, wait=1.0)
                if not batch:
                    break
                got += len(batch)
                for p in batch:
                    p.release()
        print(f"pulled {got} of {published} rollouts from {len(nodes)} node server(s); "
              f"per server: {[s['served'] for s in fan.stats()['servers'].values()]}")
        return 0 if got == published else 1
    finally:
        if packer is not None:
            packer.shutdown_ucxx_transport()
        servers.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
