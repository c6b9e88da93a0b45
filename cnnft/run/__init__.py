"""Builds and keeps a run from the config: data bundle, backbone, plan, model on its runtime,
optimizer/scheduler, criterion; the run folder's life, checkpoints, records. Used by recipes."""
