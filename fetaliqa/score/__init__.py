"""Scoring at archive scale, one module per stage; `jobs/score.py` composes them:

```
inputs.listing.list_archive (driver, once) -> (case_id, source, instances) table, minus the cases already committed
                                            (DICOM: headers grouped into studies by inputs.dicom_studies)
  | ReadCases      read.CaseReader        CPU tasks: fsspec GET -> SimpleITK or pydicom -> (T, 224, 224) uint8, one block a case
  | ScoreFrames    predict.ScoreFrames    actors holding the model (GPU or CPU): scores (T,), the best frame, SEG masks
                                          bit-packed
  | summarise_cases  write                CPU, beside the actor: masks to native size, areas, PNGs, AC, case summary,
                                          decision, review JPEG; identifiers as written (redacted, pseudonymised)
  | WriteParts     write.PartWriter       a Datasink: parts of many cases, a file per table, then a commit record
```
`schema` holds the output contract, `ledger` the commit protocol and resume, `record` the run record
(`run.json`) and progress lines. Only `predict` imports torch: read and write workers start in well under
a second.
"""
