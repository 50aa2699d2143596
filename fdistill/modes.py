"""The run modes as importable functions (main.py, the demo, tests and notebooks call them)."""
import os

from fdistill.errors import ConfigError


MODES = ("train_teacher", "distill", "eval", "sample")




def check_mode(mode, config):
  """Teacher training trains by DSM; distillation needs a distillation objective."""
  is_dsm = config.objective.name == "dsm"
  if mode == "train_teacher" and not is_dsm:
    raise ConfigError(f"--mode=train_teacher needs objective.name='dsm', got "
                      f"{config.objective.name!r}; use --mode=distill")
  if mode == "distill" and is_dsm:
    raise ConfigError("--mode=distill needs a distillation objective (objective.name), got 'dsm'; "
                      "use --mode=train_teacher")


def sample(config, workdir, num=0, mesh=None, settings=None):
  """Samples the latest checkpoint's exported network into
  ``samples_<step>_<sampler steps>steps.png`` (+ .npy; :func:`sampling.samples_path`).

  Needs only the run's own checkpoint (no data set, no teacher). ``mesh`` / ``settings``: the plan's.
  """
  import jax
  import numpy as np
  from fdistill import experiment, sampling
  task = experiment.task_of_run(workdir)
  sampler = experiment.build_sampler(config, task, mesh, settings)
  params, step = experiment.restore_export(sampler, workdir)
  path = sampling.samples_path(workdir, step, config.eval.sampler_steps)
  samples = sampling.write_samples(sampler, params, jax.random.key(config.seed + 2), config, path,
                                   num=num or None)
  np.save(path.replace(".png", ".npy"), samples)
  from fdistill.io import console
  console.say(f"wrote {path} and {path.replace('.png', '.npy')}: {len(samples)} samples of "
              f"checkpoint {step}")
  return path


def check_run_exists(workdir):
  """Sample and eval read a finished or running training run: its config and a checkpoint."""
  from fdistill.io import checkpoint
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise ConfigError(f"--workdir={workdir!r} holds no run (no config.json); train one first "
                      "with --mode=train_teacher or --mode=distill")
  if not checkpoint.saved_steps(workdir):
    raise ConfigError(f"--workdir={workdir!r} has no checkpoint yet")


def run(config, workdir, mode, num_samples=0):
  """Runs one mode; importable (tests and notebooks call it).

  Everything is checked (mode, config ranges and names, the workdir) before
  anything is created or written.
  """
  from fdistill import experiment
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r}; valid values: {', '.join(MODES)}")
  if num_samples < 0:
    raise ConfigError(f"--num_samples={num_samples} must be >= 0 (0 = eval.num_plot_samples)")
  plan = experiment.validate(config)
  if mode in ("train_teacher", "distill"):
    check_mode(mode, config)
    experiment.check_workdir(workdir, config)
    experiment.check_num_steps(config, workdir)
    experiment.check_generator_init(config, workdir)
    config, teacher_pin = experiment.pin_teacher(config, workdir)
    from fdistill.io import lock
    from fdistill.parallel import mesh as mesh_lib
    from fdistill.train import loop  # after the checks: it imports the metric writers
    with lock.hold(workdir, enabled=mesh_lib.is_main_process()):
      return loop.train(config, workdir, mesh=plan.mesh, teacher_pin=teacher_pin,
                        settings=plan.settings)
  experiment.check_workdir(workdir)
  if mode == "sample" or config.eval.timeout_seconds == 0:
    check_run_exists(workdir)
  if mode == "eval":
    from fdistill.eval import job
    return job.run(config, workdir, plan.mesh, plan.settings)
  return sample(config, workdir, num_samples, plan.mesh, plan.settings)
