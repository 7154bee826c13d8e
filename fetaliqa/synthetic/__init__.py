"""Synthetic archives for tests, demos and benchmarks, deterministic by seed.

```
archive   cases in the exact ACOUSLIC-AI layout: stacked images, masks, the AC csv
dicom     the same cases as DICOM studies (one multi-frame instance per sweep), masks keyed by StudyInstanceUID
```
"""
