"""Training on Ray Train with the paper's protocol.

protocol (split, AC sweeps, labels) -> data (Ray Data frames; augment on the fly) -> loop (per-worker DDP
loop, checkpoints; its step and losses are `step`, which needs no Ray) -> holdout (threshold, test
metrics) -> outputs (what lands under --output).
The recipe that strings them together is `jobs/train.py`.
"""
