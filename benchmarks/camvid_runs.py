"""What the CamVid experiments share: running a trustseg command as a user would, and the split that
holds out sequence 0006R0 (train images 62:163, see shared/data/camvid/README.md) as a natural shift."""

from __future__ import annotations

import subprocess
import sys


def trustseg(*args: str) -> None:
    command = [sys.executable, "-m", "trustseg.cli", *args, "--no-progress"]
    print("$ trustseg", " ".join(args), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def train_without_held_out(camvid: str) -> str:
    """CamVid train without sequence 0006R0 (266 images)."""
    return f"camvid:{camvid}#split=train,images=0:62,cache=true+camvid:{camvid}#split=train,images=163:,cache=true"


def evaluation_specs(camvid: str, step: int = 1) -> dict[str, str]:
    """CamVid val (sequence 0016E5, which most training frames share) and the held-out sequence 0006R0,
    every `step`-th frame."""
    every = "" if step == 1 else f":{step}"
    return {"val (0016E5)": f"camvid:{camvid}#split=val" + (f",images=0:{every}" if every else ""),
            "held out (0006R0)": f"camvid:{camvid}#split=train,images=62:163{every}"}


def folder_name(where: str) -> str:
    """The run-folder name of an `evaluation_specs` key: "val" or "heldout"."""
    return where.split()[0].replace("held", "heldout")
