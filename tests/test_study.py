"""fdistill.study.apply_overrides: a dotted override sets one field and keeps its neighbours."""
from configs import toy2d_fdistill
from fdistill import study


def test_a_nested_override_sets_one_field_of_a_section():
  config = toy2d_fdistill.get_config("js,teacher=analytic")
  before = config.objective.discriminator.to_dict()
  study.apply_overrides(config, {"objective.discriminator.hidden": (16,), "model.hidden": (32,)})
  after = config.objective.discriminator.to_dict()
  assert tuple(after.pop("hidden")) == (16,) and tuple(config.model.hidden) == (32,)
  before.pop("hidden")
  assert after == before  # emb_dim and the rest kept (a whole-section override lost them)
