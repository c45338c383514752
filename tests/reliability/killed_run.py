"""`python killed_run.py K ARGS...`: run `trustseg ARGS` and kill this process with SIGKILL right after
it records its K-th finished unit, as a crash or the out-of-memory killer would stop it. With
TORN_LINE=1 set, half of one more journal line is written first, as a kill during a write leaves it.
"""

import os
import signal
import sys

from trustseg.cli import main
from trustseg.engine import journal

limit = int(sys.argv[1])
recorded = []
record = journal.Journal.record


def record_then_die(self, unit, value):
    result = record(self, unit, value)
    recorded.append(unit)
    if len(recorded) == limit:
        if os.environ.get("TORN_LINE"):
            with open(self.path, "ab") as handle:
                handle.write(b'{"unit": "half a li')
        os.kill(os.getpid(), signal.SIGKILL)
    return result


journal.Journal.record = record_then_die
sys.argv = ["trustseg", *sys.argv[2:]]
main()
