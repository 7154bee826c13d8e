"""Evaluation: how good a scoring run (or any algorithm's challenge-format predictions) is on annotated data.

```
metrics             fetaliqa's rules, pure numpy: frame classification, fetaliqa's case metrics
acouslic            the ACOUSLIC-AI challenge's own case metrics, rule for rule (leaderboard numbers)
challenge_format    a run written as challenge predictions (`fetaliqa export`), and any algorithm's read back
evaluate            a run or predictions against an archive's masks and AC csv -> one Evaluation
report              an Evaluation written as metrics.json, plots and report.html
growth              published AC formulas, numpy only: GA from AC (Hadlock 1984), INTERGROWTH-21st centiles
```
`evaluate` reads its inputs through `fetaliqa.inputs` and a run through `fetaliqa.score.ledger`; nothing
here is imported by scoring or training except `metrics` (training's threshold and test metrics).
"""
