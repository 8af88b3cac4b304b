"""The protocol exchanges of one call on one endpoint: GET, GETV, TAKEV, PING, and
receiving and decoding what they answer (the wire format is
:mod:`ucxx_transport.protocol`; its rules are docs/PROTOCOL.md).

:class:`Exchanges` turns one request into payloads or one typed error, and
finalises what it received (ACK; NACK with the undecodable flag for a corrupt
frame; with ``hold`` a :class:`~clients.held.HeldDelivery` settled later).
Retrying is the caller's job (:class:`~clients.client.TransportClient`).
Runs on the client's UCX loop thread.

Why one module past 400 lines: each exchange is a request, its answer's checks and
its finalisation, and they share the receiving and decoding code; split, the same
answer checks would be written twice.
"""

from __future__ import annotations

import asyncio
import json
import operator
import time

import numpy as np

import shm
from shm.frame import FRAME_HEADER, decode, decode_many, decode_views, index_tail_range, parse_index
from shm.views import anchored
from ucxx_transport import engine
from ucxx_transport.buffers import BufferPool
from ucxx_transport.protocol import (
    FLAG_FIELDS,
    FLAG_HOLD,
    FLAG_ONE_MESSAGE,
    FLAG_PAYLOADS_INLINE,
    FLAG_UNDECODABLE,
    FLAG_VERDICTS,
    MAX_HOLD_S,
    ONE_MESSAGE_MAX,
    RESPONSE,
    REQUEST,
    Op,
    ProtocolError,
    Request,
    Status,
    batch_array,
    answer_to,
    batch_table_size,
    encode_fields,
    encode_request,
    one_message_layout,
    plan_batch,
    read_batch_array,
    ring_id_bytes,
    ring_id_hex,
    write_batch_array,
)

from .endpoints import HELD, Answered, Connector
from .errors import AlreadyDeliveredError, CorruptPayloadError, PayloadTooLargeError, any_failed, status_error
from .held import HeldDelivery
from .ledger import Ledger
from .pool import PooledEndpoint

_NBYTES = operator.attrgetter("nbytes")


def hold_seconds(hold: float) -> int:
    return max(1, min(int(hold + 0.999), MAX_HOLD_S)) if hold else 0


class Exchanges:
    """One client's protocol exchanges. ``buffers``: pooled receive buffers
    (host or device memory, per ``device``); ``max_nbytes``: larger payloads are
    refused before asking; ``timeout`` + bytes / ``min_rate``: a call's deadline."""

    def __init__(self, net: Connector, ledger: Ledger, buffers: BufferPool, *, device: str, max_nbytes: int,
                 timeout: float, min_rate: float):
        self._net = net
        self._ledger = ledger
        self._buffers = buffers
        self.device = device
        self.max_nbytes = max_nbytes
        self.timeout = timeout
        self.min_rate = min_rate
        #: the largest payload lately taken (sizes a TAKEV's one-message buffer; decays by 1/8 a take)
        self._take_item_bytes = 64 << 10

    def transfer_s(self, nbytes: int) -> float:
        """Extra deadline for moving ``nbytes`` over the slowest expected link."""
        return nbytes / self.min_rate

    async def recv_payload(self, pe: PooledEndpoint, nbytes: int):
        base = self._buffers.get(nbytes)
        view = base[:nbytes]
        await engine.recv(pe.ep, view)
        return base, view

    def make_payload(self, base, view, nbytes: int, expected: int | None, where: str) -> shm.Payload:
        pool = self._buffers
        try:
            if (expected and nbytes != expected) or self.device == "cuda":
                try:
                    if expected and nbytes != expected:
                        raise shm.FrameError(f"server sent {nbytes} bytes, the ref says {expected}")
                    head = view[:FRAME_HEADER.size].get().tobytes()
                    table_off, total = index_tail_range(head)
                    if total != nbytes:
                        raise shm.FrameError(f"frame length {total} != received {nbytes}")
                    tail = view[table_off:total].get().tobytes()
                    return decode_views(parse_index(head, nbytes, tail=tail), view)  # device buffers: not pooled
                except shm.FrameError:
                    pool.put(base)  # nothing views it
                    raise
            # the buffer goes back to the pool once no view of the payload is left (also when
            # decoding fails: the anchor is made first, and its callback gives the buffer back once)
            p = decode(view, readonly=False, on_gone=lambda: pool.put(base))
            if p.nbytes != nbytes:
                raise shm.FrameError(f"frame length {p.nbytes} != received {nbytes}")
            return p
        except shm.FrameError as exc:
            raise CorruptPayloadError(f"{where}: {exc}") from exc

    async def get_once(self, ref: shm.SlotRef, host: str, port: int, hold: float = 0):
        """GET ``ref`` from one port: its payload, or with ``hold`` a :class:`HeldDelivery`."""
        where = f"GET {ref.ring}[{ref.slot}]@{ref.generation} from {host}:{port}"
        one = ref.nbytes > 0  # size known: header + payload arrive as one message

        async def body(pe):
            rid = self._net.next_id()
            if one:  # allocate before asking: a buffer we cannot get fails this ref alone, nothing in flight
                total = RESPONSE.size + ref.nbytes
                base = self._buffers.get(total)
                msg = base[:total]
                msg[: RESPONSE.size] = 0  # a short answer must never leave an old header to be parsed
            await engine.send(pe.ep, encode_request(Request(
                Op.GET, rid, ref.slot, ref.generation, max_nbytes=ref.nbytes if one else self.max_nbytes,
                text=ref.ring, flags=(FLAG_ONE_MESSAGE if one else 0) | (FLAG_HOLD if hold else 0),
                ring_id=ring_id_bytes(ref.ring_id), hold_s=hold_seconds(hold))))
            if one:
                await engine.recv(pe.ep, msg)
                pe.unconfirmed_ack = False
                head = msg[: RESPONSE.size]
                try:
                    resp = answer_to(head.get() if self.device == "cuda" else head, rid)
                except ProtocolError:
                    self._buffers.put(base)
                    raise
                if resp.status != Status.OK:
                    self._buffers.put(base)
                    raise Answered(status_error(resp.status, resp.message, where))
                view = msg[RESPONSE.size:]
            else:
                hdr = np.zeros(RESPONSE.size, np.uint8)
                await engine.recv(pe.ep, hdr)
                pe.unconfirmed_ack = False
                resp = answer_to(hdr, rid)
                if resp.status != Status.OK:
                    raise Answered(status_error(resp.status, resp.message, where))
                base, view = await self.recv_payload(pe, resp.nbytes)
            try:
                payload = self.make_payload(base, view, resp.nbytes, ref.nbytes or None, where)
            except CorruptPayloadError:
                await engine.send(pe.ep, encode_request(Request(Op.NACK, rid, resp.slot, resp.generation,
                                                                flags=FLAG_UNDECODABLE)))
                raise Answered(CorruptPayloadError(f"{where}: corrupt payload (NACKed)"))
            if hold:
                return HeldDelivery(self._ledger, self._net, pe, rid, [(ref.key, payload)], hold), HELD
            await engine.send(pe.ep, encode_request(Request(Op.ACK, rid)))
            pe.unconfirmed_ack = True
            return payload, True

        if self.max_nbytes and ref.nbytes > self.max_nbytes:
            raise PayloadTooLargeError(f"{where}: {ref.nbytes} bytes exceeds max_nbytes={self.max_nbytes}")
        try:
            return await self._net.with_endpoint(host, port, self.timeout + self.transfer_s(ref.nbytes), body, where)
        except Answered as a:  # the server answered: the endpoint is fine, the error is real
            raise a.error from None

    async def recv_planned(self, pe: PooledEndpoint, ok: list[tuple[int, int]], where: str) -> dict:
        """Receive a batch answer's payloads as protocol.plan_batch lays them out;
        {item index: Payload, or CorruptPayloadError}. Payloads that shared a message
        share its buffer, returned to the pool when the last of them is released."""
        plan = plan_batch(ok)
        sizes = dict(ok)
        bufs = []
        for msg in plan:
            last_i, last_off = msg[-1]
            total = last_off + sizes[last_i]
            base = self._buffers.get(total)
            bufs.append((base, base[:total]))
        pe.timer.extend(self.transfer_s(sum(sizes.values())))
        if len(bufs) == 1:
            await engine.recv(pe.ep, bufs[0][1])
        else:
            await asyncio.gather(*(engine.recv(pe.ep, view) for _, view in bufs))
        out: dict = {}
        for msg, (base, view) in zip(plan, bufs):
            out.update(self.decode_shared(base, view, [(i, off, sizes[i]) for i, off in msg], where))
        return out

    def decode_shared(self, base, view, items: list, where: str) -> dict:
        """Payloads at ``items`` [(index, offset, nbytes)] of one received message;
        {index: Payload or CorruptPayloadError}. They share the message's pooled
        buffer (one anchor): it goes back to the pool once no view of any of them is left."""
        pool = self._buffers
        out: dict = {}
        if not items:
            pool.put(base)
            return out
        u8, _ = anchored(view, readonly=False, on_gone=lambda: pool.put(base))
        index, starts, lengths = zip(*items)
        decoded = decode_many(u8, starts, lengths)
        if not any_failed(decoded, shm.FrameError) \
                and list(map(_NBYTES, decoded)) == list(lengths):  # the usual answer: every frame whole
            return dict(zip(index, decoded))
        for (i, _, n), p in zip(items, decoded):
            if isinstance(p, shm.FrameError):
                out[i] = CorruptPayloadError(f"{where}: item {i}: {p}")
            elif p.nbytes != n:
                out[i] = CorruptPayloadError(f"{where}: item {i}: frame length {p.nbytes} != {n}")
            else:
                out[i] = p
        return out

    async def recv_batch_head(self, pe: PooledEndpoint, rid: int, n: int, where: str):
        """The batch answer's header and entry table (or an error status)."""
        head = np.zeros(RESPONSE.size + batch_table_size(n), np.uint8)
        await engine.recv(pe.ep, head)
        pe.unconfirmed_ack = False
        return self.parse_batch_head(head, rid, n)

    @staticmethod
    def parse_batch_head(head, rid: int, n: int):
        resp = answer_to(head[:RESPONSE.size], rid)
        if resp.status != Status.OK:
            return resp, None
        if not 1 <= resp.count <= n:
            raise ProtocolError(f"batch answer of {resp.count} items to a request of {n}")
        return resp, read_batch_array(head, resp.count, RESPONSE.size)

    async def getv_once(self, refs: list, host: str, port: int, fields=None) -> list:
        """GETV ``refs`` (one ring) from one port: per ref a Payload or an error
        (with ``fields``: projected by the server to those fields)."""
        n = len(refs)
        where = f"GETV {n} of {refs[0].ring} from {host}:{port}"
        if self.max_nbytes:
            big = [i for i, r in enumerate(refs) if r.nbytes > self.max_nbytes]
            if big:
                raise PayloadTooLargeError(f"{where}: {len(big)} ref(s) exceed max_nbytes={self.max_nbytes}")

        sizes = [r.nbytes for r in refs]
        slots = [r.slot for r in refs]
        gens = [r.generation for r in refs]
        blob = b"" if fields is None else encode_fields(fields)
        one = sum(sizes) <= ONE_MESSAGE_MAX and self.device == "cpu" and not blob  # projected sizes are unknown

        async def body(pe):
            rid = self._net.next_id()
            table = batch_array(n)
            table["slot"], table["generation"], table["nbytes"] = slots, gens, sizes
            end = REQUEST.size + batch_table_size(n)
            req = np.empty(end + len(blob), np.uint8)  # header + entry table (+ field list): one message
            req[:REQUEST.size] = np.frombuffer(encode_request(Request(
                Op.GETV, rid, n=n, text=refs[0].ring, ring_id=ring_id_bytes(refs[0].ring_id), slot=len(blob),
                flags=(FLAG_ONE_MESSAGE if one else 0) | (FLAG_FIELDS if blob else 0))), np.uint8)
            write_batch_array(table, req, REQUEST.size)
            req[end:] = np.frombuffer(blob, np.uint8)
            if one:  # the whole answer is one message: receive it straight into one pooled buffer
                offsets, size = one_message_layout(n, sizes)
                base = self._buffers.get(size)
                msg = base[:size]
                await self.ask_into(pe, req, msg)
                resp, entries = self.parse_batch_head(msg, rid, n)
                if entries is None:
                    self._buffers.put(base)
            else:
                await engine.send(pe.ep, req)
                resp, entries = await self.recv_batch_head(pe, rid, n, where)
            if entries is None:
                raise Answered(status_error(resp.status, resp.message, where))
            if len(entries) != n:
                raise ProtocolError(f"{where}: {len(entries)} answers for {n} refs")
            out: list = [None] * n
            ok = self.check_answers(entries, slots, gens, None if blob else sizes, out, where)
            if one:
                got = self.decode_shared(base, msg, [(i, offsets[i], nb) for i, nb in ok], where)
            else:
                got = await self.recv_planned(pe, ok, where)
            await self.ack_batch(pe, rid, n, got)
            if any_failed(got.values()):
                delivered = []
                for i, p in got.items():
                    if isinstance(p, BaseException):
                        out[i] = p
                    else:
                        delivered.append(i)
            else:  # the usual answer: every payload delivered
                delivered = list(got)
            fresh = self._ledger.remember_batch([refs[i].key for i in delivered], "fetches",
                                                [got[i].nbytes for i in delivered])
            if all(fresh):
                for i in delivered:
                    out[i] = got[i]
                return out, True
            for i, new in zip(delivered, fresh):
                if new:
                    out[i] = got[i]
                else:
                    got[i].release()
                    out[i] = AlreadyDeliveredError(f"{where}: {refs[i].key} already returned by this client "
                                                   f"(served again after a server crash); ACKed and dropped")
            return out, True

        try:
            return await self._net.with_endpoint(host, port, self.timeout, body, where)
        except Answered as a:
            raise a.error from None

    @staticmethod
    async def ask_into(pe: PooledEndpoint, req, msg) -> None:
        """Send ``req`` with the receive of its one-message answer into ``msg`` posted
        first (the answer lands straight in ``msg``). If anything fails the receive is
        cancelled and ``msg`` must not be reused: UCX may still write into it."""
        msg[:RESPONSE.size] = 0
        recv = engine.post_recv(pe.ep, msg)
        try:
            await engine.send(pe.ep, req)
            await recv
        except BaseException:
            recv.cancel()
            raise
        pe.unconfirmed_ack = False

    def check_answers(self, entries: np.ndarray, slots: list, gens: list, sizes: list | None, out: list,
                      where: str) -> list:
        """The answer's entry table against the request: [(index, nbytes)] of the items
        sent (``out`` gets the others' errors). Any answer for another slot, generation or
        (``sizes`` given) size than asked is a protocol violation."""
        wrong = (entries["slot"] != np.asarray(slots, np.uint64)) | \
            (entries["generation"] != np.asarray(gens, np.uint64))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ProtocolError(f"{where}: item {i} answers slot {int(entries['slot'][i])}@"
                                f"{int(entries['generation'][i])}, asked {slots[i]}@{gens[i]}")
        status = entries["status"]
        sent = status == Status.OK
        if sizes is not None:
            bad = sent & (entries["nbytes"] != np.asarray(sizes, np.uint64))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ProtocolError(f"{where}: item {i} has {int(entries['nbytes'][i])} bytes, "
                                    f"the ref says {sizes[i]}")
        for i in np.flatnonzero(~sent).tolist():
            st = int(status[i])
            try:
                out[i] = status_error(Status(st), "", f"{where}: item {i}")
            except ValueError:
                raise ProtocolError(f"{where}: unknown status {st}") from None
            if st == Status.STALE:
                self._ledger.count("stale")
        idx = np.flatnonzero(sent)
        return list(zip(idx.tolist(), entries["nbytes"][idx].tolist()))

    async def ack_batch(self, pe: PooledEndpoint, rid: int, n: int, got: dict) -> None:
        """One message finalises the batch: ACK (all), or per-item verdicts when some
        payload did not decode (those go back to READY, counted towards DEAD)."""
        if not any_failed(got.values()):
            req = Request(Op.ACK, rid)
        else:
            verdict = "".join("U" if isinstance(got.get(i), BaseException) else "A" if i in got else "-"
                              for i in range(n))
            req = Request(Op.ACK, rid, text=verdict, flags=FLAG_VERDICTS)
        await engine.send(pe.ep, encode_request(req))
        pe.unconfirmed_ack = True

    async def takev_once(self, host: str, port: int, n: int, wait: float, hold: float = 0, fields_blob=None):
        """TAKEV from one port: the next READY payloads (or, with ``hold``, a HeldDelivery).
        On the host, whole payloads: the answer is asked for as one message into one
        pooled buffer sized from recent payload sizes (the server falls back to the
        usual batch answer when it does not fit)."""
        where = f"TAKE {n} from {host}:{port}"
        inline = self.device == "cpu" and not fields_blob
        cap = self.take_capacity(n) if inline else 0

        async def body(pe):
            rid = self._net.next_id()
            req = encode_request(Request(Op.TAKEV, rid, n=n, wait_ms=int(wait * 1000), max_nbytes=self.max_nbytes,
                                         flags=(FLAG_HOLD if hold else 0) | (FLAG_FIELDS if fields_blob else 0)
                                         | (FLAG_ONE_MESSAGE if inline else 0),
                                         hold_s=hold_seconds(hold), slot=len(fields_blob or b""), generation=cap))
            req = req + fields_blob if fields_blob else req
            base = None
            if inline:  # the answer may be one message of up to cap bytes
                base = self._buffers.get(cap)
                msg = base[:cap]
                pe.timer.extend(self.transfer_s(cap))
                await self.ask_into(pe, req, msg)
                resp, table = self.parse_batch_head(msg, rid, n)
                if table is None or not resp.flags & FLAG_PAYLOADS_INLINE:
                    self._buffers.put(base)
                    base = None
            else:
                await engine.send(pe.ep, req)
                resp, table = await self.recv_batch_head(pe, rid, n, where)
            if table is None:
                if resp.status == Status.EMPTY:
                    return (HeldDelivery(self._ledger, self._net, None, rid, [], 0) if hold else []), True
                raise Answered(status_error(resp.status, resp.message, where))
            count = len(table)
            sizes = table["nbytes"].tolist()
            bad = table["status"] != Status.OK
            if self.max_nbytes:
                bad |= table["nbytes"] > self.max_nbytes
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ProtocolError(f"{where}: item {i} status {int(table['status'][i])}, {sizes[i]} bytes "
                                    f"(max_nbytes={self.max_nbytes})")
            if base is not None:
                offsets, size = one_message_layout(count, sizes)
                if size > cap:
                    raise ProtocolError(f"{where}: a one-message answer of {size} bytes for a {cap}-byte buffer")
                if size * 4 <= len(base):  # a few payloads in a big buffer: move them, hold only what they need
                    small = self._buffers.get(size)
                    small[:size] = base[:size]
                    self._buffers.put(base)
                    base = small
                got = self.decode_shared(base, base[:size], [(i, offsets[i], sizes[i]) for i in range(count)], where)
            else:
                got = await self.recv_planned(pe, list(enumerate(sizes)), where)
            self._take_item_bytes = max(max(sizes), self._take_item_bytes * 7 // 8)  # sizes the next one
            rid_hex = ring_id_hex(resp.ring_id)
            keys = [(rid_hex, s, g) for s, g in zip(table["slot"].tolist(), table["generation"].tolist())]
            corrupt = [i for i, p in got.items() if isinstance(p, BaseException)] \
                if any_failed(got.values()) else []
            if hold:
                if corrupt:
                    i = corrupt[0]
                    await engine.send(pe.ep, encode_request(Request(Op.NACK, rid, keys[i][1], keys[i][2],
                                                                    flags=FLAG_UNDECODABLE)))
                    for p in got.values():
                        if not isinstance(p, BaseException):
                            p.release()
                    raise Answered(CorruptPayloadError(f"{where}: corrupt payload (batch NACKed)"))
                return HeldDelivery(self._ledger, self._net, pe, rid, [(keys[i], got[i]) for i in range(count)], hold), HELD
            await self.ack_batch(pe, rid, count, got)
            if not corrupt:  # the usual answer: every payload delivered
                fresh = self._ledger.remember_batch(keys, None, sizes)
                if all(fresh):
                    return [got[i] for i in range(count)], True
                delivered = list(range(count))
            else:
                delivered = [i for i in range(count) if not isinstance(got[i], BaseException)]
                fresh = self._ledger.remember_batch([keys[i] for i in delivered], None, [sizes[i] for i in delivered])
            kept = []
            for i, new in zip(delivered, fresh):
                if new:
                    kept.append(got[i])
                else:
                    got[i].release()
            if corrupt and not kept:
                raise Answered(CorruptPayloadError(f"{where}: {len(corrupt)} corrupt payload(s) (NACKed)"))
            return kept, True

        try:
            return await self._net.with_endpoint(host, port, self.timeout + wait, body, where)
        except Answered as a:
            raise a.error from None

    def take_capacity(self, n: int) -> int:
        """The receive buffer a one-message TAKEV of ``n`` asks for: room for ``n`` payloads
        a quarter larger than the largest lately taken (at most ONE_MESSAGE_MAX bytes)."""
        item = self._take_item_bytes + self._take_item_bytes // 4
        if self.max_nbytes:
            item = min(item, self.max_nbytes)
        return min(one_message_layout(n, [item] * n)[1], ONE_MESSAGE_MAX)

    async def stats_once(self, h: str, p: int) -> dict:
        """The STATS answer of the server at ``h:p`` (a JSON object)."""
        async def body(pe):
            resp = await self._net.request(pe, Request(Op.STATS, self._net.next_id()))
            if resp.status != Status.OK:
                raise Answered(status_error(resp.status, resp.message, f"STATS {h}:{p}"))
            buf = np.empty(resp.nbytes, np.uint8)
            await engine.recv(pe.ep, buf)
            return json.loads(buf.tobytes()), True
        try:
            return await self._net.with_endpoint(h, p, self.timeout, body, f"STATS {h}:{p}")
        except Answered as a:
            raise a.error from None

    async def ping_port(self, h: str, p: int) -> float:
        """Round trip (s) of one PING on a pooled endpoint to ``h:p`` (opened if needed)."""
        async def body(pe):
            t0 = time.perf_counter()
            await self._net.request(pe, Request(Op.PING, self._net.next_id()))
            return time.perf_counter() - t0, True
        return await self._net.with_endpoint(h, p, self.timeout, body, f"PING {h}:{p}")
