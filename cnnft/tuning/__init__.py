"""The search behind ``cnnft tune``: the space of fine-tuning plans (:mod:`.space`), the Optuna
study on its storage with its pruner and trial records (:mod:`.study`), and the one clock the
whole search runs on (:mod:`.clock`). The fit itself is ``cnnft train``'s, handed in by the caller.
"""
