"""Errors a user can cause, and integrity failures.

Every problem an administrator can fix (a wrong key, a busy mount point, a full disk) is a
`VnafsError` whose message is one sentence that names the fix. The CLI prints exactly that
sentence and exits 1; tracebacks are reserved for bugs and go to the log. Messages must never
contain PHI (file names, DICOM values): name objects by id or inode number.
"""

from __future__ import annotations


class VnafsError(Exception):
    """A condition the user can fix; `str(err)` is the one-line message shown to them."""


class IntegrityError(Exception):
    """Sealed data failed authentication or a structural check.

    Raised instead of ever returning wrong bytes. `str(err)` names the object (block id, or table
    and a key digest) and is safe to log; the FUSE layer turns it into EIO.
    """


class Unavailable(IntegrityError):
    """Data that exists could not be fetched now: the archive did not answer (in time). Still
    EIO for the reader, but health reports an outage ("recall"), not damage ("integrity")."""
