"""``EDMPrecond`` constructor kwargs for an fdistill ``config.model`` (songunet / dhariwalunet),
as EDM's train.py would pass them: shared by the pickle tests and the step benchmark's peer."""

# Fields of config.model that are not EDM constructor kwargs.
OURS_ONLY = ("name", "sigma_data", "dtype", "attn_impl", "remat", "remat_policy", "in_channels",
             "out_channels", "double_norm")  # sCM's option (fdistill only; EDM has none)
MODEL_TYPES = {"songunet": "SongUNet", "dhariwalunet": "DhariwalUNet"}


def edm_precond_kwargs(config):
  """EDMPrecond kwargs for ``config`` (an fdistill ``config.model``)."""
  if config.name not in MODEL_TYPES:
    raise ValueError(f"model.name={config.name!r} has no EDM network; valid: "
                     f"{', '.join(MODEL_TYPES)}")
  kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
            if k not in OURS_ONLY}
  model_type = MODEL_TYPES[config.name]
  if model_type == "DhariwalUNet" and kwargs.get("channels_per_head") == 64:
    del kwargs["channels_per_head"]  # EDM's own ADM has no such kwarg
  return dict(img_resolution=kwargs.pop("img_resolution"), img_channels=config.in_channels,
              label_dim=kwargs.pop("label_dim"), use_fp16=False, model_type=model_type,
              sigma_data=config.sigma_data, **kwargs)
