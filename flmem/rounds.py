"""One round's participation: which clients were sampled, whose update arrived, who failed and why.

Status of a sampled client in the round: ``pending`` (no update yet), ``resend`` (its update was received, but the
round's aggregate was discarded because another client failed after part of its update was combined: it must send
the same update again, see :mod:`flmem.restart`), ``receiving`` (its stream is being read), ``combining`` (its
values are being added into the round's running sum), ``done`` or ``failed``. The server holds the lock around
every call (see :class:`flmem.server.RoundServer`).
"""
from __future__ import annotations

from typing import Sequence

OPEN = ("pending", "resend", "receiving", "combining")


class UpdateRefused(ValueError):
    """An update is refused before any of it was used (wrong round, not sampled, a repeat, a bad header...).

    ``precondition``: True when the update was not expected at all (wrong round, not sampled, a repeat), False
    when it was malformed or did not match the global model.
    """

    def __init__(self, message: str, precondition: bool = False):
        super().__init__(message)
        self.precondition = precondition


class RoundState:
    """Bookkeeping of round ``round_idx`` for the clients in ``sampled`` (sorted ranks)."""

    def __init__(self, round_idx: int, sampled: Sequence[int]):
        self.round = round_idx
        self.sampled = sorted(sampled)
        self.status = {rank: "pending" for rank in self.sampled}
        self.failures: list[dict] = []  # sampled clients out of the round: rank, reason (, peer, bytes_received)
        self.refused: list[dict] = []  # updates not expected in this round: rank, peer, reason, bytes_received
        self.restarts = 0  # times the round's aggregate was discarded and combining began again
        self.resends = 0   # updates the server asked to be sent again

    def claim(self, rank: int) -> None:
        """Client ``rank`` starts sending its update. Raises UpdateRefused when it may not."""
        if rank not in self.status:
            raise UpdateRefused(f"client {rank} was not sampled for round {self.round} (sampled: {self.sampled})")
        if self.status[rank] == "failed":
            why = next(f["reason"] for f in self.failures if f["rank"] == rank)
            raise UpdateRefused(f"client {rank} is out of round {self.round} already ({why})")
        if self.status[rank] not in ("pending", "resend"):
            raise UpdateRefused(f"client {rank} already sent an update for round {self.round}")
        self.status[rank] = "receiving"

    def set(self, rank: int, status: str) -> None:
        if self.status.get(rank) in OPEN:
            self.status[rank] = status

    def fail(self, rank: int, reason: str, **details) -> str | None:
        """Remove ``rank`` from the round, recording ``reason`` and ``details`` (e.g. ``peer``,
        ``bytes_received``); returns its status before (None if it had already settled)."""
        before = self.status.get(rank)
        if before not in OPEN:
            return None
        self.status[rank] = "failed"
        self.failures.append({"rank": rank, "reason": reason, **details})
        return before

    def restart(self, gone: dict[int, str]) -> list[int]:
        """The round's running sum was discarded: every ``done`` client must send its update again (status
        ``resend``), except those in ``gone`` (rank -> why: they left the job), which fail. Returns the ranks asked."""
        asked = []
        for rank in self.sampled:
            if self.status[rank] != "done":
                continue
            if rank in gone:
                self.status[rank] = "failed"
                self.failures.append({"rank": rank, "reason": f"left the job: {gone[rank]}"})
            else:
                self.status[rank] = "resend"
                asked.append(rank)
        self.restarts += 1
        self.resends += len(asked)
        return asked

    def resend(self, rank: int) -> None:
        """Client ``rank``'s update in flight was not used (the chunk-aligned reduction restarted): it sends it
        again."""
        if self.status.get(rank) in OPEN:
            self.status[rank] = "resend"
            self.resends += 1

    def turn(self) -> int | None:
        """The rank whose update is added next: updates are added in rank order, so the sum is the same float
        whatever order they arrive in."""
        return next((k for k in self.sampled if self.status[k] in OPEN), None)

    def settled(self) -> bool:
        return all(s not in OPEN for s in self.status.values())

    def arrived(self) -> list[int]:
        return [k for k in self.sampled if self.status[k] == "done"]

    def pending(self) -> list[int]:
        """The clients whose update (or its resending) has not begun."""
        return [k for k in self.sampled if self.status[k] in ("pending", "resend")]

    def record(self) -> dict:
        return {"sampled": list(self.sampled), "updates": len(self.arrived()), "failures": list(self.failures),
                "refused": list(self.refused), "restarts": self.restarts, "resends": self.resends}
