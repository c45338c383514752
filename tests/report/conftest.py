import pytest

from run_dirs import make_runs


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Run directories of real eval and robustness commands, made once for every report test."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return make_runs(tmp_path_factory.mktemp("runs"), monkeypatch)
