"""Training machinery on plain modules: engine, freezing and strategies, similarity, the LR
finder, feature cache, BN folding, EMA, runtime, torchrun, inference. Imports data, models, files."""
