"""MAGE (`xwlearn.agents.mage`, reproduction in `xwlearn.repro.mage`): the execution-state tree under random operation
sequences, the agent loop and the MemoryArena runner on a fixture. No network, no model downloads. The LLM backends
(`ChatLM`, `OpenAIChat`) are tested in `tests/test_llm_core.py`."""
import json, copy

import numpy as np
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import settings, strategies as st, HealthCheck
from hypothesis.stateful import RuleBasedStateMachine, rule, invariant, precondition

from xwlearn.agents.mage import ExecTree, Node, LLM, MageMemory, act_prompt, parse_memory_action
from xwlearn.llm.core import approx_tokens, ChatLM, OpenAIChat
from xwlearn.repro.mage import (BundleShop, ScriptedLLM, FullContext, SlidingWindow, Retrieval, HashEmbedder, run_episode,
                                evaluate, summarize_runs, load_memoryarena, write_memoryarena_fixture, score_answer,
                                parse_action, read_memory, success_model, detection_rates, predicted_success,
                                claim_checks)


class TreeMachine(RuleBasedStateMachine):
    "Random Grow / Compress / Maintain(+Revise) sequences; invariants, frozen inactive nodes, JSON, bounded state."
    def __init__(self):
        super().__init__()
        self.t, self.frozen, self.max_line = ExecTree("task"), {}, 0

    def _freeze(self):
        for i in self.t.inactive(): self.frozen.setdefault(i, copy.deepcopy(asdict(self.t.nodes[i])))

    @rule(a=st.sampled_from(["search a", "inspect b", "buy c"]), o=st.text(max_size=20))
    def grow(self, a, o): self.t.grow(a, o)

    @precondition(lambda self: bool(self.t.raw()))
    @rule(s=st.text(min_size=1, max_size=20))
    def compress(self, s): self.t.compress(s)

    @precondition(lambda self: self.t.top != 0)
    @rule(k=st.integers(0, 100), revise=st.booleans(), note=st.text(max_size=10))
    def maintain_fails(self, k, revise, note):
        b = self.t.boundaries()
        self.t.annotate(self.t.top, note)
        if revise:
            before = {i: copy.deepcopy(asdict(n)) for i, n in self.t.nodes.items()}
            target = b[k % len(b)]
            self.t.revise(target, hint=f"h{len(self.t.hints)}")
            assert self.t.cur == target and self.t.raw() == []
            for i, d in before.items():  # Revise itself writes nothing into any node
                assert asdict(self.t.nodes[i]) == d
        else: self.t.hints.append("hint only")
        self._freeze()

    @precondition(lambda self: bool(self.t.active_steps()))
    @rule(k=st.integers(0, 100))
    def agent_revise(self, k):
        "An agent-triggered Revise of step s rewinds to the last boundary before s, and s leaves the active path."
        s = [self.t.nodes[i].step for i in self.t.active_steps()][k % len(self.t.active_steps())]
        target = self.t.boundary_before(s)
        assert target in self.t.boundaries() and (target == 0 or self.t.nodes[target].step < s)
        later = [b for b in self.t.boundaries() if b and self.t.nodes[b].step < s]
        assert target == (later[-1] if later else 0)                        # the last one before s, not any
        self.t.revise(target, hint="agent")
        assert s not in {self.t.nodes[i].step for i in self.t.active_steps()}
        self._freeze()

    @rule(k=st.integers(0, 100))
    def bad_revise_is_rejected(self, k):
        steps = [i for i, n in self.t.nodes.items() if n.kind == "step" and i not in self.t.boundaries()]
        if steps:
            with pytest.raises(ValueError): self.t.revise(steps[k % len(steps)])

    @invariant()
    def tree_is_valid(self): self.t.check()

    @invariant()
    def inactive_nodes_never_change(self):
        for i, d in self.frozen.items():
            assert i in self.t.inactive(), f"node {i} became active again"
            assert asdict(self.t.nodes[i]) == d, f"inactive node {i} changed"

    @invariant()
    def json_round_trip(self):
        s = self.t.to_json()
        t2 = ExecTree.from_json(s)
        assert t2 == self.t and t2.to_json() == s and t2.render() == self.t.render()

    @invariant()
    def state_bounded_by_subgoals_not_steps(self):
        S = self.t.state()
        bound = (len(S.C) * (len("[steps 99999-99999] ") + 21) + len(S.R) * (len("[99999] inspect b -> ") + 21)
                 + len(S.H) * 12 + 80)
        assert len(self.t.render()) <= bound
        # the active path is C's covers + R: nothing from inactive branches is rendered
        act = self.t.active()
        assert all(i in act for s in self.t.active_subgoals() for i in self.t.nodes[s].cover)


TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_revise_branches_and_keeps_flawed_branch():
    t = ExecTree("t")
    t.grow("a", "1"); t.grow("b", "2"); s1 = t.compress("s1")
    t.grow("c", "3"); t.grow("d", "4"); s2 = t.compress("s2"); t.annotate(s2, "bad")
    flawed = {i: copy.deepcopy(t.nodes[i]) for i in (4, 5, s2)}
    t.revise(2, hint="avoid d")
    t.grow("e", "5")
    assert t.active_steps() == [1, 2, 7] and t.nodes[2].children == [4, 7]
    assert {i: t.nodes[i] for i in flawed} == flawed and t.inactive() == set(flawed)
    assert t.nodes[s2].note == "bad" and t.hints == ["avoid d"] and t.nodes[7].branch == 1
    with pytest.raises(ValueError, match="not a boundary"): t.revise(4)
    with pytest.raises(ValueError, match="not an active subgoal"): t.annotate(s2, "x")
    t.check()


def test_corrupt_json_is_rejected():
    t = ExecTree("t"); t.grow("a", "1"); t.grow("b", "2"); t.compress("s")
    d = json.loads(t.to_json())
    d["nodes"][2]["parent"] = 0
    with pytest.raises(AssertionError): ExecTree.from_dict(d)
    with pytest.raises(ValueError, match="version"): ExecTree.from_dict({**json.loads(t.to_json()), "version": 2})


def test_environment_and_scripted_policy():
    for seed in range(5):
        env = BundleShop(n_slots=6, n_cand=4, seed=seed)
        for c, (j, a) in env.deps.items():
            assert env.products[env.target[c]].attrs[a] == env.products[env.target[j]].attrs[a]
        r = run_episode(env, FullContext(), ScriptedLLM(p_err=0.0))
        assert r["success"] and r["steps"] == env.optimal_steps and r["constraints_ok"] and r["within_budget"]
    assert parse_action("ok: Buy P31.") == "buy P31" and parse_action("SUBMIT") == "submit" and parse_action("") == "invalid"


def test_scripted_policy_is_deterministic():
    a = [run_episode(BundleShop(6, seed=s), MageMemory(), ScriptedLLM(0.2, seed=s)) for s in range(3)]
    b = [run_episode(BundleShop(6, seed=s), MageMemory(), ScriptedLLM(0.2, seed=s)) for s in range(3)]
    assert a == b


def test_mage_tokens_bounded_by_subgoals():
    env = BundleShop(n_slots=16, n_cand=4, seed=2)
    full, mem = run_episode(env, FullContext(), ScriptedLLM(0.0)), MageMemory()
    r = run_episode(env, mem, ScriptedLLM(0.0))
    assert r["success"] and full["success"]
    S = mem.tree.state()
    assert len(S.C) == 16 and len(S.R) <= mem.threshold
    task = approx_tokens(act_prompt(env.task, "", mem.tools()))
    per_summary = max(approx_tokens(c) + 6 for *_, c in S.C)
    per_step = max(approx_tokens(n.content) + 4 for n in mem.tree.nodes.values() if n.kind == "step")
    assert max(r["tokens"]) <= task + 4 + len(S.C) * per_summary + mem.threshold * per_step
    assert max(full["tokens"]) > 2 * max(r["tokens"])  # full context grows with steps


def test_maintain_revise_recovers_and_ablations_differ():
    s = summarize_runs(evaluate(12, arms=["full context", "MAGE", "MAGE −Maintain", "MAGE −Revise"], p_err=0.15))
    assert s["MAGE"]["success"] > s["full context"]["success"]
    assert s["MAGE"]["revisions"] > 0 and s["MAGE −Revise"]["revisions"] == 0 == s["MAGE −Revise"]["agent_revisions"]
    # without Maintain only the agent's own check revises
    assert s["MAGE −Maintain"]["revisions"] == s["MAGE −Maintain"]["agent_revisions"] > 0
    assert s["MAGE"]["ctx_tokens"] < 0.7 * s["full context"]["ctx_tokens"]


def test_retrieval_and_window_render_bounded():
    env = BundleShop(6, seed=1)
    for mem in (SlidingWindow(6), Retrieval(HashEmbedder(), k=3, recent=5)):
        run_episode(env, mem, ScriptedLLM(0.0))
        n_lines = len([l for l in mem.render().split("\n") if l.startswith("[")])
        assert n_lines <= 6 if isinstance(mem, SlidingWindow) else n_lines <= 8


def test_read_memory_conflicts():
    f = read_memory("Added P01 (laptop: port=usbc, $9) to cart. Cart: laptop.\nBought P02 (laptop: port=barrel, $8). Cart: laptop.")
    assert f.bought["laptop"] == ["P01", "P02"] and f.cart == {"laptop"} and f.items["P02"].attrs["port"] == "barrel"


def test_backends_are_llms():
    assert isinstance(ChatLM(), LLM) and isinstance(ScriptedLLM(), LLM)
    assert isinstance(OpenAIChat("http://127.0.0.1:1/v1", model="m"), LLM)


def test_memoryarena_runner_smoke(tmp_path):
    from xwlearn.core import get_recipe
    from xwlearn.recipes import train
    r = get_recipe("mage_memoryarena_endpoint")
    assert r.kind == "run" and r.paper == "mage" and r.dataset == "memoryarena"
    assert (Path(__file__).resolve().parents[1]/"datasets"/"memoryarena.md").exists()
    write_memoryarena_fixture(tmp_path/"data", n_tasks=2, n_sub=3)
    res = train("mage_memoryarena_endpoint", data=tmp_path/"data", smoke=True, out_dir=tmp_path/"run")
    assert res["per_config"]["bundled_shopping"]["MAGE"]["success"] == 1.0
    assert json.loads((tmp_path/"run"/"results.json").read_text())["results"]["per_config"] == res["per_config"]
    assert len((tmp_path/"run"/"episodes.jsonl").read_text().splitlines()) == 8
    (tmp_path/"bad").mkdir(); (tmp_path/"bad"/"x.jsonl").write_text('{"questions": ["a"], "answers": []}\n')
    with pytest.raises(ValueError, match="equal length"): load_memoryarena(tmp_path/"bad")
    assert score_answer("I pick B0ABCDEFGH.", {"target_asin": "B0ABCDEFGH"}) and not score_answer("12", "2")
    assert score_answer("The answer is 42.", "42")


def test_registered():
    from xwlearn.core import REPRODUCTIONS
    assert REPRODUCTIONS["mage"].paper == "mage"


def _validated(reply):
    "A MageMemory whose validator answers `reply` after one two-step subgoal."
    mem = MageMemory()
    mem.reset("t", lambda p: "a summary" if p.startswith("### SUMMARIZE") else reply)
    mem.record("search a", "x"); mem.record("buy b", "y"); mem.subgoal_done()
    return mem


def test_validator_replies_parse_strictly():
    "FAIL in any case, with `|` or `:` before the diagnosis, revises; OK does not; an unreadable reply is counted."
    for reply in ("FAIL 0 | x", "fail 0 | x", "FAIL 0: x", "Fail 0 - x", '{"verdict": "FAIL", "target": 0, "diagnosis": "x"}'):
        mem = _validated(reply)
        assert (mem.revisions, mem.tree.hints, mem.n_unparsed) == (1, ["x"], 0), reply
    for reply in ("OK", "ok.", "OK - the summary follows", '{"verdict": "OK"}'):
        mem = _validated(reply)
        assert (mem.revisions, mem.tree.hints, mem.n_unparsed) == (0, [], 0), reply
    mem = _validated("The summary looks wrong to me.")           # neither verdict: no revision, but not silently OK
    assert (mem.revisions, mem.n_unparsed) == (0, 1)
    mem = _validated("FAIL: the buy is wrong")                   # no target: the diagnosis becomes a hint, no rewind
    assert (mem.revisions, mem.tree.hints) == (0, ["the buy is wrong"])


def test_score_answer_strict():
    "The final answer statement must state the gold answer, not negate it or follow it with another candidate."
    assert not score_answer("It is not 12, it is 15", "12")
    assert not score_answer("not 12", "12") and not score_answer("12? No wait, 15", "12")
    assert not score_answer("The answer is 12. Actually it's 15.", "12")
    assert not score_answer("Not B0ABCDEFGH; I pick B0ZZZZZZZ1.", {"target_asin": "B0ABCDEFGH"})
    assert score_answer("The answer is 42.", "42") and score_answer("12", "12") and score_answer("It is 12, not 15.", "12")
    assert score_answer("I pick B0ABCDEFGH.", {"target_asin": "B0ABCDEFGH"}) and not score_answer("12", "2")
    assert score_answer("x = 3.5", "3.5") and score_answer("3 and 4", ["3", "4"]) and score_answer("Paris", "paris")


def test_parse_action_strict():
    assert parse_action("I cannot submit yet; search laptop") == "search laptop"
    assert parse_action("Do not buy P01; buy P02") == "buy P02"
    assert parse_action("ok: Buy P31.") == "buy P31" and parse_action("SUBMIT") == "submit" and parse_action("") == "invalid"
    assert parse_action("Action: inspect P03") == "inspect P03" and parse_action("search laptop\n") == "search laptop"
    assert parse_action('{"action": "buy P01"}') == "buy P01" and parse_action("I won't submit") == "invalid"


class _FlakyEndpoint:
    "The scripted backend behind a fake `OpenAIChat`; the call numbered `fail_at` (1-based, over all instances) raises."
    calls, fail_at = 0, None
    model, base_url = "fake", "http://fake/v1"
    def __init__(self): self.inner = ScriptedLLM(seed=0)
    def __call__(self, prompt):
        type(self).calls += 1
        if type(self).calls == type(self).fail_at: raise OSError("HTTP 502 from the fake endpoint")
        return self.inner(prompt)


def test_endpoint_run_is_journaled_and_resumes(tmp_path, monkeypatch):
    "An error at call N keeps every finished task on disk; a second run makes only the remaining calls."
    from xwlearn.repro.mage import mage_memoryarena_endpoint
    monkeypatch.setattr("xwlearn.repro.mage.OpenAIChat", _FlakyEndpoint)
    data = write_memoryarena_fixture(tmp_path/"data", n_tasks=2, n_sub=3)
    def run(out, fail_at=None):
        _FlakyEndpoint.calls, _FlakyEndpoint.fail_at = 0, fail_at
        return mage_memoryarena_endpoint(data, out_dir=out)
    ref = run(tmp_path/"ref"); total = _FlakyEndpoint.calls
    ref_lines = (tmp_path/"ref"/"episodes.jsonl").read_text().splitlines()
    assert total == 48 and len(ref_lines) == 8                 # 2 configs x 2 arms x 2 tasks; 3 calls per subtask for MAGE
    with pytest.raises(OSError, match="502"): run(tmp_path/"out", fail_at=31)
    assert (tmp_path/"out"/"episodes.jsonl").read_text().splitlines() == ref_lines[:6]   # calls 1-30 = six whole tasks
    assert run(tmp_path/"out") == ref and _FlakyEndpoint.calls == total - 30
    assert (tmp_path/"out"/"episodes.jsonl").read_text().splitlines() == ref_lines
    with pytest.raises(OSError): run(tmp_path/"mid", fail_at=20)       # inside the 4th task (calls 16-24)
    assert len((tmp_path/"mid"/"episodes.jsonl").read_text().splitlines()) == 3
    with open(tmp_path/"mid"/"episodes.jsonl", "a") as f: f.write(ref_lines[3][:40])   # a torn last line
    with pytest.warns(UserWarning, match="truncated"): assert run(tmp_path/"mid") == ref
    assert _FlakyEndpoint.calls == total - 15 and (tmp_path/"mid"/"episodes.jsonl").read_text().splitlines() == ref_lines
    assert run(tmp_path/"mid") == ref and _FlakyEndpoint.calls == 0      # all done: nothing is asked again


def test_forced_compress_fires_and_keeps_the_facts():
    "threshold=4 < a category's 6 steps: one forced Compress per category, mid-category, and the task is still solved."
    env = BundleShop(n_slots=5, n_cand=4, seed=7)
    mem = MageMemory(threshold=4)
    r = run_episode(env, mem, ScriptedLLM(p_err=0.0))
    assert r["success"] and r["steps"] == env.optimal_steps and (r["forced"], r["marked"]) == (5, 5)
    subs = [mem.tree.nodes[s] for s in mem.tree.active_subgoals()]
    for k, cat in enumerate(env.slots):                           # forced summary k, then the agent's purchase summary
        f = read_memory(subs[2 * k].content)
        assert f.results[cat] == [p.id for p in env.candidates(cat)]
        assert list(f.items.values()) == env.candidates(cat)[:3] and not f.bought
        assert read_memory(subs[2 * k + 1].content).bought == {cat: [env.target[cat]]}
    assert run_episode(env, m8 := MageMemory(), ScriptedLLM(p_err=0.0))["forced"] == 0 and m8.n_marked == 5


def test_forced_compress_mid_category_is_validated_with_the_summarised_facts():
    "The validator sees the candidates of a forced summary: it catches wrong purchases and passes right ones."
    s = summarize_runs(evaluate(8, arms=["MAGE forced@4"], p_err=0.0))["MAGE forced@4"]
    assert s["success"] == 1.0 and s["revisions"] == 0                 # no false alarms from the split category
    s = summarize_runs(evaluate(8, arms=["MAGE forced@4"], p_err=0.25, p_detect=1.0))["MAGE forced@4"]
    assert s["revisions"] > 0 and s["forced"] > 7 and s["success"] >= 0.75, s


def test_agent_written_summaries_are_stored_verbatim():
    env, mem = BundleShop(n_slots=4, seed=2), MageMemory()
    calls = []
    pol = ScriptedLLM(p_err=0.0)
    aux = lambda p: (calls.append(p.split("\n", 1)[0]), pol(p))[1]
    r = run_episode(env, mem, pol, aux=aux)
    assert r["success"] and mem.n_agent_summaries == mem.n_marked == 4 and r["turns"] == r["steps"]  # done rides along
    assert "### SUMMARIZE" not in calls and calls.count("### VALIDATE") == 4   # the aux LLM only validates
    for s, cat in zip(mem.tree.active_subgoals(), env.slots):
        assert mem.tree.nodes[s].content.startswith(f"Bought {env.products[env.target[cat]].text()}")
    base = MageMemory(agent_ops=False); run_episode(env, base, ScriptedLLM(p_err=0.0))
    assert base.n_agent_summaries == 0 and base.tools() == "" and [base.tree.nodes[s].content for s in base.tree.active_subgoals()] == \
        [mem.tree.nodes[s].content for s in mem.tree.active_subgoals()]   # same deterministic summariser either way


def test_lossy_summaries_are_caught_by_maintain():
    "Loss model: p_lossy=1 drops every purchase's attributes; a validator with p_detect=1 fails each such summary."
    env = BundleShop(n_slots=4, seed=2)
    blind = MageMemory(); run_episode(env, blind, ScriptedLLM(p_err=0.0, p_lossy=1.0, p_detect=0.0))
    assert all(read_memory(blind.tree.nodes[s].content).items == {} for s in blind.tree.active_subgoals())
    seeing = MageMemory(); run_episode(env, seeing, ScriptedLLM(p_err=0.0, p_lossy=1.0, p_detect=1.0))
    assert seeing.revisions > 0 and any("drops the attributes" in h for h in seeing.tree.hints)
    with pytest.raises(ValueError, match="p_lossy"): ScriptedLLM(p_lossy=1.5)


def test_agent_triggered_revise():
    "With a blind validator the agent itself rewinds purchases that visibly break their constraint."
    s = summarize_runs(evaluate(10, arms=["MAGE", "MAGE no agent ops"], p_err=0.3, p_detect=0.0))
    assert s["MAGE"]["agent_revisions"] == s["MAGE"]["revisions"] > 0 and s["MAGE no agent ops"]["revisions"] == 0
    assert s["MAGE"]["success"] > s["MAGE no agent ops"]["success"]
    mem = MageMemory(); mem.reset("t", lambda p: "OK")
    mem.record("search a", "x"); mem.record("buy b", "y"); mem.subgoal_done("bought b")
    mem.record("search c", "z")
    assert not mem.request_revise(9, "no such step") and not mem.request_revise(None) and mem.n_unparsed == 2
    assert mem.request_revise(1, "b was wrong") and mem.tree.cur == 0 and mem.tree.hints == ["b was wrong"]
    assert mem.tree.nodes[3].note == "b was wrong" and mem.n_agent_revisions == 1
    off = MageMemory(revise=False); off.reset("t", lambda p: "OK"); off.record("a", "x")
    assert not off.request_revise(0) and "revise" not in off.tools()
    assert parse_memory_action("done | s\nsearch x") == ("done", None, "s") and parse_memory_action("Revise 3: w") == ("revise", 3, "w")


def test_success_model_closed_forms_and_monte_carlo():
    p, n = 0.08, 8
    assert success_model(p, [0.0] * n, 2) == pytest.approx((1 - p) ** n, abs=1e-12)
    assert success_model(p, [0.9] * n, 500) == pytest.approx(((1 - p) / (1 - p * 0.9)) ** n, abs=1e-9)
    from math import comb
    assert success_model(p, [0.9] * n, 2) == pytest.approx((1 - p) ** n * sum(comb(n - 1 + r, r) * (p * 0.9) ** r for r in range(3)))
    D = detection_rates(BundleShop(8, seed=1), 0.5)
    assert D[0] == 0.5 and all(0.5 <= d <= 1 for d in D) and detection_rates(BundleShop(8, seed=1), 0.5, agent=False) == [0.5] * 8
    rng = np.random.default_rng(1)
    def chain():
        r = 0
        for d in D:
            while rng.random() < 0.25:
                if rng.random() >= d: return False
                r += 1
        return r <= 3
    mc = np.mean([chain() for _ in range(20000)])
    assert abs(mc - success_model(0.25, D, 3)) < 4 * np.sqrt(mc * (1 - mc) / 20000)
    with pytest.raises(ValueError, match="p_err"): success_model(1.5, D, 1)


def test_model_matches_measured_full_context_and_mage():
    "Measured success is within 3 SE of the analytic model for the arms it covers (p_err 0.2, 30 tasks)."
    runs = evaluate(30, arms=["full context", "MAGE no agent ops", "MAGE −Maintain"], p_err=0.2)
    pred = predicted_success(30, p_err=0.2)
    for arm, rs in runs.items():
        x = np.array([r["success"] for r in rs], float)
        assert abs(x.mean() - pred[arm]) < 3 * max(x.std(ddof=1), 0.1) / np.sqrt(len(x)), (arm, x.mean(), pred[arm])


def test_claims_split_into_tokens_and_success():
    runs = evaluate(3)
    ck = claim_checks(runs)
    assert len(ck["tokens"]) == 3 and len(ck["success"]) == 6
    assert all("tokens/episode" in c.name for c in ck["tokens"]) and all("success" in c.name for c in ck["success"])
