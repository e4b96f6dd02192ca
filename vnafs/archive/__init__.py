"""The archive tier: sealed blocks and metadata copied off-site to a directory, S3 or Azure Blob."""
