"""DICOM awareness: header parsing, completeness checks, names for study-level views."""
