"""The sweep's pure parts: pass@n and cons@n, the settings a model is swept at, and the three tables on an
engine that replays solver demonstrations (so the right numbers are known from the demonstrations)."""

from __future__ import annotations

import random

import pytest

from apr_ray.countdown.demos import flatten_apr, flatten_sosp
from apr_ray.countdown.problems import ProblemConfig, generate_problems
from apr_ray.countdown.solvers import SolverConfig, solve_apr, solve_sosp
from apr_ray.rollout.engines import ReplayEngine, TextCodec
from apr_ray.rollout.runtime import RuntimeConfig
from apr_ray.sweep import Sweep, SweepConfig, SweptModel, cons_at, pass_at, settings, write_sweep
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TreeMetrics, TreeRecord


def tree(answer: str | None, correct: bool) -> TreeRecord:
    return TreeRecord(1, [1], [], TreeMetrics(0, 0, 1, 1, 0, 0, 0.0), answer, correct)


def test_pass_and_cons_at_n():
    right, wrong_a, wrong_b, none = tree("r", True), tree("a", False), tree("b", False), tree(None, False)
    groups = [
        [wrong_a, right, wrong_a],  # pass from n=2; the vote is wrong at n=3 (a, a vs r)
        [none, none, right],  # unanswered samples do not vote: cons from n=3
        [right, wrong_a, wrong_b],  # a tie goes to the answer reached first... after n=1 it is r anyway
        [none, none, none],  # never answered: wrong for both
    ]
    assert [pass_at(groups, n) for n in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert [cons_at(groups, n) for n in (1, 2, 3)] == [0.25, 0.25, 0.5]
    tie = [[wrong_a, right]]
    assert cons_at(tie, 2) == 0.0 and cons_at([[right, wrong_a]], 2) == 1.0


def test_settings_per_protocol():
    cfg = SweepConfig(children=[1, 3], sosp_budgets=[None, 512])
    assert settings("apr", cfg) == [("1 child", {"max_children": 1}), ("3 children", {"max_children": 3})]
    both = cfg.model_copy(update={"children_as": "both"})
    assert settings("apr", both)[1] == ("3 children", {"max_children": 3, "budget": 3})
    assert settings("sosp", cfg) == [("no budget", {"budget": None}), ("budget 512", {"budget": 512})]


@pytest.mark.parametrize("field,value", [("windows", [256, 128]), ("children", [0, 2]), ("samples", [2, 2])])
def test_sweep_lists_must_be_positive_and_increasing(field, value):
    with pytest.raises(ValueError, match="strictly increasing"):
        SweepConfig(**{field: value})


@pytest.fixture(scope="module")
def replay():
    """Problems with their SoS+ and APR solver demonstrations, and one replay engine per protocol."""
    tok = build_tokenizer()
    problems = generate_problems(ProblemConfig(num_operands=3, num_max=20, target_max=30), 12, seed=0)
    rng = random.Random(1)
    sosp = [flatten_sosp(p, solve_sosp(p, SolverConfig(), rng)[0]) for p in problems]
    apr = [flatten_apr(p, solve_apr(p, SolverConfig(apr_spawn_order="generated"), rng)) for p in problems]
    return tok, problems, sosp, ReplayEngine.from_demos(sosp, tok), ReplayEngine.from_demos(apr, tok)


def test_the_three_tables_on_replayed_demonstrations(replay, tmp_path):
    tok, problems, sosp_demos, sosp_engine, apr_engine = replay
    codec = TextCodec(tok)
    # the longest SoS+ request (BOS + prompt + trace + EOS): any window from there on holds every trace
    longest = max(1 + len(codec.encode(s.prompt)) + len(codec.encode(s.completion)) + 1
                  for d in sosp_demos for s in d.sequences)
    tight = 64
    cfg = SweepConfig(problems=len(problems), windows=[tight, longest], children=[1, 16], samples=[1, 2],
                      latency_problems=3)
    sweep = Sweep(cfg, problems, tok, RuntimeConfig(max_tokens=1024, context_window=2048), progress=lambda _: None)
    models = [SweptModel("APR", "apr", apr_engine), SweptModel("SoS+", "sosp", sosp_engine)]
    tables = sweep.run(models)

    solved_demos = sum(d.solved for d in sosp_demos) / len(sosp_demos)
    context = {(r["model"], r["setting"], r["window"]): r for r in tables["context"]}
    assert len(context) == 2 * 2 + 1 * 2  # APR: 2 settings x 2 windows; SoS+: 1 setting x 2 windows
    full = context[("SoS+", "no budget", longest)]
    assert full["solved"] == pytest.approx(solved_demos) and full["stopped_by_window"] == 0.0
    cut = context[("SoS+", "no budget", tight)]
    assert cut["stopped_by_window"] > 0 and cut["solved"] < full["solved"]
    assert cut["tokens_total_mean"] < tight  # one thread: it cannot generate past its window
    # the replayed APR demonstrations spawn up to beam-many children: capping them at one loses solutions
    assert context[("APR", "16 children", longest)]["solved"] > context[("APR", "1 child", longest)]["solved"]

    tokens = {(r["model"], r["setting"], r["metric"], r["n"]): r for r in tables["tokens"]}
    # a replay ignores the temperature: every sample is the demonstration, so n samples cost n times the
    # tokens and neither pass@n nor cons@n gains anything over one sample
    greedy = tokens[("SoS+", "no budget", "greedy", 1)]
    assert greedy["accuracy"] == pytest.approx(solved_demos)
    for metric in ("pass@n", "cons@n"):
        assert tokens[("SoS+", "no budget", metric, 2)]["accuracy"] == pytest.approx(solved_demos)
    assert tokens[("SoS+", "no budget", "pass@n", 2)]["tokens_per_problem"] == pytest.approx(
        2 * tokens[("SoS+", "no budget", "pass@n", 1)]["tokens_per_problem"])

    latency = {(r["model"], r["setting"]): r for r in tables["latency"]}
    assert set(latency) == {("APR", "1 child"), ("APR", "16 children"), ("SoS+", "no budget")}
    assert all(r["problems"] == 3 and r["latency_s_mean"] > 0 for r in latency.values())

    written = write_sweep(tables, tmp_path, "replay")
    assert sorted(p.name for p in written) == sorted(f"{n}.{e}" for n in ("context", "tokens", "latency")
                                                     for e in ("csv", "md", "png"))
    assert (tmp_path / "context.csv").read_text().splitlines()[0] == (
        "model,setting,window,problems,solved,stopped_by_window,tokens_total_mean,tokens_critical_path_mean")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_more_sweep_problems_than_the_split_holds_names_the_key(replay):
    tok, problems = replay[0], replay[1]
    with pytest.raises(ValueError, match=r"eval.sweep.problems = 20, but the evaluated split holds 12"):
        Sweep(SweepConfig(problems=20), problems, tok, RuntimeConfig())
