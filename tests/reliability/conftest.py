import pytest


@pytest.fixture(autouse=True)
def fuzz_on_one_thread(one_thread):
    """Every fuzzer runs on one torch thread: its tensors are tiny, and on a busy 2-core machine the
    second thread's barriers made the checkpoint fuzzers 4-6x slower (measured: 36 s -> 8 s)."""
