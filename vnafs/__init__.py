"""vnafs: an encrypted, compressed, DICOM-aware archive filesystem for medical imaging."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
