"""The standing fault campaign: producers, a server and trainer clients as separate
processes, SIGKILL / SIGSTOP+SIGCONT injected at random, every payload accounted for.

    python -m tests.fault_campaign --duration 60 --seed 1      # prints faults, payloads, violations

Invariants checked at the end (each a violation count that must be 0):

* lost: a payload a producer published (logged after ``put`` returned) was never
  delivered to any client nor left in the ring;
* wrong_bytes: a delivered payload's content checksum differs from the producer's;
* duplicates_one_client: one client process handed the same payload out twice;
* leaked_slots: after the run and one recovery pass, a slot is not FREE;
* leaked_shm: a /dev/shm file (``ucx_shm_posix_*`` included) appeared and stayed (except
  a UCX segment a process held open when the campaign SIGKILLed it: UCX unlinks each right
  after creating it, and a kill in between leaves it; that is UCX's window, not a leak of ours);
* unprovoked_deaths: a process the campaign did not kill exited non-zero.

Clients log a payload *before* it is consumed (held deliveries / local leases,
settled after logging), so a client killed at any point never makes a consumed
payload look lost; what it held is delivered again (counted as
``redelivered_after_client_kill``, allowed: at-least-once across clients).

The ``async`` consumer is the exception: it calls ``atake`` under ``asyncio.wait_for``
with a random, often too short, timeout, so its calls are cancelled at any point
(before the request, while the server waits, after the ACK). A cancelled call's work
runs on and what it consumed must come out of the next ``atake``. A plain take is
consumed before it returns (no hold), so this consumer is frozen (SIGSTOP) but never
killed: a kill after an ACK loses what only that process had, by design.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _crc(payload) -> int:
    return zlib.crc32(np.ascontiguousarray(payload["data"]).view(np.uint8))


def _stopping(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "STOP"))


# ------------------------------------------------------------------ roles ---
def producer(ring_name: str, workdir: str, tag: str, seed: int) -> None:
    import shm

    ring = shm.RingBuffer.attach(ring_name)
    rng = np.random.default_rng(seed)
    log = open(os.path.join(workdir, f"pub-{tag}.log"), "a", buffering=1)
    seq = 0
    while not _stopping(workdir):
        data = rng.integers(0, 256, int(rng.integers(1, 48 << 10)), dtype=np.uint8)
        try:
            with ring.reserve(timeout=0.5) as w:
                for chunk in np.array_split(data, 4):  # several appends: a kill can land mid-write
                    w.append("data", chunk)
                ref = w.publish({"tag": tag, "seq": seq, "crc": zlib.crc32(data)})
        except shm.RingFullError:
            continue
        log.write(json.dumps({"tag": tag, "seq": seq, "crc": zlib.crc32(data), "ref": ref.to_dict()}) + "\n")
        seq += 1
    ring.close()


def _record(log, client: str, payload) -> None:
    m = payload.meta
    log.write(json.dumps({"client": client, "tag": m["tag"], "seq": m["seq"],
                          "ok": _crc(payload) == m["crc"]}) + "\n")


def consumer(ring_name: str, workdir: str, client: str, mode: str) -> None:
    """Consume until STOP and nothing is left, logging each payload before consuming it."""
    try:
        _consume(ring_name, workdir, client, mode)
    except BaseException:
        import traceback

        with open(os.path.join(workdir, f"stack-{client}.txt"), "a") as f:
            traceback.print_exc(file=f)
        raise


def _consume(ring_name: str, workdir: str, client: str, mode: str) -> None:
    import faulthandler

    import shm
    from clients import TransportClient, TransportError

    stacks = open(os.path.join(workdir, f"stack-{client}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)  # the driver asks when we hang
    ring = shm.RingBuffer.attach(ring_name)
    log = open(os.path.join(workdir, f"got-{client}.log"), "a", buffering=1)
    idle_since = None
    with TransportClient(local_fast_path=False, timeout=2.0, quarantine_s=0.5, max_attempts=2) as c:
        offsets: dict = {}
        loop = asyncio.new_event_loop() if mode == "async" else None
        rnd = random.Random(os.getpid())
        while True:
            got = 0
            try:
                if mode == "async":
                    addr = ring.server_address()
                    if addr is None:
                        time.sleep(0.05)
                    else:
                        got = loop.run_until_complete(_take_cancelled_at_random(c, addr, log, client, rnd))
                elif mode == "local":
                    try:
                        lease = ring.claim(timeout=0.2)
                    except shm.RingEmptyError:
                        lease = None
                    if lease is not None:
                        _record(log, client, lease.payload)
                        lease.ack()
                        got = 1
                        time.sleep(0.002)  # a trainer's step: a tight loop here would leave the others nothing
                elif mode == "batch":  # same-host batches: one anchor for a batch's views, held a while
                    got = _consume_batch(ring, log, client, [r for r in _new_refs(workdir, offsets) if r.slot % 2])
                    if not got:
                        time.sleep(0.05)
                else:
                    addr = ring.server_address()
                    deliveries = []
                    if addr is None:  # no server now (killed, restarting): an idle turn, so STOP still ends us
                        time.sleep(0.05)
                    elif mode == "take":
                        deliveries = [c.submit_take(addr, n=4, wait=0.2, hold_s=30).result(30)]
                    else:  # fetch: GET the refs producers logged (others may have taken them: STALE): the
                        # newest first (the oldest-first consumers, take and local, took the oldest already), and
                        # only even slots (the batch consumer reads the same logs, for the odd ones)
                        for ref in [r for r in _new_refs(workdir, offsets) if not r.slot % 2][-16:][::-1]:
                            try:
                                deliveries.append(c.submit(ref, hold_s=30).result(30))
                            except (TransportError, shm.RingError):
                                pass
                        if not deliveries:
                            time.sleep(0.005)  # soon again: a ref is only worth GETting while it is new
                    for d in deliveries:
                        for key, p in d.items:
                            if not c.delivered(key):
                                _record(log, client, p)
                                got += 1
                        d.settle_sync(len(d.items), 10)
            except (TransportError, shm.RingError, TimeoutError) as exc:
                log.write(json.dumps({"client": client, "error": type(exc).__name__}) + "\n")
                time.sleep(0.05)
            if got:
                idle_since = None
            elif _stopping(workdir):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 2.0:
                    break
        if loop is not None:
            loop.close()
    ring.close()


async def _take_cancelled_at_random(c, addr, log, client: str, rnd) -> int:
    """One ``atake`` whose caller gives up after a random 0.5-60 ms (``asyncio.wait_for``):
    often cancelled mid-call; what a cancelled take consumed comes out of a later one."""
    try:
        got = await asyncio.wait_for(c.atake(addr, n=4, wait=0.2), rnd.uniform(0.0005, 0.06))
    except asyncio.TimeoutError:
        return 0
    for p in got:
        _record(log, client, p)
        p.release()
    return len(got)


def _consume_batch(ring, log, client: str, refs: list) -> int:
    """Claim the refs' payloads as one batch, record each before acking the batch, then keep
    a view of one of them a little while (the whole batch stays PINNED) before dropping it."""
    import random

    import shm

    by_slot: dict = {}
    for ref in refs[-64:]:
        by_slot[ref.slot] = ref  # a slot's newest generation: older ones are gone anyway
    if not by_slot:
        return 0
    batch, _ = ring.claim_batch(list(by_slot), [r.generation for r in by_slot.values()])
    if not len(batch):
        return 0
    payloads = batch.payloads()
    kept = None
    for k, p in enumerate(payloads):
        if isinstance(p, shm.FrameError):
            batch.finalise_item(k, False, undecodable=True)
        else:
            _record(log, client, p)
            kept = p
    batch.finalise(True)
    n = sum(not isinstance(p, shm.FrameError) for p in payloads)
    view = next(iter(kept.values())) if kept is not None and len(kept) else None
    del payloads, kept
    time.sleep(random.uniform(0, 0.05))  # a kill now must leave no slot PINNED for good
    del view
    return n


def _ucx_shm_files_of(pid: int) -> set:
    """Names of the /dev/shm files process ``pid`` has open (UCX's posix shared-memory segments
    among them): a process killed with SIGKILL never unlinks those, by no fault of ours."""
    names = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return names
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/ucx"):
            names.add(os.path.basename(target).removesuffix(" (deleted)"))
    return names


def _new_refs(workdir: str, offsets: dict) -> list:
    """Refs from the complete lines producers appended since the last call.

    A producer may be mid-write while we read: only bytes up to the last newline count, and the
    offset stays there, so a line read half-written is read whole next time (never from its middle).
    """
    import shm

    out = []
    for path in glob.glob(os.path.join(workdir, "pub-*.log")):
        with open(path, "rb") as f:
            f.seek(offsets.get(path, 0))
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offsets[path] = offsets.get(path, 0) + len(complete)
        for line in complete.splitlines():
            out.append(shm.SlotRef.from_dict(json.loads(line)["ref"]))
    return out


# ---------------------------------------------------------------- driver ---
class Campaign:
    def __init__(self, workdir: str, seed: int, producers: int, consumers: list[str], slots: int):
        self.workdir = workdir
        self.rnd = random.Random(seed)
        self.ctx = mp.get_context("spawn")
        self.ring_name = f"faults-{os.getpid()}-{seed}"
        self.n_producers = producers
        self.consumer_modes = consumers
        self.slots = slots
        self.procs: dict[str, object] = {}  # role name -> Process
        self.killed: set = set()  # pids we SIGKILLed
        self.killed_shm: set = set()  # UCX shared-memory files those processes held open when killed
        self.faults = collections.Counter()
        self.deaths: list = []
        self.server = None
        self.gen = 0

    # -- processes --
    def _start(self, name: str, target, *args) -> None:
        p = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        p.start()
        self.procs[name] = p

    def start_server(self) -> None:
        cmd = [sys.executable, "-m", "ucxx_transport", "serve", "--ring", self.ring_name, "--host", "127.0.0.1",
               "--n-ports", "2", "--ack-timeout-s", "3", "--log-level", "ERROR"]
        self.server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start (exit {self.server.wait(10)})")

    def _new_name(self, role: str) -> str:
        self.gen += 1
        return f"{role}{self.gen}"

    def start_producer(self) -> None:
        name = self._new_name("p")
        self._start(name, producer, self.ring_name, self.workdir, name, self.rnd.randrange(1 << 30))

    def start_consumer(self, mode: str) -> None:
        name = self._new_name(f"c-{mode}-")
        self._start(name, consumer, self.ring_name, self.workdir, name, mode)

    def _reap(self) -> None:
        """Replace processes that ended; an end we did not cause is a death."""
        for name, p in list(self.procs.items()):
            if p.is_alive():
                continue
            del self.procs[name]
            if p.pid not in self.killed and p.exitcode != 0:
                self.deaths.append((name, p.exitcode, self._stack(name)))
            if name.startswith("p"):
                self.start_producer()
            else:
                self.start_consumer(name.split("-")[1])
        if self.server.poll() is not None:
            if self.server.pid not in self.killed:
                self.deaths.append(("server", self.server.returncode))
            self.start_server()

    def _stack(self, name: str) -> str:
        path = os.path.join(self.workdir, f"stack-{name}.txt")
        return open(path).read()[-4000:] if os.path.exists(path) else ""

    # -- faults --
    def inject(self) -> None:
        r = self.rnd.random()
        if r < 0.25:
            victim, kind, name = self.server, "server", "server"
        else:
            names = [n for n in self.procs if self.procs[n].is_alive()]
            if not names:
                return
            name = self.rnd.choice(names)
            victim = self.procs[name]
            kind = "producer" if name.startswith("p") else "client"
        pid = victim.pid
        unkillable = name.startswith("c-async")  # (see the module's docstring)
        if self.rnd.random() < 0.5 and not unkillable:
            self.killed.add(pid)
            self.killed_shm |= _ucx_shm_files_of(pid)  # UCX cannot unlink what a SIGKILLed process held
            os.kill(pid, signal.SIGKILL)
            self.faults[f"SIGKILL {kind}"] += 1
        else:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(self.rnd.uniform(0.01, 0.5 if kind != "server" else 1.5))
            os.kill(pid, signal.SIGCONT)
            self.faults[f"SIGSTOP+CONT {kind}"] += 1

    # -- run --
    def run(self, duration: float, fault_every: tuple[float, float], progress) -> dict:
        import shm

        shm_before = set(os.listdir("/dev/shm"))
        ring = shm.RingBuffer.create(self.ring_name, slots=self.slots, slot_bytes=64 << 10)
        try:
            self.start_server()
            for _ in range(self.n_producers):
                self.start_producer()
            for mode in self.consumer_modes:
                self.start_consumer(mode)
            t_end = time.monotonic() + duration
            while time.monotonic() < t_end:
                time.sleep(self.rnd.uniform(*fault_every))
                self.inject()
                self._reap()
                if progress:
                    progress(sum(self.faults.values()))
            # ---- wind down: producers stop, clients drain, everyone exits on their own ----
            open(os.path.join(self.workdir, "STOP"), "w").close()
            deadline = time.monotonic() + 90
            while self.procs and time.monotonic() < deadline:
                for name, p in list(self.procs.items()):
                    if not p.is_alive():
                        del self.procs[name]
                        if p.pid not in self.killed and p.exitcode != 0:
                            self.deaths.append((name, p.exitcode, self._stack(name)))
                if self.server.poll() is not None:  # the last fault may have killed it: clients drain through a new one
                    if self.server.pid not in self.killed:
                        self.deaths.append(("server", self.server.returncode))
                    self.start_server()
                time.sleep(0.1)
            for name, p in self.procs.items():  # still running: hung; keep its threads' stacks
                if name.startswith("c"):
                    os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(0.5)
                self.deaths.append((name, "hung", self._stack(name)))
                p.kill()
            self.server.send_signal(signal.SIGTERM)
            try:
                rc = self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                rc = "hung"
            if rc not in (0,) and self.server.pid not in self.killed:
                self.deaths.append(("server", rc))
            return self.check(ring, shm_before)
        finally:
            ring.close()
            shm.RingBuffer.unlink_name(self.ring_name)

    def check(self, ring, shm_before: set) -> dict:
        import shm

        published: dict = {}
        for path in glob.glob(os.path.join(self.workdir, "pub-*.log")):
            for line in open(path):
                if line.endswith("\n"):
                    d = json.loads(line)
                    published[(d["tag"], d["seq"])] = d["crc"]
        delivered = collections.Counter()
        per_client = collections.Counter()
        by_mode = collections.Counter()  # deliveries per consumer kind (client names are c-<mode>-<n>)
        wrong = 0
        for path in glob.glob(os.path.join(self.workdir, "got-*.log")):
            for line in open(path):
                if not line.endswith("\n"):
                    continue
                d = json.loads(line)
                if "tag" not in d:
                    continue
                delivered[(d["tag"], d["seq"])] += 1
                per_client[(d["client"], d["tag"], d["seq"])] += 1
                by_mode[d["client"].split("-")[1]] += 1
                wrong += not d["ok"]
        ring.recover()
        left = 0
        while True:  # anything still READY is not lost: it is in the ring; the checker takes it
            try:
                lease = ring.claim(timeout=0)
            except shm.RingEmptyError:
                break
            with lease:
                p = lease.payload
                delivered[(p.meta["tag"], p.meta["seq"])] += 1
                wrong += _crc(p) != p.meta["crc"]
                left += 1
        counts = ring.state_counts()
        time.sleep(0.5)  # UCX unlinks its shm files as the last processes exit
        leaked_shm = sorted(f for f in set(os.listdir("/dev/shm")) - shm_before - {self.ring_name} - self.killed_shm
                            if f.startswith(("ucx", "faults-")))  # ours, not other programs' files
        return {
            "faults": dict(self.faults), "faults_total": sum(self.faults.values()),
            "published": len(published), "delivered": sum(delivered.values()), "left_in_ring": left,
            "delivered_by_mode": dict(by_mode),
            "redelivered_after_client_kill": sum(n - 1 for n in delivered.values() if n > 1),
            "violations": {
                "lost": len(set(published) - set(delivered)),
                "wrong_bytes": wrong,
                "duplicates_one_client": sum(n - 1 for n in per_client.values() if n > 1),
                "leaked_slots": ring.slots - counts["FREE"],
                "leaked_shm": leaked_shm,
                "unprovoked_deaths": self.deaths,
            },
        }


def violations(report: dict) -> int:
    return sum(len(v) if isinstance(v, list) else v for v in report["violations"].values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of fault injection (default 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--clients", default="take,fetch,local,batch,async", help="client modes, comma-separated")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--fault-every", type=float, nargs=2, default=(0.05, 0.3), metavar=("MIN_S", "MAX_S"))
    a = ap.parse_args(argv)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    try:
        from tqdm import tqdm
        bar = tqdm(desc="faults", unit="fault", disable=not sys.stderr.isatty())
        last = [0]

        def progress(n):
            bar.update(n - last[0])
            last[0] = n
    except ImportError:  # pragma: no cover
        progress = None
    with tempfile.TemporaryDirectory(prefix="faults-") as wd:
        report = Campaign(wd, a.seed, a.producers, a.clients.split(","), a.slots).run(
            a.duration, tuple(a.fault_every), progress)
    print(json.dumps(report, indent=1))
    print(f"faults injected: {report['faults_total']}, payloads checked: {report['delivered']} "
          f"(published {report['published']}), violations: {violations(report)}")
    return 1 if violations(report) else 0


if __name__ == "__main__":
    sys.exit(main())
