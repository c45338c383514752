"""Long commands killed with SIGKILL part-way through continue with --resume and end with exactly the
results of an uninterrupted run; a fresh run never overwrites finished units, a changed setup is refused."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from trustseg.engine.journal import Journal
from trustseg.engine.rundir import RunDir
from trustseg.errors import UserError

KILLED_RUN = Path(__file__).with_name("killed_run.py")
BOOKKEEPING = {"config.yaml", "progress.jsonl", ".trustseg.lock"}  # config.yaml records --resume itself


def kill_after(units: int, args: list[str], torn: bool = False) -> list[str]:
    """Run `trustseg args` in a subprocess SIGKILLed after `units` finished units; the units it recorded."""
    env = {**os.environ, **({"TORN_LINE": "1"} if torn else {})}
    done = subprocess.run([sys.executable, str(KILLED_RUN), str(units), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    out = Path(args[args.index("--out") + 1])
    lines = (out / "progress.jsonl").read_text().splitlines()
    return [json.loads(line)["unit"] for line in lines[1:] if line.endswith("}") and '"half' not in line]


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in BOOKKEEPING}


def without_timings(value):
    """Results with the fit times (which differ between any two runs) left out."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def refuse_then_resume(args: list[str], monkeypatch, capsys, expect: str) -> None:
    """A rerun without --resume is refused, one with --resume finishes and says what it skipped."""
    capsys.readouterr()
    assert run_cli(args, monkeypatch) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run_cli([*args, "--resume"], monkeypatch) == 0
    assert expect in capsys.readouterr().err


def test_robustness_resumes_after_sigkill_with_identical_results(tmp_path, robustness_args, monkeypatch, capsys):
    def args(out, *extra):
        return robustness_args(out, "gaussian_noise,fog", "1,4", *extra)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(args(whole), monkeypatch) == 0
    assert kill_after(2, args(resumed)) == ["clean", "gaussian_noise/1"]
    assert not (resumed / "robustness.json").exists()
    refuse_then_resume(args(resumed), monkeypatch, capsys,
                       "2 of 5 conditions already done and skipped, 3 to go")
    for name in ("robustness.json", "metrics.json"):
        assert json.loads((resumed / name).read_text()) == json.loads((whole / name).read_text()), name

    capsys.readouterr()
    assert run_cli([*args(resumed, "--seed", "1"), "--resume"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "setup differs" in err and "seed: 0 -> 1" in err and err.count("\n") == 1


def test_corrupt_resumes_after_sigkill_mid_write_with_identical_files(tmp_path, folder_data, monkeypatch, capsys):
    root, _ = folder_data

    def args(out):
        return ["corrupt", "--data", f"folder:{root}", "--out", str(out), "--corruptions", "shot_noise,elastic_transform",
                "--severities", "2", "--no-progress"]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(args(whole), monkeypatch) == 0
    assert kill_after(8, args(resumed), torn=True) == [*(f"shot_noise/2/{i}" for i in range(6)),
                                                       "elastic_transform/2/0", "elastic_transform/2/1"]
    refuse_then_resume(args(resumed), monkeypatch, capsys,
                       "8 of 12 images already done and skipped, 4 to go")
    assert files(resumed) == files(whole)
    lines = (resumed / "progress.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 12 and all(json.loads(line) for line in lines)  # the torn line was cut off
    assert len(files(whole)) == 2 * (6 + 6 + 1)  # images, masks and classes.txt of each condition


def test_calibrate_resumes_after_sigkill_with_identical_results(tmp_path, folder_data, monkeypatch, capsys):
    root, checkpoint = folder_data

    def args(out):
        return ["calibrate", "--checkpoint", str(checkpoint), "--fit-data", f"folder:{root}#images=0:4",
                "--data", f"folder:{root}#images=4:6", "--out", str(out), "--method", "ts,dirichlet",
                "--corruptions", "gaussian_noise", "--severities", "3", "--no-progress"]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(args(whole), monkeypatch) == 0
    # killed after the first fit: the fit data is collected again for the second
    assert kill_after(2, args(resumed)) == ["fit_data", "fit/ts"]
    refuse_then_resume(args(resumed), monkeypatch, capsys,
                       "1 of 5 steps (fits, choice, conditions) already done and skipped, 4 to go")
    results = [without_timings(json.loads((out / "calibration.json").read_text())) for out in (whole, resumed)]
    assert results[1] == results[0]
    saved = results[0]["saved"]
    states = [torch.load(out / saved, weights_only=True)["calibrator"] for out in (whole, resumed)]
    assert states[0]["method"] == states[1]["method"]
    for name, tensor in states[0]["state_dict"].items():
        assert torch.equal(states[1]["state_dict"][name], tensor), name


def test_resume_of_a_run_that_never_started_begins_it(tmp_path, robustness_args, monkeypatch, capsys):
    out = tmp_path / "fresh"
    args = robustness_args(out, "fog", "1", "--resume")
    assert run_cli(args, monkeypatch) == 0
    assert "resuming" not in capsys.readouterr().err
    assert json.loads((out / "robustness.json").read_text())["conditions"].keys() == {"clean", "fog/1"}

    # a run stopped before it finished anything (here: another setup) leaves nothing to keep or refuse
    stopped = tmp_path / "stopped"
    Journal(RunDir(stopped), "robustness", {"seed": 7}, resume=False)
    assert run_cli(robustness_args(stopped, "fog", "1"), monkeypatch) == 0


def test_a_changed_setup_is_refused_naming_the_nested_setting(tmp_path):
    setup = {"seed": 0, "adaptations": [{"method": "tent", "lr": 1e-4}, {"method": "norm"}]}
    journal = Journal(RunDir(tmp_path), "adapt", setup, resume=False)
    journal.record("clean", 1)
    changed = {"seed": 0, "adaptations": [{"method": "tent", "lr": 1e-3}, {"method": "norm", "bn_prior": 4}]}
    with pytest.raises(UserError) as refused:
        Journal(RunDir(tmp_path), "adapt", changed, resume=True)
    assert ("(adaptations[0].lr: 0.0001 -> 0.001; adaptations[1].bn_prior: (absent) -> 4)"
            in str(refused.value))
    assert Journal(RunDir(tmp_path), "adapt", setup, resume=True).done == {"clean": 1}


@pytest.mark.parametrize("damage", ["header", "middle"])
def test_a_damaged_journal_is_refused_not_trusted(tmp_path, robustness_args, monkeypatch, capsys, damage):
    out = tmp_path / "run"
    args = robustness_args(out, "fog", "1")
    assert run_cli(args, monkeypatch) == 0
    lines = (out / "progress.jsonl").read_text().splitlines(keepends=True)
    lines[0 if damage == "header" else 1] = "{not json\n"
    (out / "progress.jsonl").write_text("".join(lines))
    capsys.readouterr()
    assert run_cli([*args, "--resume"], monkeypatch) == 2
    assert "progress.jsonl is damaged" in capsys.readouterr().err
