"""Restarting a round's aggregate: a client that fails after part of its update was combined is one failed update.

On the optimized aggregation path (``optimization.aggregation=true``) the server keeps no client's update: a sum
strategy adds each update chunk by chunk into one running sum (:class:`~flmem.strategies.RunningSum`), a
coordinate strategy writes chunk k of the new global model as soon as chunk k of every update has arrived
(:class:`~flmem.lockstep.AlignedChunks`). When a client fails after some of its values were used (its stream
breaks or stalls, a later chunk is refused, its process dies), those values cannot be taken back: float addition
does not invert, and a median chunk has no inverse at all. Keeping a copy to undo them would cost one model more
on the server. Instead the round's aggregate is computed again from the start without that client:

* Sum strategies. The running sum is discarded (zeroed in place, weight 0), the failed client is recorded in the
  round's ``failures``, and every client whose update was already added goes back to status ``resend``. Such a
  client is by then waiting in its fetch of round r+1 (or about to call it); that fetch is answered with
  ``ModelChunk.resend = true`` and ``round = r`` instead of a model, so the client encodes its model again (it still
  holds its trained update: nothing is written into it until the next global model arrives), pushes it, and
  fetches round r+1 again. Folding restarts from zero in rank order; clients whose turn had not come are
  unaffected (their streams wait in gRPC flow control).
* Coordinate strategies. The reduction computes chunk k of the new global model from the clients' values only
  (the old global model is never read; nor is it served to a participant during the reduction: chunk 0 is
  reduced only once every participant has sent, hence fetched, its update; clients not sampled are answered with
  ``skip``, and one dropped before it fetched may get a model being rewritten, but its update is refused anyway),
  so the lockstep restarts at chunk 0 with the remaining participants and recomputes every chunk. Their
  PushUpdate handlers, in flight, end with ``PushReply.resend = true``; their clients push the same update again
  at once.

Bounds: each restart follows the failure of a client that is then out of the round, so a round restarts at most
N times (once per failed client); the round's metrics record counts ``restarts`` and ``resends`` (updates asked
again) next to ``failures``. Whether the round still completes is the strategy's policy (``min_fit_clients``,
``accept_failures``), as for any failed update. Memory: nothing is allocated by a restart (the sum is zeroed in its
own storage; the lockstep holds at most N chunks, as before). Numbers: after a restart the round adds (or reduces)
exactly the surviving updates, in rank order, from zero, so the new global model equals the original path's
(``optimization.aggregation=false``) aggregate of the same updates bit for bit.
"""
from __future__ import annotations


class ResendRequested(Exception):
    """The round's aggregate restarted without a failed client: this client's update must be sent again.

    Args:
        reason: which client failed, and where.
        round_idx: the round whose update is asked again (the fetch answer's ``round``), when known.
    """

    def __init__(self, reason: str, round_idx: int | None = None):
        super().__init__(reason)
        self.round = round_idx
