"""A write the disk refuses (ENOSPC, simulated) is a one-line error that keeps the previous file and every
finished unit; after space is freed, --resume ends with the results of an uninterrupted run."""

import errno
import json
import os

import pytest

from cli_helpers import run_cli, save_tiny_unet
from trustseg import cli
from trustseg.engine.checkpoint import load_checkpoint, save_checkpoint
from trustseg.errors import UserError


def refuse_fsync(monkeypatch, name: str, after: int = 0) -> None:
    """Make syncing a file called `name` fail with ENOSPC, after `after` successful syncs of it."""
    real, synced = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith((name, f".{name}.")):
            if len(synced) >= after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            synced.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_tiny_unet(path, seed=0)
    before = path.read_bytes()
    refuse_fsync(monkeypatch, "last.pt")
    checkpoint = load_checkpoint(path)
    with pytest.raises(UserError, match=r"cannot write .*last\.pt: No space left on device; the previous file is unchanged"):
        save_checkpoint(checkpoint, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_robustness_stopped_by_a_full_disk_keeps_its_units_and_resumes(tmp_path, robustness_args, monkeypatch, capsys):
    def args(out, *extra):
        return robustness_args(out, "contrast", "1,2", *extra)

    whole, full = tmp_path / "whole", tmp_path / "full"
    assert run_cli(args(whole), monkeypatch) == 0
    with monkeypatch.context() as patch:
        refuse_fsync(patch, "progress.jsonl", after=2)  # the header and the clean condition get through
        capsys.readouterr()
        assert run_cli(args(full), monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot record contrast/1" in err and "No space left on device" in err
    units = [json.loads(line)["unit"] for line in (full / "progress.jsonl").read_text().splitlines()[1:]]
    assert units[0] == "clean"
    assert run_cli(args(full, "--resume"), monkeypatch) == 0
    assert json.loads((full / "robustness.json").read_text()) == json.loads((whole / "robustness.json").read_text())


@pytest.mark.parametrize("code, shown", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_any_write_the_system_refuses_ends_in_one_line(monkeypatch, capsys, code, shown):
    """Writes outside atomic_write (a history line appended, say) end the same way, without a traceback."""
    def refused():
        raise OSError(code, os.strerror(code), "run/history.jsonl")

    monkeypatch.setattr(cli, "app", refused)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write run/history.jsonl: {shown}"


def test_other_os_errors_keep_their_traceback(monkeypatch):
    def broken():
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        cli.main()
