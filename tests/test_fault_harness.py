"""The fault campaign's own bookkeeping: a harness bug reads as a product failure in CI."""

import json

import numpy as np

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
