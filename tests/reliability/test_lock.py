"""One writer per run directory: a second command on a busy --out exits 2 naming the holder; a lock left
by a killed process is taken over with a warning; one process may open its own folder again."""

import os
import signal
import subprocess
import sys

from trustseg.engine.rundir import LOCK, RunDir

HOLD = "import sys, time; from trustseg.engine.rundir import RunDir; r = RunDir(sys.argv[1]); print('held', flush=True); time.sleep(300)"


def trustseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trustseg.cli", *args], capture_output=True, text=True, timeout=300)


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, folder_data):
    root, _ = folder_data
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        args = ["corrupt", "--data", f"folder:{root}", "--out", str(out), "--corruptions", "fog", "--severities", "1",
                "--no-progress"]
        refused = trustseg(*args)
        assert refused.returncode == 2, refused.stderr
        message = refused.stderr.strip()
        assert "\n" not in message and str(out) in message and f"process {holder.pid}" in message
        assert not (out / "fog").exists()  # the refused command wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    taken = trustseg(*args)
    assert taken.returncode == 0, taken.stderr
    assert f"taking over the lock left by process {holder.pid}" in taken.stderr
    assert len(list((out / "fog" / "1" / "images").iterdir())) == 6
    assert (out / LOCK).read_text() == ""  # released cleanly: the next command has nobody to warn about
    again = trustseg(*args, "--resume")
    assert again.returncode == 0 and "taking over" not in again.stderr


def test_one_process_may_hold_its_folder_more_than_once(tmp_path):
    outer = RunDir(tmp_path / "run")
    inner = RunDir(tmp_path / "run")
    del inner
    held = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert held.returncode == 1 and "is in use by process " + str(os.getpid()) in held.stderr
    del outer
    free = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr
