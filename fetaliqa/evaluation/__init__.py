"""Evaluation: how good a scoring run (or any algorithm's challenge-format predictions) is on annotated data, and
what any run (annotated or not) means the morning after.

```
metrics             fetaliqa's rules, pure numpy: frame classification, fetaliqa's case metrics
acouslic            the ACOUSLIC-AI challenge's own case metrics, rule for rule (leaderboard numbers)
challenge_format    a run written as challenge predictions (`fetaliqa export`), and any algorithm's read back
evaluate            a run or predictions against an archive's masks and AC csv -> one Evaluation
report              an Evaluation written as metrics.json, plots and report.html
page, plots         the one page design and the plots of both reports
run_report          the morning report of any run (`fetaliqa report`): decisions, rescan list, sites, sweeps, AC,
                    gallery; DuckDB over the committed parts; run_report_html draws its page
growth              published AC formulas, numpy only: GA from AC (Hadlock 1984), INTERGROWTH-21st centiles
```
`evaluate` reads its inputs through `fetaliqa.inputs` and a run through `fetaliqa.score.ledger`; nothing
here is imported by scoring or training except `metrics` (training's threshold and test metrics).
"""
