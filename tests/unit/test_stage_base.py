"""Row accounting of the stage wrapper: every row out exactly once, errors never dropped."""

import pandas as pd
import pytest

from pairaug_ray.stages.base import RowStage, StageConfig, StageError


class Flaky(RowStage):
    name = "flaky"

    def process(self, rows):
        out = []
        for r in rows:
            if r["x"] % 3 == 0:
                out.append(StageError("bad_x", f"x={r['x']} divisible by 3"))
            elif r["x"] % 5 == 0:
                out.append([{**r, "y": r["x"] * 10, "variant": v} for v in range(2)])  # fan-out
            else:
                out.append([{**r, "y": r["x"] * 10, "variant": 0}])
        return out


class Crashy(RowStage):
    """Raises for the whole batch when any row is poisoned: the wrapper isolates the row."""

    name = "crashy"

    def process(self, rows):
        if any(r["x"] == 7 for r in rows):
            raise ZeroDivisionError("boom")
        return [[{**r, "z": 1}] for r in rows]


class Miscounting(RowStage):
    def process(self, rows):
        return [[r] for r in rows[:-1]]


def test_errors_become_rows_and_counts_add_up():
    batch = pd.DataFrame({"x": list(range(1, 16))})
    out = Flaky(StageConfig())(batch)
    errors = out[out.status == "error"]
    ok = out[out.status == "ok"]
    assert sorted(errors.x) == [3, 6, 9, 12, 15]
    assert set(errors.error_class) == {"bad_x"} and set(errors.stage) == {"flaky"}
    # 10 good rows, of which 5 and 10 fan out to 2 variants each
    assert len(ok) == 12 and sorted(set(ok.x)) == [1, 2, 4, 5, 7, 8, 10, 11, 13, 14]
    assert set(out.x) == set(batch.x)


def test_error_rows_skip_later_stages():
    first = Flaky(StageConfig())(pd.DataFrame({"x": [3, 4, 7]}))
    second = Crashy(StageConfig())(first)
    by_x = {r["x"]: r for r in second.to_dict("records")}
    assert by_x[3]["error_class"] == "bad_x" and by_x[3]["stage"] == "flaky"  # untouched
    assert by_x[4]["status"] == "ok" and by_x[4]["z"] == 1
    assert by_x[7]["status"] == "error" and by_x[7]["error_class"] == "ZeroDivisionError"
    assert by_x[7]["stage"] == "crashy" and "boom" in by_x[7]["error"]
    assert len(second) == 3


def test_wrong_result_count_is_a_bug():
    with pytest.raises(RuntimeError, match="returned 1 results for 2 rows"):
        Miscounting(StageConfig())(pd.DataFrame({"x": [1, 2]}))


def test_map_batches_kwargs_carry_resources():
    import ray.data

    cfg = StageConfig(batch_size=4, min_actors=2, max_actors=5, num_cpus=0.5, num_gpus=0.25,
                      accelerator_type="A100", resources={"diffusion_node": 1})
    kw = cfg.map_batches_kwargs(Flaky)
    assert isinstance(kw["compute"], ray.data.ActorPoolStrategy)
    assert kw["compute"].min_size == 2 and kw["compute"].max_size == 5
    assert kw["num_gpus"] == 0.25 and kw["accelerator_type"] == "A100"
    assert kw["resources"] == {"diffusion_node": 1} and kw["batch_size"] == 4
    assert kw["fn_constructor_kwargs"] == {"config": cfg}
    assert "concurrency" not in kw
