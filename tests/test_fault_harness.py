"""The fault campaign's own bookkeeping: a harness bug reads as a product failure in CI."""

import json

import numpy as np
import pytest

from tests import fault_campaign


def test_new_refs_never_parses_a_line_still_being_written(tmp_path, make_ring):
    # A fetch client reads the producers' logs while they append. It once consumed a half-written
    # line, moved its offset past it, and next time parsed the line's tail: JSONDecodeError, an
    # "unprovoked death" in CI. Only complete lines count; a partial one is read whole later.
    ring = make_ring()
    refs = [ring.put({"x": np.arange(3)}) for _ in range(2)]
    lines = [json.dumps({"tag": "p", "seq": i, "crc": 0, "ref": r.to_dict()}) + "\n" for i, r in enumerate(refs)]
    log = tmp_path / "pub-p.log"
    cut = len(lines[1]) // 2
    log.write_text(lines[0] + lines[1][:cut])
    offsets: dict = {}
    assert fault_campaign._new_refs(str(tmp_path), offsets) == [refs[0]]
    assert fault_campaign._new_refs(str(tmp_path), offsets) == []  # still partial: nothing, no error
    with open(log, "a") as f:
        f.write(lines[1][cut:])
    assert fault_campaign._new_refs(str(tmp_path), offsets) == [refs[1]]
    assert fault_campaign._new_refs(str(tmp_path), offsets) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["fetch", "take"])
def test_a_client_left_without_a_server_at_stop_still_ends(tmp_path, make_ring, ring_name, spawn, mode):
    # The campaign's last fault may kill the server just before STOP. Network clients then saw no
    # server address and looped straight back, past the STOP check: "hung" in CI. With no server,
    # a turn is an idle turn, and STOP ends the client after its idle grace period.
    make_ring()
    (tmp_path / "STOP").touch()
    p = spawn.Process(target=fault_campaign.consumer, args=(ring_name, str(tmp_path), f"c-{mode}-1", mode))
    p.start()
    p.join(30)
    alive = p.is_alive()
    if alive:
        p.kill()
        p.join(5)
    assert not alive and p.exitcode == 0, (tmp_path / f"stack-c-{mode}-1.txt").read_text()[-2000:]
