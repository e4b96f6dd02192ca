"""The access audit (docs/architecture.md, "Access audit").

Two modules, because the audit lives on two sides of the layers: `chain` is the record format,
the chained append and the checks (LMDB only, no trio: `restore`, the offline `vnafs audit` and
the control handlers use it), and `recorder` is the mounted daemon's side, which turns FUSE
requests into events, collapses repeated reads and appends them through the engine's writer.
"""
