"""A run parses its objective's settings once: experiment.validate's Plan carries them to the
assembly, the objective and its sampler (#24)."""
import pytest

from configs import toy2d_rcm
from fdistill import modes
from fdistill.objectives import rcm


@pytest.mark.parametrize("mode", ["distill", "sample", "eval"])
def test_an_rcm_command_parses_its_settings_once(tmp_path, monkeypatch, mode):
  config = toy2d_rcm.get_config("rcm,teacher=analytic,distribution=gmm8,steps=2")
  config.model.hidden = (16,)
  config.train.update(dict(batch_size=16, sample_every=0, log_every=1, save_every=2))
  config.eval.update(dict(num_plot_samples=8, num_samples=16, batch_size=16,
                          timeout_seconds=0.0))
  workdir = str(tmp_path / "run")
  if mode != "distill":
    modes.run(config, workdir, "distill")
  parses = []
  real = rcm.Settings.from_config.__func__
  monkeypatch.setattr(rcm.Settings, "from_config",
                      classmethod(lambda cls, section: parses.append(1) or real(cls, section)))
  modes.run(config, workdir, mode)
  # sample and eval read the sampler times from the settings: parsed by validate, then reused
  assert len(parses) == 1, parses
