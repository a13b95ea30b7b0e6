"""Crashes: the daemon SIGKILLed during a transfer, during inference and during delivery.

After each restart every instance the sender was told is stored is on disk and recorded,
every series reaches a final state, and the PACS (a real Orthanc) holds exactly one SEG per
series: a SEG delivered again after a crash is the same instance, not a duplicate.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from pydicom import dcmread

from dicom_node.testbed.node_process import NodeProcess, destination_toml, start_storescu, storescu
from dicom_node.testbed.peers import OrthancProcess
from tests.support import PhantomSeries

DELIVERY = {"backoff_initial_s": 0.5, "backoff_max_s": 1, "max_attempts": 1000}


def test_sigkill_at_any_stage_loses_nothing_and_delivers_each_seg_once(
    tmp_path: Path, phantom_series: PhantomSeries
) -> None:
    rng = random.Random(20261124)
    pacs = OrthancProcess(tmp_path / "orthanc").start()
    destination = pacs.destination()
    node = NodeProcess(tmp_path / "node", extra_config=destination_toml(destination, **DELIVERY))
    series_uids: dict[str, int] = {}  # -> instances sent
    try:
        for seed, phase in ((1003, "transfer"), (1001, "inference"), (1002, "delivery")):
            ct = phantom_series(seed)["ct"]
            files = sorted(ct.iterdir())
            uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            series_uids[uid] = len(files)
            node.start()
            if phase == "transfer":
                # Kill after a random number of acknowledged instances; storescu -v prints
                # "Received Store Response" once per instance the node acknowledged.
                stop_after = rng.randrange(5, len(files) - 5)
                sender = start_storescu(node.port, *files)
                assert sender.stdout is not None
                acknowledged = 0
                for line in sender.stdout:
                    if "Received Store Response" in line and "Success" in line:
                        acknowledged += 1
                        if acknowledged == stop_after:
                            node.crash()
                            break
                sender.kill()
                sender.wait()
                told_stored = {
                    str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    for f in files[:acknowledged]  # storescu sends in the order given
                }
                node.start()
                assert told_stored <= set(node.db_instances())
                spool = node.spool_files()
                assert {node.db_instances()[u] for u in told_stored} <= spool
                # The sender retries what was not acknowledged (here: everything again).
                assert storescu(node.port, *files).returncode == 0
            elif phase == "inference":
                assert storescu(node.port, *files).returncode == 0
                node.wait_for_db_state(uid, {"segmenting"}, 60)
                time.sleep(rng.uniform(0.0, 2.0))
                node.crash()
                node.start()
            else:  # delivery: the PACS is down while the node tries, the node dies meanwhile
                pacs.stop()
                assert storescu(node.port, *files).returncode == 0
                node.wait_for_db_state(uid, {"sending"}, 240)
                time.sleep(rng.uniform(0.5, 2.0))  # a few failed attempts
                node.crash()
                pacs.start()
                node.start()
            node.wait_for_db_state(uid, {"done", "no_findings", "failed"}, 240)
            assert node.db_state(uid) == "done", node.series()[uid]
            node.stop()

        # Every series reached done; the PACS holds one SEG per series.
        node.start()
        jobs = node.series()
        for uid, sent in series_uids.items():
            assert jobs[uid]["state"] == "done"
            assert jobs[uid]["instances"] == sent  # none lost, none counted twice
            seg_uid = jobs[uid]["seg_series_instance_uid"]
            (seg_series,) = pacs.find_series("SEG", SeriesInstanceUID=seg_uid)
            assert len(seg_series["Instances"]) == 1
        assert len(node.db_instances()) == sum(series_uids.values()) == len(node.spool_files())
    finally:
        node.kill()
        pacs.stop()
