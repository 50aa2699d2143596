"""benchmarks/toy2d_divergences.py: the schedule's phases (what each compiled scan runs) and
``--set`` parsing. The phases are checked against the objectives' own schedules, step by
step, so a lead-in or tail that ran the wrong kind of step at any step fails."""
import functools

import pytest

from configs import common, toy2d_fdistill
from fdistill.objectives import rcm
from support import scripts

_script = functools.partial(scripts.benchmark, "toy2d_divergences")


def _replay(lead, tail, steps):
  """The kinds the phases run, step by step."""
  kinds = [kind for _, kind, length in lead for _ in range(length)]
  start, cycle = tail
  assert start == len(kinds)
  return kinds + [cycle[i % len(cycle)] for i in range(steps - start)]


@pytest.mark.parametrize("fields, want_lead", [
    (dict(scm_warmup_steps=500, warmup_critic_steps=100, gen_every=2),
     [(0, "scm_warmup", 500), (500, "critic", 100)]),                  # rCM
    (dict(dmd_weight=0.0, gen_every=2), []),                           # sCM only: generator
    (dict(scm_warmup_steps=0, warmup_critic_steps=7, gen_every=5), [(0, "critic", 7)]),
    # 3 critic steps then period 5 is periodic from step 0 ("cccgc"): no lead-in needed.
    (dict(scm_warmup_steps=0, warmup_critic_steps=3, gen_every=5), []),
])
def test_phases_replay_the_rcm_schedule(fields, want_lead):
  st = rcm.Settings.from_config(common.rcm_objective(**fields))
  schedule = lambda i: rcm.schedule(i, st)
  lead, tail = _script().phases(schedule, 1000, st.gen_every)
  assert lead == want_lead
  assert _replay(lead, tail, 1000) == [schedule(i) for i in range(1000)]


def test_phases_keep_the_fdistill_warmup_as_one_lead_in():
  from fdistill import objectives
  from support import toy
  config = toy2d_fdistill.get_config("js,teacher=analytic,distribution=gmm8")
  objective = objectives.build(config, toy.analytic_task())
  period = config.objective.gen_every
  lead, tail = _script().phases(objective.schedule, 600, period)
  assert lead == [(0, "critic", config.objective.warmup_critic_steps)]
  assert _replay(lead, tail, 600) == [objective.schedule(i) for i in range(600)]


def test_set_overrides_parse_literals_and_name_bad_input():
  parse = _script().parse_overrides
  assert parse(["objective.adaptive_weight=False", "model.hidden=(32, 32)", "a.b=text"]) == {
      "objective.adaptive_weight": False, "model.hidden": (32, 32), "a.b": "text"}
  with pytest.raises(ValueError, match="--set='adaptive_weight' must be SECTION.FIELD=VALUE"):
    parse(["adaptive_weight"])
