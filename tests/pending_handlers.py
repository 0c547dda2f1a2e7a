"""A server process whose run ends while handlers are pending (run by test_resources): it prints one JSON line
of outcomes once ``run()`` has returned, then stops its gRPC server as the worker does and exits; the test
measures that exit.

Pending at the end: eight fetches for a far round (refused at once now; they used to wait for ever), and the
update of a client that left while its update waited for its turn to be added (it used to wait for ever: its
turn never comes). A gRPC handler thread that never returns keeps the interpreter from exiting.
"""
import json
import sys
import threading
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile import Hostile, Job, wait_until  # noqa: E402


def main() -> None:
    job = Job(num_clients=2, rounds=1)
    hostile = Hostile(job.port)
    far = []
    for _ in range(8):
        try:
            list(hostile.fetch(0, 1))
            far.append("OK")
        except grpc.RpcError as exc:
            far.append(exc.code().name)
    presence = hostile.join(1)
    gate = threading.Event()
    job.start()
    job.honest(0, gate)  # client 0 trains round 0 once client 1 has left
    wait_until(lambda: job.fl.published == 0, what="round 0")
    list(hostile.fetch(1, 0))  # client 1 takes the round-0 global model, as an honest client does
    push = hostile.push(Hostile.first(job.header(), 1), stall=True)  # its turn comes after client 0's
    wait_until(lambda: job.fl.current.status[1] == "receiving", what="client 1's claim")
    presence.cancel()  # client 1 leaves while its update waits for its turn
    wait_until(lambda: job.fl.current.status[1] == "failed", what="client 1's departure")
    gate.set()
    job.threads[0].join(60)  # run() returned
    record = (job.history or [{}])[0]
    print(json.dumps({"far_fetches": far, "error": repr(job.error) if job.error else None,
                      "updates": record.get("updates"), "failures": record.get("failures"),
                      "push": push.exception(timeout=10).details()}), flush=True)
    hostile.close()
    job.server.stop(grace=2).wait()  # as flmem.worker does; then the interpreter joins gRPC's handler threads


if __name__ == "__main__":
    main()
