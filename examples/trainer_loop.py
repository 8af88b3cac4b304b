"""A small PyTorch (CPU) training loop fed by UCXXDataPackerMixin from a live server.

    pip install -e '.[cu12,torch]'
    python examples/trainer_loop.py [--steps 20] [--batch 8] [--producers 2] [--local]

What runs:
* a ring in /dev/shm and `ucxx-transport serve` for it (a subprocess);
* producer processes (spawned) that publish multi-turn rollouts as torch
  tensors -- per-turn token ids and bf16 log-probs as ragged lists, a reward, the
  prompt text -- and send each ref over a multiprocessing queue, standing in for
  whatever control plane you already have;
* this process: a data packer (the mixin, ``tensor_type="torch"``) that prefetches
  batch k+1 over UCX while the model trains on batch k, and packs the ragged
  turns into padded tensors straight from zero-copy views. `--local` lets
  same-host refs take the shared-memory fast path instead of the network.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import uuid


import shm
from clients import UCXXDataPackerMixin

VOCAB = 1000


def producer(ring_name: str, refq, n: int, seed: int) -> None:
    import torch

    ring = shm.RingBuffer.attach(ring_name)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        lengths = torch.randint(8, 64, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        rollout = {
            "turns": [torch.randint(0, VOCAB, (k,), generator=g) for k in lengths],       # ragged int64
            "logprobs": [-torch.rand(k, generator=g).to(torch.bfloat16) for k in lengths],  # ragged bf16
            "reward": float(torch.randn(1, generator=g)),
            "prompt": f"task {seed}-{i}",
        }
        refq.put(ring.put(rollout, meta={"producer": seed, "i": i}, timeout=30).to_dict())
    ring.close()


class RolloutPacker(UCXXDataPackerMixin):
    """Turns fetched payloads into padded torch tensors."""

    def __init__(self, **client_kwargs):
        self.failures = 0
        self.setup_ucxx_transport(**client_kwargs)

    def on_rollout_fetch_failed(self, ref, error):
        self.failures += 1
        super().on_rollout_fetch_failed(ref, error)

    @staticmethod
    def pack(payloads):
        """Pack a batch of ragged multi-turn rollouts into padded tensors.

        ``p["turns"]`` and ``p["logprobs"]`` are ``shm.Ragged``: each one torch
        tensor of every turn back to back (``.values``, viewed in place) plus
        ``.offsets``. Returns tokens, mask, the sampler's bf16 log-probs (as
        float32), per-token turn ids (-1 on padding) and rewards."""
        import torch

        n = max(len(p["turns"].values) for p in payloads)
        b = len(payloads)
        tokens = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, n)
        old_logp = torch.zeros(b, n)
        turn_id = torch.full((b, n), -1, dtype=torch.long)
        for i, p in enumerate(payloads):
            turns, lp = p["turns"], p["logprobs"]
            k = len(turns.values)
            tokens[i, :k] = turns.values          # one copy: zero-copy view -> packed batch
            old_logp[i, :k] = lp.values.float()   # bf16 straight from the slot
            mask[i, :k] = 1
            turn_id[i, :k] = torch.repeat_interleave(torch.arange(len(turns)), turns.lengths)
        rewards = torch.tensor([p["reward"] for p in payloads])
        return tokens, mask, old_logp, turn_id, rewards


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--local", action="store_true", help="use the same-host shared-memory fast path")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("this example needs PyTorch: pip install 'ucxx-transport[torch]'")

    ring_name = f"trainer-demo-{uuid.uuid4().hex[:6]}"
    ring = shm.RingBuffer.create(ring_name, slots=64, slot_bytes=1 << 20)
    server = subprocess.Popen([sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring_name,
                               "--host", "127.0.0.1", "--n-ports", "2"], stdout=subprocess.PIPE, text=True)
    info = json.loads(server.stdout.readline())
    print(f"server up: {info}")
    ctx = mp.get_context("spawn")
    refq = ctx.Queue()
    total = a.steps * a.batch
    per = -(-total // a.producers)
    prods = [ctx.Process(target=producer, args=(ring_name, refq, per, s)) for s in range(a.producers)]
    for p in prods:
        p.start()

    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    packer = RolloutPacker(local_fast_path=a.local, timeout=5.0, tensor_type="torch")
    try:
        def next_refs():
            return [shm.SlotRef.from_dict(refq.get(timeout=60)) for _ in range(a.batch)]

        handle = packer.prefetch_rollouts(next_refs())
        for step in range(a.steps):
            payloads = packer.collect_prefetch(handle, timeout=60)
            if step + 1 < a.steps:
                handle = packer.prefetch_rollouts(next_refs())  # overlaps with this step's compute
            tokens, mask, old_logp, turn_id, rewards = packer.pack(payloads)
            logits = model(tokens[:, :-1])
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            ratio = torch.exp(logp - old_logp[:, 1:]).clamp(0.8, 1.2)  # importance ratio vs the sampler
            loss = -((ratio * mask[:, 1:]).sum(1) * (rewards - rewards.mean())).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for p in payloads:
                p.release()  # with no view left, receive buffers (or local slots) are reused
            if step % 5 == 0 or step == a.steps - 1:
                print(f"step {step:3d}  loss {loss.item():+.4f}  batch {len(payloads)} "
                      f"({int(turn_id.max()) + 1} turns max)  "
                      f"client {packer.ucxx_client.stats().get('fetches', 0)} network / "
                      f"{packer.ucxx_client.stats().get('local_fetches', 0)} local fetches")
        print(f"done: {a.steps} steps, {packer.failures} failed fetches, ring {ring.state_counts()}")
    finally:
        packer.shutdown_ucxx_transport()
        for p in prods:
            p.join(30)
        server.terminate()
        server.wait(15)
        ring.close()
        ring.unlink()


if __name__ == "__main__":
    main()
