"""scfm_platform: config, cell transformer, attention backends, DeepSpeed/Ray Train trainer, tracking, eval."""
