import pytest

from trustseg.compress.spec import Step, family, parse_spec, spec_name
from trustseg.errors import UserError


def test_a_chain_parses_into_typed_steps():
    steps = parse_spec("prune:flops=0.7,importance=magnitude+tome:r=4")
    assert steps == (Step("prune", {"flops": 0.7, "importance": "magnitude"}), Step("tome", {"r": 4}))
    assert family(steps) == "prune+tome"


def test_a_per_block_schedule_and_flags():
    (step,) = parse_spec("tome:r=0/0/8/8,prop_attn=false")
    assert step.options == {"r": (0, 0, 8, 8), "prop_attn": False}


@pytest.mark.parametrize("text", ["tome:r=8", "prune:flops=0.5+tome:r=0/2/4,inflect=-0.5", "algm:tau=0.9"])
def test_the_canonical_name_parses_back_to_the_same_steps(text):
    steps = parse_spec(text)
    assert parse_spec(spec_name(steps)) == steps


@pytest.mark.parametrize("text, message", [
    ("merge:r=8", "unknown method 'merge'"),
    ("tome", "tome needs r="),
    ("tome:r=-1", "r='-1'"),
    ("tome:k=3", "tome takes r=..."),
    ("prune:flops=1.0", "fraction in \\(0, 1\\)"),
    ("prune:flops=0", "fraction in \\(0, 1\\)"),
    ("prune:flops=0.5,importance=hessian", "expected one of taylor, magnitude"),
    ("algm:tau=1.5", "cosine similarity"),
    ("tome:r=4+prune:flops=0.5", "prune first"),
    ("tome:r=4+algm:tau=0.9", "at most one"),
])
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(UserError, match=message):
        parse_spec(text)
