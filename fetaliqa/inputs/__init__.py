"""Inputs: where cases come from and how their frames and annotations are read, for every command.

```
URL (local path, s3://, gs://, memory://, a presigned https:// manifest)
  storage         fsspec filesystems, retries, fsynced writes, error mapping to one-line errors
  layout          facts of the ACOUSLIC-AI archive layout (folders, suffixes, sweeps, mask labels)
  stacks          stacked images (MetaImage, NIfTI, NRRD, ...): header, (T, H, W) uint8 frames, masks, AC csv
  dicom           one DICOM instance: header, multi-frame pixels cropped to the ultrasound region
  dicom_studies   a listing's DICOM files grouped into studies (cases) from their headers
  listing         THE lister of every command: any input -> cases (CaseRef: source, DICOM instances, mask)
  cases           any case's frames, geometry (headers only) and mask, whatever its format
```
Every module here is free of torch and Ray, so listing and reading start fast on any worker.
"""
