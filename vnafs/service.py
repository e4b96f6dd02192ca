"""Talking to the service manager: systemd's notify protocol (sd_notify(3)).

Why a module of its own: with `Type=notify` systemd starts what depends on the mount (Samba, an
NFS server, a VNA) only once the daemon says `READY=1`, and that must mean "the mount answers",
not "the process started": otherwise a file server exports an empty directory. The daemon also
says what it is doing (`STATUS=`, shown by `systemctl status`), that it is going down
(`STOPPING=1`), that it re-read its configuration (`RELOADING=1` ... `READY=1`), and, when the
unit sets `WatchdogSec=`, that its event loop still runs (`WATCHDOG=1`).

The protocol is one datagram per message to the AF_UNIX socket named by `NOTIFY_SOCKET` (a path,
or an abstract name starting with `@`). Without that variable (not run by systemd, or by a test
that did not set one) every call does nothing. Sending never blocks the trio loop: a datagram
socket to a local receiver is non-blocking here, and a full or missing receiver only costs the
message (systemd does the same in its C library).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vnafs.service")


class Notifier:
    """The notify socket of this process, or nothing."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None = None
        if address:
            # Abstract socket names start with "@" in the variable and with NUL on the wire.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> None:
        """send(READY=1, STATUS="...") -> one datagram "READY=1\\nSTATUS=...\\n"."""
        if self.address is None:
            return
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a missing receiver would repeat this every minute
                log.warning("could not notify the service manager (%s)", exc.strerror)
                self._failed = True

    def watchdog_seconds(self) -> float | None:
        """Half the watchdog timeout systemd set for this process (`WatchdogSec=`), or None."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if self.address is None or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None
        return int(usec) / 2e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
