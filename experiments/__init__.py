"""Experiments on trained models, outside the model code: experiments/evaluate.py (prompt alignment, two oracles)
and experiments/efficiency.py (the paper's training-cost claim at small scale). Run them as scripts:
`python experiments/evaluate.py --help`."""
