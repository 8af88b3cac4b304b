"""The standing fault campaign, bounded for CI (``pytest -m faults``).

Longer runs: ``python -m tests.fault_campaign --duration 600`` (see its --help).
"""

import os

import pytest

from tests import fault_campaign

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]


@pytest.mark.parametrize("seed", [11])
def test_fault_campaign_no_violations(tmp_path, seed):
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    duration = float(os.environ.get("UCXX_TRANSPORT_FAULT_DURATION_S", "90"))
    modes = ["take", "fetch", "local", "batch", "async"]
    report = fault_campaign.Campaign(str(tmp_path), seed, producers=2, consumers=modes,
                                     slots=16).run(duration, (0.05, 0.3), None)
    print(report)
    assert report["violations"] == {"lost": 0, "wrong_bytes": 0, "duplicates_one_client": 0, "leaked_slots": 0,
                                    "leaked_shm": [], "unprovoked_deaths": []}, report
    assert report["faults_total"] >= duration / 2 * 0.5  # the campaign really injected faults
    assert report["published"] > 100 and report["delivered"] >= report["published"]
    assert all(report["delivered_by_mode"].get(m, 0) > 0 for m in modes), report
