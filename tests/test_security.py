"""TLS, client authentication, proxies, IPv6 literals and keepalive over real gRPC on loopback.

The fast tests run a real RoundServer and real clients in this process (threads), with a hostile client
that speaks the protocol with wrong credentials before the honest ones take part; the slow ones start real
jobs with launch.py (and ``flmem certs`` for a run as across hosts).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading

import pytest
import torch
from hydra import compose, initialize_config_dir

from flmem.certs import make_certs
from flmem.client import run_client
from flmem.codec import ModelCodec
from flmem.config import ConfigError, validate
from flmem.datasets.synthetic import SyntheticImages
from flmem.grpcauth import ClientSecurity, Gate, ServerSecurity, client_security, server_security
from flmem.models import SmallCNN
from flmem.security import token_for
from flmem.server import RoundServer
from flmem.strategies import FedAvg
from flmem.trainer import Perturber
from flmem.transport import ServerConnection, TransportError, serve
from tests.conftest import CONF, REPO, TINY, job_dirs, launch, result, run_rounds

DS = SyntheticImages(name="synthetic", channels=3, image_size=32, num_classes=10, train_size=64, test_size=32,
                     samples_per_client=16, test_samples=32, partition="iid", alpha=0.5, seed=0)
SECRET = b"0123456789abcdef0123456789abcdef"
PROXIES = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "grpc_proxy": "http://127.0.0.1:9"}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


def _sec(**keys) -> dict:
    base = {"tls": False, "insecure": False, "mutual_tls": False, "ca_cert": None, "server_cert": None,
            "server_key": None, "client_cert": None, "client_key": None, "secret_file": None, "token_file": None}
    return {**base, **keys}


def one_round(server_security_, client_securities, hostile=None, host="127.0.0.1", connect_host=None):
    """One FedAvg round of two comm-only clients over real gRPC; ``hostile(port)`` runs before they start.

    Returns the server's history (one record per round) and the clients' histories."""
    torch.manual_seed(0)
    codec = ModelCodec(True, True, 16 * 1024, release=True)
    fl = RoundServer(SmallCNN(), DS.test_dataset(), strategy=FedAvg(), num_clients=2, rounds=1, codec=codec,
                     streaming=True, round_timeout_s=60)
    server, port = serve(fl, host, 0, 4 * 2**20, max_workers=10, security=server_security_, keepalive_s=10)
    histories, errors = {}, []
    try:
        if hostile:
            hostile(port)

        def client(rank):
            try:
                model = SmallCNN()
                conn = ServerConnection(f"{connect_host or host}:{port}", 4 * 2**20, 60,
                                        security=client_securities[rank], keepalive_s=10)
                conn.wait_ready(10)
                try:
                    histories[rank] = run_client(conn, Perturber(model, 16, seed=0, rank=rank), codec, rank=rank,
                                                 rounds=1)
                finally:
                    conn.close()
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
        history = run_rounds(fl, threads)
    finally:
        server.stop(0)
    assert not errors, errors
    return history, histories


def _fetch(port, security, rank, host="127.0.0.1"):
    conn = ServerConnection(f"{host}:{port}", 4 * 2**20, 10, security=security)
    try:
        return conn.fetch(0, rank)
    finally:
        conn.close()


def _tokens(secret=SECRET):
    return {k: ClientSecurity(None, (("flmem-rank", str(k)), ("flmem-token", token_for(secret, k)))) for k in (0, 1)}


def test_missing_wrong_and_borrowed_tokens_are_refused_and_named_and_the_honest_round_completes():
    refusals = {}

    def hostile(port):
        cases = {
            "missing": (ClientSecurity(None, (("flmem-rank", "0"),)), 0),
            "none at all": (None, 1),
            "wrong": (ClientSecurity(None, (("flmem-rank", "1"), ("flmem-token", token_for(b"x" * 32, 1)))), 1),
            "rank 0's token claiming rank 1": (ClientSecurity(None, (("flmem-rank", "1"),
                                                                    ("flmem-token", token_for(SECRET, 0)))), 1),
        }
        for name, (security, rank) in cases.items():
            with pytest.raises(TransportError) as caught:
                _fetch(port, security, rank)
            refusals[name] = str(caught.value)
        # an authenticated client acting as another rank: its own token, another rank in the message
        conn = ServerConnection(f"127.0.0.1:{port}", 4 * 2**20, 10, security=_tokens()[0])
        try:
            for action in ("fetch", "push"):
                with pytest.raises(TransportError) as caught:
                    if action == "fetch":
                        conn.fetch(0, 1)
                    else:
                        header, chunks = ModelCodec(True, True, 16 * 1024).encode(SmallCNN().state_dict())
                        conn.push(0, 1, 16, header, chunks)
                refusals[f"rank 0 {action}ing as rank 1"] = str(caught.value)
        finally:
            conn.close()

    history, histories = one_round(ServerSecurity(None, Gate(SECRET, mutual=False)), _tokens(), hostile)
    peer = "from ipv4:127.0.0.1:"
    assert "UNAUTHENTICATED: claimed rank 0 " + peer in refusals["missing"]
    assert "no token; set security.token_file" in refusals["missing"]
    assert "UNAUTHENTICATED: claimed rank (none) " + peer in refusals["none at all"]
    assert "no client rank in the call's credentials; the client needs security.token_file" in refusals["none at all"]
    for name in ("wrong", "rank 0's token claiming rank 1"):
        assert "UNAUTHENTICATED: claimed rank 1 " + peer in refusals[name]
        assert "wrong token for that rank" in refusals[name]
    for action in ("fetch", "push"):
        message = refusals[f"rank 0 {action}ing as rank 1"]
        assert "PERMISSION_DENIED: claimed rank 1 " + peer in message
        assert "authenticated as rank 0, and may act as rank 0 only" in message
    assert len(history) == 1 and history[0]["updates"] == 2 and history[0]["failures"] == []
    assert all(histories[k][0]["accepted"] for k in (0, 1))


def test_mutual_tls_refuses_a_client_certificate_of_another_rank_and_completes_over_tls(tmp_path):
    paths = make_certs(tmp_path, ["localhost"], clients=2)
    server = server_security(_sec(tls=True, mutual_tls=True, server_cert=str(paths["server.pem"]),
                                  server_key=str(paths["server.key"]), ca_cert=str(paths["ca.pem"])), env={})
    clients = {k: client_security(_sec(tls=True, ca_cert=str(paths["ca.pem"]), client_cert=str(paths[f"client_{k}.pem"]),
                                       client_key=str(paths[f"client_{k}.key"])), k, env={}) for k in (0, 1)}
    refused = {}

    def hostile(port):
        with pytest.raises(TransportError) as caught:  # client 1's certificate, claiming rank 0
            _fetch(port, clients[1], 0)
        refused["other rank"] = str(caught.value)
        no_cert = client_security(_sec(tls=True, ca_cert=str(paths["ca.pem"])), 0, env={})
        with pytest.raises(TransportError) as caught:  # no client certificate: the handshake itself fails
            _fetch(port, no_cert, 0)
        refused["no certificate"] = str(caught.value)

    history, _ = one_round(server, clients, hostile)
    assert "PERMISSION_DENIED: claimed rank 0 from ipv4:127.0.0.1:" in refused["other rank"]
    assert "authenticated as rank 1" in refused["other rank"]
    assert "UNAVAILABLE" in refused["no certificate"]
    assert history[0]["updates"] == 2


def test_tls_with_tokens_from_certs_files_and_a_client_trusting_another_ca_is_refused(tmp_path):
    paths = make_certs(tmp_path / "a", ["localhost"], clients=2)
    other = make_certs(tmp_path / "b", ["localhost"], clients=1)
    sec = _sec(tls=True, server_cert=str(paths["server.pem"]), server_key=str(paths["server.key"]),
               secret_file=str(paths["server.secret"]))
    clients = {k: client_security(_sec(tls=True, ca_cert=str(paths["ca.pem"]),
                                       token_file=str(paths[f"client_{k}.token"])), k, env={}) for k in (0, 1)}
    refused = {}

    def hostile(port):
        wrong_ca = client_security(_sec(tls=True, ca_cert=str(other["ca.pem"]),
                                        token_file=str(paths["client_0.token"])), 0, env={})
        conn = ServerConnection(f"localhost:{port}", 4 * 2**20, 10, security=wrong_ca)
        with pytest.raises(TransportError) as caught:
            conn.wait_ready(1)
        conn.close()
        refused["wrong ca"] = str(caught.value)

    history, _ = one_round(server_security(sec, env={}), clients, hostile, connect_host="localhost")
    assert "over TLS, a handshake that fails looks the same: check that security.ca_cert" in refused["wrong ca"]
    assert history[0]["updates"] == 2
    for name, path in paths.items():
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o600 if name.endswith((".key", ".token", ".secret")) else 0o644), (name, oct(mode))


def test_loopback_ignores_proxy_variables_and_a_remote_failure_names_them(monkeypatch):
    for name, value in PROXIES.items():  # an unreachable proxy (the discard port, closed)
        monkeypatch.setenv(name, value)
    history, _ = one_round(None, {0: None, 1: None})
    assert history[0]["updates"] == 2
    conn = ServerConnection("192.0.2.1:50051", 2**20, 5)  # TEST-NET-1: never answers
    with pytest.raises(TransportError) as caught:
        conn.wait_ready(0.3)
    conn.close()
    assert "grpc_proxy, https_proxy, http_proxy are set, so gRPC connects through that proxy" in str(caught.value)
    assert "127.0.0.1:9" not in str(caught.value)  # a proxy URL may hold credentials: never shown


@IPV6
@pytest.mark.parametrize("host, connect", [("::1", "::1"), ("[::1]", "[::1]"), ("::", "::1")])
def test_ipv6_literals_bind_and_connect(host, connect):
    history, _ = one_round(ServerSecurity(None, Gate(SECRET, mutual=False)), _tokens(), host=host,
                           connect_host=connect)
    assert history[0]["updates"] == 2


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_non_loopback_server_without_tls_is_refused_at_config_time():
    for role in ("server", "local"):
        with pytest.raises(ConfigError) as caught:
            validate(_compose(f"role={role}", "server.host=0.0.0.0"))
        message = str(caught.value)
        assert "server.host=0.0.0.0: a server reachable from other hosts refuses to run without TLS" in message
        assert "security.insecure=true" in message
        assert ("flmem certs --out certs --hosts HOSTNAME --clients 2" in message) == (role == "server")
    for host in ("127.0.0.1", "127.0.0.2", "::1", '"[::1]"', "localhost"):
        validate(_compose("role=server", f"server.host={host}"))
    with pytest.raises(ConfigError, match=r"server.host=\['::1'\]: must be a host name or address; write an IPv6"):
        validate(_compose("role=server", "server.host=[::1]"))
    validate(_compose("role=server", "server.host=0.0.0.0", "security.insecure=true"))
    validate(_compose("role=local", "server.host=::", "security.tls=true"))
    with pytest.raises(ConfigError, match="must authenticate its clients; set security.secret_file"):
        validate(_compose("role=server", "server.host=10.0.0.5", "security.tls=true",
                          f"security.server_cert={CONF / 'config.yaml'}", f"security.server_key={CONF / 'config.yaml'}"))


def test_security_files_and_combinations_are_checked(tmp_path):
    with pytest.raises(ConfigError) as caught:
        validate(_compose("role=client", "role.rank=0", "server.address=h:1", "security.tls=true",
                          f"security.ca_cert={tmp_path}/nope.pem", "security.mutual_tls=true",
                          f"security.client_cert={CONF / 'config.yaml'}"))
    message = str(caught.value)
    assert f"security.ca_cert={tmp_path}/nope.pem: no such file (`flmem certs --out certs" in message
    assert "security.client_cert=" in message and "give both (a certificate and its key) or neither" in message
    with pytest.raises(ConfigError) as caught:
        validate(_compose(f"security.ca_cert={CONF / 'config.yaml'}", "security.mutual_tls=true",
                          "transport.keepalive_s=0"))
    message = str(caught.value)
    assert "security.ca_cert=" in message and "set, but security.tls=false; add security.tls=true" in message
    assert "security.mutual_tls=true: needs security.tls=true" in message
    assert "transport.keepalive_s=0: must be a number of seconds >= 1, or null" in message
    with pytest.raises(ConfigError, match="security.insecure=true: contradicts security.tls=true"):
        validate(_compose("security.tls=true", "security.insecure=true"))
    with pytest.raises(ConfigError, match="security.secret_file=.*: role=local makes its own per-job secret"):
        validate(_compose(f"security.secret_file={CONF / 'config.yaml'}"))


KEEPALIVE_SERVER = r"""
import sys, threading
from flmem.transport import serve

class Stalled:  # a server that accepted the fetch and then hangs
    def global_model(self, round_idx, rank, active=None):
        threading.Event().wait()

    def wake(self):
        pass

server, port = serve(Stalled(), "127.0.0.1", 0, 2**20, 4, keepalive_s=1)
print(port, flush=True)
threading.Event().wait()
"""


def test_keepalive_notices_a_hung_server_long_before_the_rpc_timeout():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KEEPALIVE_SERVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        conn = ServerConnection(f"127.0.0.1:{port}", 2**20, 600, keepalive_s=1)
        conn.wait_ready(30)
        stopper = threading.Timer(0.5, os.kill, (proc.pid, signal.SIGSTOP))  # hangs it mid-call
        stopper.start()
        with pytest.raises(TransportError) as caught:
            conn.fetch(0, 0)  # rpc_s is 600 s: only keepalive can end this call
        conn.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    message = str(caught.value)
    assert "UNAVAILABLE" in message
    assert "the server answered no keepalive ping within transport.keepalive_s=1 s: it hung, died" in message


@pytest.mark.slow
def test_local_job_over_tls_on_the_ipv6_wildcard_with_proxies_set_completes_and_writes_no_secret(tmp_path):
    host = "::" if _has_ipv6_loopback() else "0.0.0.0"
    done = launch(["security.tls=true", f"server.host={host}", "profiling.flamegraph=false", *TINY], tmp_path,
                  env=PROXIES)
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "completed", (res["failure"], done.stderr[-2000:])
    assert len(res["rounds"]) == 2
    for path in job.rglob("*"):  # the per-job secret, tokens and key travel in the roles' environment only
        if path.is_file() and path.suffix in (".json", ".yaml", ".log", ".jsonl", ".md"):
            text = path.read_text(errors="replace")
            assert "PRIVATE KEY" not in text and "FLMEM_SERVER_SECRET" not in text and "FLMEM_CLIENT_TOKEN" not in text


@pytest.mark.slow
@IPV6
def test_local_job_on_ipv6_loopback_completes(tmp_path):
    done = launch(["server.host=::1", "profiling.flamegraph=false", *TINY], tmp_path)
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "completed", (res["failure"], done.stderr[-2000:])
    assert json.loads((job / "roles" / "server" / "ready.json").read_text())["host"] == "::1"


@pytest.mark.slow
def test_certs_command_then_server_and_clients_as_across_hosts(tmp_path, free_port):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    made = subprocess.run([sys.executable, "-m", "flmem.browse.cli", "certs", "--out", str(tmp_path / "certs"),
                           "--hosts", "localhost,127.0.0.1", "--clients", "2"], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    secret = (tmp_path / "certs" / "server.secret").read_text().strip()
    assert secret not in made.stdout and "client_K.token" in made.stdout
    c = tmp_path / "certs"
    common = ["num_clients=2", "profiling.flamegraph=false", "security.tls=true", *TINY]
    server = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "role=server", f"server.port={free_port}",
                               f"security.server_cert={c}/server.pem", f"security.server_key={c}/server.key",
                               f"security.secret_file={c}/server.secret", "hydra.run.dir=server", *common],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen([sys.executable, str(REPO / "launch.py"), "role=client", f"role.rank={k}",
                                 f"server.address=localhost:{free_port}", f"security.ca_cert={c}/ca.pem",
                                 f"security.token_file={c}/client_{k}.token", f"hydra.run.dir=client{k}", *common],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for k in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in (server, *clients)]
    for name, out in zip(("server", "client0", "client1"), outs):
        res = result(tmp_path / name)
        assert res["status"] == "completed", (name, res["failure"], out[-2000:])
        assert secret not in json.dumps(res) and secret not in (tmp_path / name / "config.yaml").read_text()
    assert len(result(tmp_path / "server")["rounds"]) == 2


def test_launch_refuses_an_insecure_non_loopback_server_before_any_process_starts(tmp_path):
    done = launch(["role=server", "server.host=0.0.0.0", *TINY], tmp_path)
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "failed" and res["failure"]["role"] == "config" and res["exit_codes"] == {}
    assert "server.host=0.0.0.0: a server reachable from other hosts refuses to run without TLS" in \
        res["failure"]["reason"]
    assert not (job / "roles").exists(), done.stdout[-2000:]


def test_certs_command_refuses_bad_arguments_with_status_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "flmem.browse.cli", "certs", "--out", str(tmp_path / "c"),
                           "--hosts", "h1", "--clients", "0"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "flmem certs: error: --clients 0 --days 365: both must be >= 1" in done.stderr
    assert not (tmp_path / "c").exists()


def test_certs_command_never_replaces_credentials_without_force(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "flmem.browse.cli", "certs", "--out", str(tmp_path / "c"), "--hosts", "h1",
            "--clients", "1"]
    assert subprocess.run(argv, capture_output=True, text=True, env=env).returncode == 0
    secret = (tmp_path / "c" / "server.secret").read_bytes()
    again = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "holds ca.pem, ca.key, server.pem ... already" in again.stderr, again.stderr
    assert (tmp_path / "c" / "server.secret").read_bytes() == secret
    forced = subprocess.run(argv + ["--force"], capture_output=True, text=True, env=env)
    assert forced.returncode == 0 and (tmp_path / "c" / "server.secret").read_bytes() != secret
