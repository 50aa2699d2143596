"""Reading a finished run back in tests."""
from fdistill import experiment
from fdistill.io import checkpoint


def restored_state(workdir, config, mesh=None, step=None):
  """(state, meta) of ``workdir``'s checkpoint, placed by ``config``'s assembly on ``mesh``."""
  exp = experiment.build(config, mesh, teacher_params=False)
  ckpt = checkpoint.Checkpointer(str(workdir))
  try:
    return ckpt.restore(checkpoint.with_shardings(exp.abstract_state, exp.state_shardings), step)
  finally:
    ckpt.close()
