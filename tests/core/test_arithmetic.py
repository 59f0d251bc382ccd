from thinkrl.tasks import make_task
from thinkrl.tasks.arithmetic import has_carry, last_boxed, worked_solution
from thinkrl.types import Sample


def test_worked_solution_with_and_without_carries():
    assert worked_solution(347, 85) == ("7+5=12 4+8+1=13 3+1=4 \\boxed{432}", 432)
    assert worked_solution(347, 85, carries=False) == ("7+5=12 4+8=12 3=3 \\boxed{322}", 322)
    assert worked_solution(95, 5)[1] == 100
    assert not has_carry(12, 34) and has_carry(19, 1)


def test_reward_exact_last_box():
    t = make_task("arithmetic")
    s = Sample(id="x", prompt="347+85", answer=432, meta={"a": 347, "b": 85})
    assert t.reward("... \\boxed{432}", s) == 1.0
    assert t.reward("\\boxed{432} then \\boxed{431}", s) == 0.0  # the last box counts
    assert t.reward("432", s) == 0.0
    assert t.reward("\\boxed{0432}", s) == 0.0
    assert t.reward("\\boxed{" * 50, s) == 0.0
    assert last_boxed("\\boxed{ 7 }") == "7"


def test_teacher_is_systematically_wrong():
    t = make_task("arithmetic", {"drop_rate": 0.6})
    samples = t.generate(2000, seed=3)
    acc = t.teacher_accuracy(samples)
    assert 0.5 <= acc <= 0.8
    # every teacher error is a dropped carry, and it is deterministic per problem
    for s in samples[:300]:
        demo = t.demonstration(s)
        assert demo == t.demonstration(s)
        if t.reward(demo, s) == 0.0:
            assert has_carry(s.meta["a"], s.meta["b"]) and t.teacher_drops(s.meta["a"], s.meta["b"])
    assert make_task("arithmetic", {"drop_rate": 0.0}).teacher_accuracy(samples) == 1.0


def test_generator_is_seeded_and_params_checked():
    t = make_task("arithmetic")
    assert [s.prompt for s in t.generate(20, 1)] == [s.prompt for s in t.generate(20, 1)]
    assert [s.prompt for s in t.generate(20, 1)] != [s.prompt for s in t.generate(20, 2)]
    import pytest

    with pytest.raises(ValueError, match="unknown parameter"):
        make_task("arithmetic", {"max_digitz": 3})
    with pytest.raises(ValueError, match="drop_rate"):
        make_task("arithmetic", {"drop_rate": 2})


def test_padded_prompts_work_every_column():
    t = make_task("arithmetic", {"pad": True, "max_digits": 3})
    s = [x for x in t.generate(200, 5) if x.meta["a"] < 10 and x.meta["b"] < 10][0]
    assert len(s.prompt) == 7 and s.prompt[3] == "+"
    demo = worked_solution(s.meta["a"], s.meta["b"], width=3)[0]
    assert demo.count("=") == 3 and t.reward(demo, s) == 1.0
