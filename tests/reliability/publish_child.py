"""Run the nightly flow in this process and pause inside the publish transaction.

Usage: python -m tests.reliability.publish_child MARKER_FILE

After the second insert batch of lead_scores the process writes MARKER_FILE and sleeps, with
the old partition deleted and part of the new one inserted, none of it committed. The test
that started it then kills it with SIGKILL. The settings come from the FULCRUM_* variables
and the Prefect API from PREFECT_API_URL.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import tasks.publish as publish
from flows.nightly import nightly_scores
from tests.reliability.workspace import AS_OF

BATCH_ROWS = 50
BATCHES_BEFORE_PAUSE = 2


def main(marker: Path) -> None:
    write_batches = publish.iter_records

    def pausing_batches(frame, columns, batch_rows):
        for number, records in enumerate(write_batches(frame, columns, BATCH_ROWS), start=1):
            yield records
            # The consumer has inserted this batch by the time the generator resumes.
            if number == BATCHES_BEFORE_PAUSE:
                marker.write_text("publishing")
                time.sleep(600)

    publish.iter_records = pausing_batches
    nightly_scores(as_of=AS_OF, retrain=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
