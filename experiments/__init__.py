"""Experiments on trained models, outside the model code: evaluate.py (prompt alignment with two oracles) and
efficiency.py (the paper's training-cost claim at small scale). Run them as scripts, `python experiments/evaluate.py`."""
