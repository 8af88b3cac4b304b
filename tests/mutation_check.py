#!/usr/bin/env python
"""Mutation check: does the suite fail when a guarantee's mechanism is removed?

For each mutation below: copy the repository (tracked + untracked, non-ignored files)
to a temporary directory, remove one mechanism there by an exact text replacement in
one source file, and run the tests that are meant to catch it in the copy (with
``PYTHONPATH`` pointing at the copy, so the copy shadows the editable install, for
spawned processes and server subprocesses too). A mutation is CAUGHT when those
tests fail, MISSED when they pass.

    python tests/mutation_check.py                 # every mutation; a table; exit 1 if any is MISSED
    python tests/mutation_check.py --only NAME     # one (repeatable)
    python tests/mutation_check.py --list          # names, files, selected tests

Every mutation's original text must occur exactly once in its file, checked before
anything runs: when the code changes, the list fails loudly instead of silently
testing nothing. The selected tests are first run once on an unmutated copy (they
must pass there, or CAUGHT would mean nothing); ``--no-baseline`` skips that.

Not listed on purpose: the second ``buf[:] = 0`` in ``TransportServer._deliver``
(before receiving the ACK). Without it a short ACK leaves the GET/TAKE request just
decoded in the buffer, which fails the ACK/NACK op check, and any other leftover
fails the CRC, so the outcome (BAD_REQUEST, payloads back to READY) is the same:
an equivalent mutant, only the error text differs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUDE_TOP = {".venv", ".git"}
PER_TEST_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600

MECH = "tests/test_mechanisms.py::"
REL = "tests/test_reliability.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str = ""
    extra: tuple[tuple[str, str], ...] = field(default=())  # further (old, new) in the same file


MUTATIONS: list[Mutation] = [
    Mutation(
        "client-dedup-disabled", "clients/ledger.py",
        '        """Record a delivered payload; False if it was delivered before (a duplicate)."""\n',
        '        """Record a delivered payload; False if it was delivered before (a duplicate)."""\n'
        "        return True\n",
        (REL + "test_get_redelivered_after_crash_is_not_returned_twice",),
        "Ledger.remember always True (and records nothing)",
    ),
    Mutation(
        "server-peer-death-callback-noop", "ucxx_transport/server.py",
        '        """UCX close/error callback (peer died or closed): end the handler now."""\n',
        '        """UCX close/error callback (peer died or closed): end the handler now."""\n'
        "        return\n",
        (MECH + "test_client_sigkilled_before_ack_returns_payload_long_before_the_ack_deadline",),
        "TransportServer._on_ep_closed does nothing",
    ),
    Mutation(
        "client-acks-corrupt-get", "clients/exchanges.py",
        "Request(Op.NACK, rid, resp.slot, resp.generation,\n"
        "                                                                flags=FLAG_UNDECODABLE)",
        "Request(Op.ACK, rid)",
        (MECH + "test_corrupt_payload_fetched_by_get_is_nacked_then_dead_lettered_never_consumed",),
        "Exchanges.get_once ACKs a payload it could not decode",
    ),
    Mutation(
        "batch-dedup-trusts-its-fast-path", "clients/ledger.py",
        "            if d.keys().isdisjoint(keys):  # the usual batch",
        "            if True:  # the usual batch",
        (REL + "test_unconfirmed_settle_still_counts_as_delivered_to_this_client",),
        "Ledger.remember_batch takes every key of a batch for new without checking the window",
    ),
    Mutation(
        "client-acks-corrupt-batch", "clients/exchanges.py",
        "if not any_failed(got.values()):",
        "if True:",
        (REL + "test_undecodable_payload_is_dead_lettered_not_blocking",),
        "Exchanges.ack_batch (TAKE/GETV) ACKs every item, undecodable ones included",
    ),
    Mutation(
        "client-acks-corrupt-held-take", "clients/exchanges.py",
        "Request(Op.NACK, rid, keys[i][1], keys[i][2],\n"
        "                                                                    flags=FLAG_UNDECODABLE)",
        "Request(Op.ACK, rid)",
        (MECH + "test_corrupt_payload_in_a_held_take_is_nacked_not_consumed",),
        "Exchanges.takev_once (held, as streams fetch ahead) ACKs a batch holding an undecodable payload",
    ),
    Mutation(
        "server-inline-take-ignores-the-clients-buffer", "ucxx_transport/server.py",
        "<= min(req.generation,",
        "<= max(req.generation,",
        ("tests/test_server.py::test_takev_one_message_when_the_answer_fits_the_clients_buffer",),
        "TransportServer._answer_batch answers a TAKEV in one message larger than the client's buffer",
    ),
    Mutation(
        "client-take-pins-its-big-buffer", "clients/exchanges.py",
        "if size * 4 <= len(base):",
        "if False:",
        ("tests/test_client.py::test_take_outgrowing_its_one_message_buffer_falls_back_then_adapts",),
        "Exchanges.takev_once keeps a few small payloads in a MiB-sized receive buffer",
    ),
    Mutation(
        "finaliser-lease-check-removed", "shm/state.py",
        "if self.state[slot] != expect or self.lease[slot] != lease:",
        "if self.state[slot] != expect:",
        (MECH + "test_late_finaliser_of_a_recovered_lease_never_clobbers_the_new_owner",
         "tests/test_ring.py::test_finalisers_in_wrong_state_are_noops"),
        "SlotTable._finalise ignores the lease number",
    ),
    Mutation(
        "finalise-many-lease-check-removed", "shm/state.py",
        "valid = (self.state[slots] == READING) & (self.lease[slots] == np.asarray(leases, np.uint64))",
        "valid = (self.state[slots] == READING)",
        (MECH + "test_late_finaliser_of_a_recovered_lease_never_clobbers_the_new_owner",),
        "SlotTable.finalise_many (batch ACK/NACK) ignores the lease numbers",
    ),
    Mutation(
        "futex-wakes-removed", "shm/state.py",
        "        self._bump(self._ready_word)\n        _sync.futex_wake(self.ready_addr)\n",
        "        self._bump(self._ready_word)\n",
        (MECH + "test_publish_in_another_process_wakes_a_sleeping_reader_at_once",
         MECH + "test_ack_wakes_a_writer_blocked_on_a_full_ring_at_once"),
        "signal_ready and signal_free bump the word but wake no one",
        extra=(("        self._bump(self._free_word)\n        _sync.futex_wake(self.free_addr)\n",
                "        self._bump(self._free_word)\n"),),
    ),
    Mutation(
        "futex-ready-wake-removed", "shm/state.py",
        "        self._bump(self._ready_word)\n        _sync.futex_wake(self.ready_addr)\n",
        "        self._bump(self._ready_word)\n",
        (MECH + "test_publish_in_another_process_wakes_a_sleeping_reader_at_once",),
        "signal_ready wakes no one (readers notice at their sleep's timeout)",
    ),
    Mutation(
        "futex-free-wake-removed", "shm/state.py",
        "        self._bump(self._free_word)\n        _sync.futex_wake(self.free_addr)\n",
        "        self._bump(self._free_word)\n",
        (MECH + "test_ack_wakes_a_writer_blocked_on_a_full_ring_at_once",),
        "signal_free wakes no one (blocked writers notice at the end of a 0.25 s slice)",
    ),
    Mutation(
        "ring-ref-id-check-removed", "shm/ring.py",
        "if ref.ring_id is not None and ref.ring_id != self._ring_id:",
        "if False:",
        (MECH + "test_ref_of_a_recreated_ring_is_stale_never_the_new_payload",),
        "RingBuffer._check_ref does not compare ref.ring_id",
    ),
    Mutation(
        "server-get-ring-id-check-removed", "ucxx_transport/server.py",
        "if req.ring_id != NO_RING_ID and req.ring_id != self._ring_id:",
        "if False:",
        (MECH + "test_get_of_a_recreated_rings_ref_is_stale_over_the_network",),
        "TransportServer._get serves a ref of another ring with the same name",
    ),
    Mutation(
        "server-getv-ring-id-check-removed", "ucxx_transport/server.py",
        "if req.ring_id == NO_RING_ID or req.ring_id == self._ring_id:",
        "if True:",
        (MECH + "test_get_of_a_recreated_rings_ref_is_stale_over_the_network",),
        "TransportServer._getv (fetch_many) serves refs of another ring with the same name",
    ),
    Mutation(
        "claim-generation-check-removed", "shm/state.py",
        "if gen != generation or st not in (READY, READING):",
        "if st not in (READY, READING):",
        ("tests/test_ring.py::test_aba_stale_ref_never_served_newer_payload",),
        "claim_ready serves a stale ref the newer payload in its slot",
    ),
    Mutation(
        "claim-many-generation-check-removed", "shm/state.py",
        "gen_ok = self.gen[slots] == np.asarray(generations, np.uint64)",
        "gen_ok = np.ones(len(slots), bool)",
        ("tests/test_client.py::test_fetch_many_200_with_stale",
         MECH + "test_batch_claim_never_serves_a_stale_ref_the_newer_payload"),
        "SlotTable.claim_many (GETV) serves a stale ref the newer payload in its slot",
    ),
    Mutation(
        "recovery-trusts-dead-owner", "shm/state.py",
        "        if int(self.owner[slot]) == self._pid:\n            o = self._owned\n",
        "        return True\n        if int(self.owner[slot]) == self._pid:\n            o = self._owned\n",
        ("tests/test_ring_processes.py::test_sigkill_reader_holding_lease_payload_ready_again",),
        "owner_alive always True: nothing is ever recovered",
    ),
    Mutation(
        "dead-letter-never", "shm/state.py",
        "if self.failures[slot] >= DEAD_LETTER_AFTER:",
        "if False:",
        (REL + "test_undecodable_payload_is_dead_lettered_not_blocking",),
        "an undecodable payload is NACKed back to READY forever",
    ),
    Mutation(
        "server-request-buf-not-cleared", "ucxx_transport/server.py",
        "buf[:] = 0  # a short message must never leave the previous request to be parsed again",
        "pass  # (mutated: buffer not cleared)",
        (REL + "test_short_message_is_never_reparsed_as_the_previous_request",),
        "the endpoint loop receives into a buffer still holding the previous request",
    ),
    Mutation(
        "stream-give-back-consumes-all", "clients/stream.py",
        "ok = item.delivery.settle_sync(item.handed, self._client.timeout + 5.0)",
        "ok = item.delivery.settle_sync(len(item.delivery.items), self._client.timeout + 5.0)",
        (REL + "test_stream_close_gives_back_what_was_not_handed_out",),
        "FetchStream._give_back consumes what was never handed out",
    ),
    Mutation(
        "ack-ignores-live-views", "shm/leases.py",
        "        if not self.views_alive:\n            if ack:",
        "        if True:\n            if ack:",
        ("tests/test_payloads.py::test_view_kept_past_ack_never_sees_a_reused_slot",),
        "an ack frees the slot while views of its payload are alive (they would show the next payload)",
    ),
    Mutation(
        "batch-ack-ignores-live-views", "shm/ring.py",
        "            pinned.extend(le.views_alive for le in held)",
        "            pinned.extend(False for le in held)",
        (MECH + "test_batch_ack_with_live_views_pins_the_slot_like_a_single_ack",),
        "the batch finaliser (same-host fetch_many) frees slots whose payload views are alive",
    ),
    Mutation(
        "pool-reuses-viewed-buffer", "clients/exchanges.py",
        "p = decode(view, readonly=False, on_gone=lambda: pool.put(base))",
        "p = decode(view, readonly=False)\n            pool.put(base)",
        ("tests/test_payloads.py::test_client_views_survive_release_and_buffer_or_slot_reuse",),
        "a receive buffer goes back to the pool while views of its payload are alive",
    ),
    Mutation(
        "projection-ignored", "ucxx_transport/server.py",
        "        if fields is not None and held:",
        "        if False:",
        ("tests/test_payloads.py::test_field_selective_fetch_sends_only_those_fields_and_consumes_the_payload",),
        "the server sends whole payloads when only some fields were asked for",
    ),
    Mutation(
        "frame-field-bounds-check-removed", "shm/frame.py",
        "if nbytes and (off % ALIGN or off < FRAME_HEADER.size or off + nbytes > table_off):",
        "if nbytes and (off % ALIGN or off < FRAME_HEADER.size):",
        (MECH + "test_fuzzed_valid_frames_decode_inside_their_data_area_or_raise_frame_error",
         "tests/test_frame.py::test_field_entry_out_of_bounds_rejected"),
        "parse_index lets a field run past the data area",
    ),
    Mutation(
        "uniform-batch-table-not-compared", "shm/frame.py",
        "    if not (ent == ent[0]).all():\n        return None\n",
        "",
        ("tests/test_frame.py::test_a_batch_of_identical_layouts_is_validated_by_its_first_frame",
         "tests/test_frame.py::test_decode_many_agrees_with_decoding_each_frame_alone"),
        "decode_many takes a batch's field tables for the first frame's without comparing them",
    ),
    Mutation(
        "frame-raw-bounds-check-removed", "shm/frame.py",
        "if FRAME_HEADER.size + raw_len > table_off:",
        "if False:",
        (MECH + "test_fuzzed_valid_frames_decode_inside_their_data_area_or_raise_frame_error",),
        "parse_index lets a raw payload run past the data area",
    ),
    Mutation(
        "fork-child-keeps-parent-description", "shm/ring.py",
        "            _sync.disown_description(ident, maps.get(ident, []), [r._fd for r in rings])\n",
        "            pass\n",
        ("tests/test_fork.py::test_a_forked_child_does_not_keep_a_killed_parents_slots_owned",),
        "a forked child keeps its parent's open file description (and with it the parent's locks)",
    ),
    Mutation(
        "fork-handles-share-one-description", "shm/_sync.py",
        "        for fd in handle_fds:\n",
        "        for fd in ():\n",
        ("tests/test_fork.py::test_a_forked_child_uses_the_ring_but_never_touches_what_its_parent_holds",),
        "a forked child's ring handles share one description (their locks no longer exclude each other)",
    ),
    Mutation(
        "fork-child-finalises-parent-slots", "shm/state.py",
        "        if self._not_ours(slot):\n            raise ForkedHandleError(",
        "        if False:\n            raise ForkedHandleError(",
        ("tests/test_fork.py::test_a_forked_child_uses_the_ring_but_never_touches_what_its_parent_holds",),
        "finalisers do not check that the slot's owner is this process",
    ),
    Mutation(
        "interrupted-results-dropped", "clients/kept.py",
        "                self._by_key.update((k, (p, fields)) for k, p in pairs)\n",
        "                pass\n",
        ("tests/test_interrupted_calls.py::test_batch_interrupted_in_a_later_round_keeps_what_it_consumed",),
        "what an interrupted fetch consumed is dropped instead of kept",
    ),
    Mutation(
        "interrupted-batch-not-given-back", "clients/local.py",
        "            if batch is not None:\n                batch.abandon()\n",
        "            pass\n",
        ("tests/test_interrupted_calls.py::test_same_host_batch_interrupted_between_claim_and_ack_gives_its_slots_back",),
        "a same-host batch interrupted between claim and ACK keeps its slots READING",
    ),
    Mutation(
        "protocol-crc-check-removed", "ucxx_transport/protocol.py",
        "if fields[-1] != _crc(mv, layout.size - 4):",
        "if False:",
        (MECH + "test_fuzzed_requests_raise_protocol_error_or_decode",),
        "headers are parsed without checking their CRC-32",
    ),
    Mutation(
        "direct-call-uses-the-loop-driver", "ucxx_transport/engine.py",
        "    return here if here is not None else _engine.driver\n",
        "    return _engine.driver\n",
        ("tests/test_direct_calls.py::test_threads_fetching_at_once_get_every_payload_once_and_intact",),
        "a call run in the caller's thread waits on the UCX loop's driver (futures of another loop)",
    ),
    Mutation(
        "ended-thread-keeps-its-driver", "ucxx_transport/engine.py",
        "    _here.forget = weakref.finalize(owner, _forget_caller_loop, loop, drv)\n",
        "    _here.forget = weakref.finalize(owner, lambda *a: None, loop, drv)\n",
        ("tests/test_direct_calls.py::test_a_thread_that_ends_takes_its_loop_and_driver_with_it",),
        "a thread that ran direct calls and ended leaves its loop and driver on the worker",
    ),
    Mutation(
        "interrupted-direct-call-abandoned", "ucxx_transport/engine.py",
        "            handed_over = True\n"
        "            _finish_elsewhere(loop, drv, task, on_interrupt)\n",
        "            handed_over = True\n"
        "            task.cancel()\n",
        ("tests/test_interrupted_calls.py::test_take_interrupted_while_it_waits_hands_its_payload_to_the_next_take",),
        "a direct call stopped by Ctrl-C is dropped instead of finished elsewhere with its payloads kept",
    ),
    Mutation(
        "stale-stop-stops-the-next-call", "ucxx_transport/engine.py",
        "    def stop_this_call() -> None:\n        if current[0]:\n            loop.stop()\n",
        "    def stop_this_call() -> None:\n        loop.stop()\n",
        ("tests/test_direct_calls.py::test_ctrl_c_as_a_call_ends_does_not_interrupt_the_next_call",
         "tests/test_direct_calls.py::test_two_quick_ctrl_c_still_let_the_interrupted_work_finish"),
        "a Ctrl-C's stop queued for one call stops the next call on the reused loop (or the helper finishing it)",
    ),
    Mutation(
        "callers-calls-left-at-teardown", "ucxx_transport/engine.py",
        "            await _end_callers_calls(timeout / 4)\n",
        "",
        ("tests/test_direct_calls.py::test_a_call_outliving_its_clients_close_is_cancelled_not_left_to_its_deadline",),
        "a call still running in another thread at UCX's teardown is left to its deadline, its endpoint open",
    ),
    Mutation(
        "pool-aborts-under-its-lock", "clients/pool.py",
        "        self._leaving.extend(pe.abort for pe in self._pop_all(host, port))\n\n    # -----",
        "        for pe in self._pop_all(host, port):\n            pe.abort()\n\n    # -----",
        ("tests/test_directory.py::test_pool_closes_endpoints_outside_its_lock",),
        "an endpoint is aborted while the pool's lock is held: other threads' calls wait for it",
    ),
    Mutation(
        "abort-wakes-stopped-loops", "ucxx_transport/engine.py",
        "        elif d.event_loop.is_running():  # a stopped loop's driver progresses when it next runs\n",
        "        else:\n",
        ("tests/test_direct_calls.py::test_aborts_do_not_pile_wake_ups_on_the_loop_of_a_thread_between_calls",),
        "every abort queues a wake-up on the stopped loop of each thread between calls (unbounded)",
    ),
    Mutation(
        "late-checkin-pooled", "clients/pool.py",
        "        if self._drained:  # a call that ended after the client closed: not pooled, retired\n",
        "        if False:\n",
        ("tests/test_directory.py::test_an_endpoint_checked_in_after_the_pool_was_drained_is_retired_not_pooled",),
        "an endpoint returned after close() drained the pool stays open in it (its ACK unconfirmed)",
    ),
    Mutation(
        "handed-over-call-ctrl-c-not-held", "ucxx_transport/engine.py",
        "    held = threading.current_thread() is threading.main_thread() and \\\n",
        "    held = False and \\\n",
        ("tests/test_interrupted_calls.py::test_a_call_interrupted_at_any_step_hands_its_outcome_to_on_interrupt",),
        "engine.run leaves Python's SIGINT handler in place: a Ctrl-C as the work returns drops its result",
    ),
    Mutation(
        "direct-call-late-ctrl-c-swallowed", "ucxx_transport/engine.py",
        "    if \"interrupt\" in stopped:  # Ctrl-C in the call's last steps",
        "    if False:  # Ctrl-C in the call's last steps",
        ("tests/test_interrupted_calls.py::test_a_call_interrupted_at_any_step_hands_its_outcome_to_on_interrupt",),
        "a direct call's Ctrl-C in its last steps is noted by its handler and swallowed as the handler goes back",
    ),
    Mutation(
        "fan-in-settle-interrupt-dropped", "clients/fanin.py",
        "                             on_interrupt=None if handing is None else self._kept.on_interrupt(handing))",
        "                             on_interrupt=None)",
        ("tests/test_interrupted_calls.py::test_fan_in_interrupted_while_it_settles_keeps_what_it_consumed",),
        "a fan-in take interrupted while it settles drops what the settle consumed",
    ),
    Mutation(
        "fetch-stream-settle-interrupt-dropped", "clients/stream.py",
        "                                   on_interrupt=self._interrupted.on_interrupt([[payload]]))",
        "                                   on_interrupt=None)",
        ("tests/test_interrupted_calls.py::test_fetch_stream_interrupted_while_it_acks_hands_the_payload_out_next",),
        "a FetchStream next() interrupted while it ACKs drops the payload the ACK consumed",
    ),
    Mutation(
        "submitted-fetch-cancellable", "clients/client.py",
        "        outcome.set_running_or_notify_cancel()\n",
        "        outcome.add_done_callback(lambda f: f.cancelled() and work.cancel())\n",
        ("tests/test_interrupted_calls.py::test_cancelling_a_submitted_fetch_after_its_ack_does_not_drop_the_payload",),
        "a submitted fetch's future can be cancelled halfway: the payload its ACK consumed is lost",
    ),
    Mutation(
        "owner-pid-taken-for-identity", "shm/state.py",
        "            if o.holder[slot] and o.lease[slot] == self.lease[slot]:\n                return True\n",
        "            return bool(o.holder[slot]) and bool(o.lease[slot] == self.lease[slot])\n",
        ("tests/test_ring_processes.py::test_a_live_holder_with_the_same_pid_in_another_pid_namespace_is_not_recovered",),
        "a slot naming this process's PID is taken for its own: a live holder in another PID namespace is recovered",
    ),
    Mutation(
        "cancelled-async-call-dropped", "clients/client.py",
        "            return await asyncio.shield(waiter)\n",
        "            return await waiter\n",
        ("tests/test_interrupted_calls.py::test_an_async_call_cancelled_after_its_ack_keeps_the_payload_for_the_next_call",),
        "an async call cancelled after its ACK is cancelled with it: the payload it consumed is lost",
    ),
    Mutation(
        "batch-answer-leaves-posted-send-failures-unretrieved", "ucxx_transport/server.py",
        "                    f.add_done_callback(_observed)\n",
        "                    pass\n",
        ("tests/test_server.py::test_a_batch_answer_that_fails_after_its_first_messages_gives_everything_back_quietly",),
        "a batch answer that fails after posting its first messages leaves their failures unretrieved",
    ),
    Mutation(
        "takev-capped-at-the-getv-limit", "ucxx_transport/server.py",
        "        n = max(1, min(req.n or 1, self._max_take))  # (up to MAX_TAKE",
        "        n = max(1, min(req.n or 1, self._max_take, MAX_BATCH))  # (up to MAX_TAKE",
        ("tests/test_server.py::test_a_batched_take_of_256_is_answered_by_one_request",),
        "a batched TAKE returns at most 200 (a take of 256 is two round trips)",
    ),
    Mutation(
        "remote-refs-looked-up-in-shared-memory", "clients/local.py",
        "        return self.enabled and self._names_this_host(ref)",
        "        return self.enabled",
        ("tests/test_client.py::test_refs_of_another_host_skip_the_shared_memory_look_up",),
        "refs of another host go through this host's ring look-up (an executor hop per round)",
    ),
    Mutation(
        "any-dtype-text-reaches-numpy", "shm/dtypes.py",
        "            if not _NUMPY_NAME.fullmatch(text):",
        "            if False:",
        ("tests/test_frame.py::test_a_damaged_dtype_name_is_a_frame_error",),
        "a damaged dtype name goes to np.dtype (SyntaxError escapes decoding)",
    ),
]


# --------------------------------------------------------------- machinery --
def repo_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    files = []
    for rel in filter(None, out.split("\0")):
        if rel.split("/", 1)[0] in EXCLUDE_TOP:
            continue
        if (ROOT / rel).is_file():  # a tracked file deleted in the work tree is skipped
            files.append(rel)
    return sorted(set(files))


def copy_repo(dst: Path) -> None:
    for rel in repo_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def replacements(m: Mutation) -> list[tuple[str, str]]:
    return [(m.old, m.new), *m.extra]


def check_applies(m: Mutation, root: Path = ROOT) -> str:
    """The mutated text of ``m.file``; SystemExit if an original text is not there exactly once."""
    path = root / m.file
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SystemExit(f"mutation {m.name}: {m.file} does not exist; update tests/mutation_check.py") from None
    for old, new in replacements(m):
        count = text.count(old)
        if count != 1:
            raise SystemExit(
                f"mutation {m.name}: the original text occurs {count} times in {m.file} (must be exactly once); "
                f"the code changed: update tests/mutation_check.py\n--- original text ---\n{old}")
        text = text.replace(old, new)
    return text


def env_for(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    env.setdefault("UCX_NET_DEVICES", "lo")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_shadowing(copy: Path, env: dict) -> None:
    code = "import shm, ucxx_transport, clients, tests; print('\\n'.join(m.__file__ for m in " \
           "(shm, ucxx_transport, clients, tests)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"cannot import the packages from the copy:\n{out.stderr[-2000:]}")
    for f in out.stdout.split():
        if not Path(f).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy does not shadow the installed package: {f} is outside {copy}")


FAILED_RE = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_pytest(copy: Path, tests: tuple[str, ...], env: dict) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--timeout={PER_TEST_TIMEOUT_S}", *tests]
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = -1, f"pytest run exceeded {RUN_TIMEOUT_S} s\n{exc.stdout or ''}"
    return rc, text, time.monotonic() - t0


def verdict(rc: int, text: str) -> tuple[str, str]:
    if rc == 0:
        return "MISSED", ""
    if rc == 1:
        hits = FAILED_RE.findall(text)
        if hits:
            return "CAUGHT", hits[0][1]
        if "Timeout" in text:
            return "CAUGHT", "(pytest-timeout)"
        return "CAUGHT", "(failed)"
    if rc == -1:
        return "CAUGHT", "(hung past the run limit)"
    return "ERROR", f"pytest exit code {rc}"


def run_one(m: Mutation, keep: bool, verbose: bool) -> tuple[str, str, float]:
    with tempfile.TemporaryDirectory(prefix=f"mut-{m.name}-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(copy)
        (copy / m.file).write_text(check_applies(m, copy))
        env = env_for(copy)
        check_shadowing(copy, env)
        rc, text, dt = run_pytest(copy, m.tests, env)
        result, by = verdict(rc, text)
        if verbose or result == "ERROR":
            print(text[-4000:], file=sys.stderr)
        if keep:
            kept = Path(tempfile.mkdtemp(prefix=f"mut-{m.name}-kept-"))
            shutil.copytree(copy, kept / "repo")
            print(f"  kept {kept / 'repo'}", file=sys.stderr)
    return result, by, dt


def baseline(selected: list[Mutation], verbose: bool) -> None:
    tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="mut-baseline-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(copy)
        env = env_for(copy)
        check_shadowing(copy, env)
        rc, text, dt = run_pytest(copy, tests, env)
    print(f"baseline: {len(tests)} selections on the unmutated code: {'pass' if rc == 0 else 'FAIL'} ({dt:.0f} s)")
    if rc != 0:
        print(text[-6000:], file=sys.stderr)
        raise SystemExit("the selected tests fail on the unmutated code: fix them first (CAUGHT would mean nothing)")
    if verbose:
        print(text[-2000:], file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations (after checking they apply)")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selections on unmutated code")
    ap.add_argument("--keep", action="store_true", help="keep each mutated copy (for debugging)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    a = ap.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate mutation names"
    selected = MUTATIONS
    if a.only:
        unknown = sorted(set(a.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown mutation(s) {unknown}; --list shows them")
        selected = [m for m in MUTATIONS if m.name in a.only]
    for m in selected:  # fail loudly, before running anything, if the code moved on
        check_applies(m)

    if a.list:
        for m in selected:
            print(f"{m.name:36} {m.file:28} {m.what}")
            for t in m.tests:
                print(f"{'':38}{t}")
        return 0

    t_all = time.monotonic()
    if not a.no_baseline:
        baseline(selected, a.verbose)
    rows = []
    for m in selected:
        result, by, dt = run_one(m, a.keep, a.verbose)
        rows.append((m, result, by, dt))
        print(f"  {m.name:36} {result:7} {dt:5.0f} s  {by}", flush=True)

    print()
    w = max(len(m.name) for m in selected)
    print(f"{'mutation':{w}}  {'file':26}  {'result':7}  {'s':>4}  caught by")
    print("-" * (w + 80))
    for m, result, by, dt in rows:
        print(f"{m.name:{w}}  {m.file:26}  {result:7}  {dt:4.0f}  {by}")
    caught = sum(r == "CAUGHT" for _, r, _, _ in rows)
    print("-" * (w + 80))
    print(f"{caught}/{len(rows)} caught, total {time.monotonic() - t_all:.0f} s")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
