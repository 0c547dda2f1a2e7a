"""One role in one fresh interpreter: ``python -m flmem.worker --config C --role R --out DIR``.

By default the process imports what every role needs first, records the allocator's bytes in
use (the *baseline*, before any model or data exists), and only then starts its ``memray.Tracker``,
so the capture holds the role's working memory. With ``profiling.track_imports=true`` the Tracker
starts before the imports and the baseline is marked in time (``markers.json``) instead. SIGTERM (the launcher stopping a job) exits through ``SystemExit``
so the Tracker closes its capture file properly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

from flmem.address import join, normalize, split


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _tracker(cfg_profiling, capture: Path):
    if not cfg_profiling["enabled"]:
        return contextlib.nullcontext()
    import memray

    fmt = {"aggregated": memray.FileFormat.AGGREGATED_ALLOCATIONS,
           "all_allocations": memray.FileFormat.ALL_ALLOCATIONS}[cfg_profiling["capture_format"]]
    return memray.Tracker(capture, native_traces=cfg_profiling["native_traces"], file_format=fmt,
                          memory_interval_ms=cfg_profiling["memory_interval_ms"],
                          trace_python_allocators=cfg_profiling["trace_python_allocators"])


def _mark_baseline(markers: dict, out: Path, interval_ms: int) -> None:
    from flmem.phases import memory_reading

    # Memray samples heap/RSS every `interval_ms`: wait a few samples so the baseline is recorded.
    time.sleep(3 * interval_ms / 1000)
    markers["baseline_ms"] = time.time() * 1000
    markers["memory_at_baseline"] = memory_reading()
    markers["baseline_rss_bytes"] = markers["memory_at_baseline"].get("rss_bytes")
    (out / "markers.json").write_text(json.dumps(markers))
    time.sleep(3 * interval_ms / 1000)


def _settle(interval_ms: int) -> None:
    """Between setup and FL: wait a few memory snapshots, so that one records the heap held when FL begins
    (``fl_start_heap_bytes``) rather than the last moments of setup."""
    time.sleep(3 * interval_ms / 1000)


def _import_role_modules() -> None:
    """The imports every role needs (torch, gRPC, Hydra, flmem's roles): done before any model or data."""
    import hydra.utils  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401 - the data sources import it inside the methods that load

    import flmem.client  # noqa: F401
    import flmem.datasets.cifar  # noqa: F401
    import flmem.datasets.mnist  # noqa: F401
    import flmem.datasets.split  # noqa: F401
    import flmem.datasets.synthetic  # noqa: F401
    import flmem.datasets.tokens  # noqa: F401
    import flmem.server  # noqa: F401
    import flmem.transport  # noqa: F401


def _min_rate(cfg) -> float | None:
    """``transport.min_upload_mib_s`` in bytes per second (None: no floor)."""
    rate = cfg.transport.get("min_upload_mib_s")
    return float(rate) * 2**20 if rate else None


def _address_from(ready_file: Path, host: str, timeout_s: float) -> str:
    """The server's address once its ``ready.json`` exists (clients start while the server imports)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            return join(host, json.loads(ready_file.read_text())["port"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise TimeoutError(f"the server wrote no {ready_file} within {timeout_s:g} s (timeouts.server_ready_s)")


def run_role(cfg, role: str, rank: int, out: Path, markers: dict, address_file: str | None = None) -> dict:
    """Build the role's objects from ``cfg`` and run it. Returns its metrics history."""
    _import_role_modules()
    import torch

    from flmem.client import run_client
    from flmem.codec import ModelCodec
    from flmem.literal import instantiate  # a '${' in config.yaml's strings reaches the objects literally
    from flmem.phases import PhaseLog, memory_reading
    from flmem.serde import model_bytes
    from flmem.server import RoundServer
    from flmem.status import StatusWriter, write_json
    from flmem.trainer import Perturber, Trainer
    from flmem.grpcauth import client_security, server_security
    from flmem.channel import max_rpcs
    from flmem.transport import ServerConnection, serve

    torch.set_num_threads(int(cfg.threads_per_role))
    phases = PhaseLog(markers.setdefault("phases", []))  # the same list: main() writes it even on failure
    _mark_baseline(markers, out, int(cfg.profiling.memory_interval_ms))
    opt = cfg.optimization
    codec = ModelCodec(opt.serde, opt.transport, int(cfg.transport.chunk_size), release=opt.release)
    status = StatusWriter(out, role if role == "server" else f"client_{rank}", int(cfg.rounds))
    security = cfg.get("security") or {}
    keepalive_s = cfg.transport.get("keepalive_s")
    with phases.setup("model"):
        torch.manual_seed(int(cfg.seed))  # the server's initial global model depends on the seed only
        model = instantiate(cfg.model)
        markers["model_bytes"] = model_bytes(model.state_dict())
    if role == "server":
        with phases.setup("data"):
            test_data = instantiate(cfg.dataset).test_dataset(release=opt.release) if cfg.evaluate else None
        fl = RoundServer(model, test_data, strategy=instantiate(cfg.strategy),
                         num_clients=int(cfg.num_clients), rounds=int(cfg.rounds), codec=codec,
                         streaming=opt.aggregation, seed=int(cfg.seed), round_timeout_s=float(cfg.timeouts.round_s),
                         eval_batch_size=int(cfg.batch_size), status=status, phases=phases,
                         non_finite=str(cfg.server.non_finite))
        with phases.setup("connect"):
            # per client at most three calls at once: its presence stream, an update, the next round's fetch
            grpc_server, port = serve(fl, cfg.server.host, int(cfg.server.port),
                                      int(cfg.transport.max_message_bytes),
                                      max_workers=max_rpcs(int(cfg.num_clients)), lean=opt.transport,
                                      idle_s=float(cfg.timeouts.idle_s), security=server_security(security),
                                      keepalive_s=keepalive_s, min_rate_bytes_s=_min_rate(cfg))
            write_json(out / "ready.json", {"host": cfg.server.host, "port": port, "pid": os.getpid()})
            print(f"flmem server listening on {join(cfg.server.host, port)}", flush=True)
            status.update(phase="waiting for clients", port=port)
        _settle(int(cfg.profiling.memory_interval_ms))
        try:
            history = fl.run()
            markers["memory_at_fl_end"] = memory_reading(arenas=True)
            if cfg.save_global_model:
                with phases.teardown("save"):
                    torch.save(model.state_dict(), out / "global_model.pt")
        except BaseException as exc:
            fl.record_error(exc)  # wake handler threads so clients hear the reason
            raise
        finally:
            with phases.teardown("shutdown"):
                grpc_server.stop(grace=2).wait()
    else:
        train_phase = "train"
        if cfg.client.mode == "comm_only":  # no data, no gradients: weights perturbed in place
            train_phase = "perturb"
            trainer = Perturber(model, int(cfg.dataset.samples_per_client or 1), seed=int(cfg.seed), rank=rank,
                                scale=float(cfg.client.perturbation))
        else:
            with phases.setup("data"):
                source = instantiate(cfg.dataset)  # conf/dataset/*.yaml: a flmem.datasets source
                dataset = source.client_dataset(rank, int(cfg.num_clients), release=opt.release)
                trainer = Trainer(model, dataset, batch_size=int(cfg.batch_size), local_steps=int(cfg.local_steps),
                                  optimizer=instantiate(cfg.optimizer), seed=int(cfg.seed), rank=rank,
                                  optimized=opt.trainer, release=opt.release,
                                  proximal_mu=instantiate(cfg.strategy).proximal_mu)
        connection = None
        if cfg.client.mode != "local_only":
            with phases.setup("connect"):
                if address_file:
                    cfg.server.address = _address_from(Path(address_file), split(cfg.server.address)[0],
                                                       float(cfg.timeouts.server_ready_s))
                connection = ServerConnection(normalize(cfg.server.address), int(cfg.transport.max_message_bytes),
                                              float(cfg.timeouts.rpc_s), lean=opt.transport,
                                              chunk_size=int(cfg.transport.chunk_size),
                                              security=client_security(security, rank), keepalive_s=keepalive_s)
                connection.wait_ready(float(cfg.timeouts.server_ready_s))
                status.update(phase="training")
        else:
            status.update(phase="training")
        _settle(int(cfg.profiling.memory_interval_ms))
        try:
            history = run_client(connection, trainer, codec, rank=rank, rounds=int(cfg.rounds), status=status,
                                 phases=phases, train_phase=train_phase)
            markers["memory_at_fl_end"] = memory_reading(arenas=True)
        finally:
            if connection is not None:
                with phases.teardown("shutdown"):
                    connection.close()
    status.update(phase="done")
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the job's resolved config (YAML)")
    parser.add_argument("--role", required=True, choices=["server", "client"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--out", required=True, help="this role's output directory")
    parser.add_argument("--address", help="client: the server's host:port (overrides server.address)")
    parser.add_argument("--address-file", help="client: wait for the server's ready.json and connect to its port")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Linux keeps ru_maxrss across exec: at start it is the launcher's peak RSS, not this role's.
    markers = {"start_ms": time.time() * 1000, "phases": [],
               "inherited_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    import yaml  # light: the profiling options are needed before the Tracker starts

    profiling = yaml.safe_load(Path(args.config).read_text())["profiling"]
    markers["memory_interval_ms"] = profiling["memory_interval_ms"]
    from flmem.phases import mallinfo2

    mallinfo2()  # looks the function up before the Tracker starts (a dlopen under memray is slow)
    if profiling["enabled"] and not profiling["track_imports"]:
        # Tracking imports costs seconds of CPU per role and shows no FL memory: import first, and take
        # the baseline from the allocator itself just before the Tracker starts.
        from flmem.profiling import heap_in_use

        _import_role_modules()
        markers["untracked_baseline_heap_bytes"] = heap_in_use()
    code, error = 0, None
    from flmem import diskfull

    try:
        with _tracker(profiling, out / "capture.bin"):
            try:
                from omegaconf import OmegaConf

                cfg = OmegaConf.load(args.config)
                if args.address:
                    cfg.server.address = args.address
                run_role(cfg, args.role, args.rank, out, markers, address_file=args.address_file)
            except SystemExit as exc:
                code, error = (exc.code if isinstance(exc.code, int) else 1), "stopped by the launcher (SIGTERM)"
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the job result
                if diskfull.is_disk_full(exc):  # said in one line: no traceback to write to a full disk
                    code, error = diskfull.EXIT_CODE, diskfull.describe(exc, getattr(exc, "filename", None) or out)
                else:
                    code, error = 1, f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
    except Exception as exc:  # memray could not start or close the capture file
        if not diskfull.is_disk_full(exc):
            raise
        code, error = diskfull.EXIT_CODE, diskfull.describe(exc, out / "capture.bin")
    markers["end_ms"] = time.time() * 1000
    from flmem.phases import memory_reading

    markers["memory_at_end"] = memory_reading()  # after the Tracker closed its capture
    # This process's own peak RSS so far (VmHWM); ru_maxrss may still be the launcher's (see above).
    markers["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    markers["max_rss_bytes"] = markers["memory_at_end"].get("hwm_bytes", markers["ru_maxrss_bytes"])
    markers["exit_code"], markers["error"] = code, error
    try:
        from flmem.status import write_json

        write_json(out / "markers.json", markers)
    except OSError as exc:  # the exit status still says it (diskfull.EXIT_CODE)
        if not diskfull.is_disk_full(exc):
            raise
        code, error = diskfull.EXIT_CODE, error or diskfull.describe(exc)
        brief = {k: markers.get(k) for k in ("start_ms", "end_ms", "max_rss_bytes", "inherited_max_rss_bytes")}
        with contextlib.suppress(OSError):  # over the baseline's markers.json: its block is already the file's
            with open(out / "markers.json", "r+b") as fh:
                fh.write(json.dumps({**brief, "exit_code": code, "error": error}).encode())
                fh.truncate()
    if error:
        with contextlib.suppress(OSError):  # stderr.log may lie on the full disk too
            print(f"flmem {args.role}: {error}", file=sys.stderr, flush=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
