"""vnafs: an encrypted, compressed, DICOM-aware archive filesystem for medical imaging."""

__version__ = "0.1.0"
# The newest store format this vnafs writes and reads (docs/format.md: 1 and 2 are known).
FORMAT_VERSION = 2
