"""Validation of a composed job config, before any process starts.

Hydra already rejects an unknown group option (listing the valid ones) and an unknown key, but
it suggests ``+KEY=VALUE`` for the latter, and a key added that way (or by ``++``) would be
silently ignored. :func:`validate` refuses such keys, comparing the config with the same
composition without the key overrides (:func:`reference_config`), and checks values: each error
names the key, the value and the rule, and all errors are reported at once.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flmem.security import is_loopback

ENVELOPE_BYTES = 1024  # room for a ModelChunk's non-data fields inside the gRPC message limit
GRPC_MAX = 2**31 - 1
# Seeds go to numpy's default_rng and torch.manual_seed, mixed with the rank and round; 32 bits is
# the range every seeded generator here (numpy's legacy RandomState too) takes as given.
SEED_MAX = 2**32 - 1
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # module.attribute, as hydra.utils.instantiate takes
EXAMPLE_TARGETS = {"dataset": "flmem.datasets.cifar.CIFAR10", "model": "flmem.models.SmallCNN",
                   "optimizer": "torch.optim.SGD"}
OWN_TARGETS = "flmem."  # targets whose keyword arguments are exactly the keys their yaml defines


class ConfigError(ValueError):
    """One or more config values break a rule; the message lists every one."""


def _rules(cfg: DictConfig):
    """Yield ``(ok, "key=value: rule")`` pairs."""
    def at_least(key, value, low):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return ok, f"{key}={value}: must be an integer >= {low}"

    def positive(key, value, unit=""):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return ok, f"{key}={value}: must be a number > 0{unit}"

    def seed(key, value):
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX
        return ok, f"{key}={value}: a seed must be an integer in 0..{SEED_MAX} (2**32-1)"

    yield seed("seed", cfg.seed)
    yield at_least("num_clients", cfg.num_clients, 1)
    yield at_least("rounds", cfg.rounds, 1)
    yield at_least("local_steps", cfg.local_steps, 1)
    yield at_least("batch_size", cfg.batch_size, 1)
    yield at_least("threads_per_role", cfg.threads_per_role, 1)
    yield positive("lr", cfg.lr)
    for group in ("dataset", "model", "optimizer"):  # built with hydra.utils.instantiate: checked without importing
        target = OmegaConf.select(cfg, f"{group}._target_")
        yield (isinstance(target, str) and DOTTED_NAME.fullmatch(target) is not None,
               f"{group}._target_={target}: must be the dotted name of a class or function, e.g. "
               f"{EXAMPLE_TARGETS[group]} (conf/{group}/*.yaml)")
    partial = OmegaConf.select(cfg, "optimizer._partial_")
    yield (partial is True, f"optimizer._partial_={partial}: must be true: the trainer calls the optimizer with the "
                            "model's parameters each round")
    if OmegaConf.select(cfg, "optimizer.lr") is not None:
        yield positive("optimizer.lr", cfg.optimizer.lr)
    flags = ["optimize", "evaluate", "save_global_model", "dataset.download",
             *(f"optimization.{k}" for k in ("trainer", "serde", "transport", "aggregation", "release")),
             *(f"profiling.{k}" for k in ("enabled", "native_traces", "track_imports", "trace_python_allocators",
                                          "flamegraph"))]
    for key in flags:
        value = OmegaConf.select(cfg, key)
        yield isinstance(value, bool), f"{key}={value}: must be true or false"

    st = cfg.strategy  # the strategy's own constructor checks its other keys when the server builds it
    yield (isinstance(st.get("_target_"), str) and re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", st._target_),
           f"strategy._target_={st.get('_target_')}: must name a strategy class, e.g. flmem.strategies.FedAvg")
    target = st.get("_target_")
    if isinstance(target, str) and "." in target:
        module = target.rpartition(".")[0]
        try:  # finds the module without importing it (the strategies import torch)
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        yield found, (f"strategy._target_={target}: no module {module!r} on the Python path; put the file that "
                      "defines the class on PYTHONPATH, or pick a strategy from conf/strategy/")

    def number_in(key, ok, rule):
        value = st.get(key)
        good = isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value)
        return good, f"strategy.{key}={value}: {rule}"

    # The strategies' own ranges, checked here too so a bad value fails before any process starts.
    for key, ok, rule in (("eta", lambda v: v > 0, "must be > 0"), ("tau", lambda v: v > 0, "must be > 0"),
                          ("beta_1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
                          ("beta_2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
                          ("proximal_mu", lambda v: v >= 0, "must be >= 0")):
        if key in st:
            yield number_in(key, ok, rule)
    if "beta" in st:
        yield number_in("beta", lambda v: 0 <= v < 0.5, "must be in [0, 0.5) (the fraction trimmed at each end)")
    for key in ("weighted", "accept_failures"):
        if key in st:
            yield isinstance(st[key], bool), f"strategy.{key}={st[key]}: must be true or false"
    if "fraction_fit" in st:
        yield (isinstance(st.fraction_fit, (int, float)) and not isinstance(st.fraction_fit, bool)
               and 0 < st.fraction_fit <= 1, f"strategy.fraction_fit={st.fraction_fit}: must be in (0, 1]")
    if "min_fit_clients" in st:
        n = cfg.num_clients if isinstance(cfg.num_clients, int) else 0
        yield (isinstance(st.min_fit_clients, int) and not isinstance(st.min_fit_clients, bool)
               and 1 <= st.min_fit_clients <= n,
               f"strategy.min_fit_clients={st.min_fit_clients}: must be in 1..num_clients = 1..{n}")

    yield (cfg.client.mode in ("train", "local_only", "comm_only"),
           f"client.mode={cfg.client.mode}: must be train, local_only or comm_only")
    yield (isinstance(cfg.client.perturbation, (int, float)) and not isinstance(cfg.client.perturbation, bool)
           and cfg.client.perturbation >= 0, f"client.perturbation={cfg.client.perturbation}: must be a number >= 0")
    if cfg.client.mode == "local_only":
        yield cfg.role.name in ("local", "client"), f"role={cfg.role.name}: client.mode=local_only runs no server"

    ds = cfg.dataset
    language_model = str(cfg.model.get("_target_", "")).endswith("DecoderLM")
    yield (language_model == (ds.name == "tokens"),
           f"dataset={ds.name} with {'model=transformer' if language_model else 'an image model'}: "
           "model=transformer needs dataset=tokens and dataset=tokens needs model=transformer; image datasets "
           "take model=cnn or model=resnet18")
    if ds.seed != cfg.seed:  # the same value is reported once, as seed
        yield seed("dataset.seed", ds.seed)
    yield ds.partition in ("iid", "dirichlet"), f"dataset.partition={ds.partition}: must be iid or dirichlet"
    yield positive("dataset.alpha", ds.alpha)
    if ds.samples_per_client is not None:
        yield at_least("dataset.samples_per_client", ds.samples_per_client, 1)
    if ds.test_samples is not None:
        yield at_least("dataset.test_samples", ds.test_samples, 1)
    if ds.name not in ("synthetic", "tokens"):  # generated data needs no files
        yield bool(ds.root), f"dataset.root={ds.root}: dataset={ds.name} needs the folder that holds its files"

    tr = cfg.transport
    yield (isinstance(tr.max_message_bytes, int) and 64 * 1024 <= tr.max_message_bytes <= GRPC_MAX,
           f"transport.max_message_bytes={tr.max_message_bytes}: must be between 65536 and {GRPC_MAX}")
    limit = (tr.max_message_bytes if isinstance(tr.max_message_bytes, int) else 0) - ENVELOPE_BYTES
    yield (isinstance(tr.chunk_size, int) and 1024 <= tr.chunk_size <= limit,
           f"transport.chunk_size={tr.chunk_size}: must be between 1024 and transport.max_message_bytes - "
           f"{ENVELOPE_BYTES} = {limit} (raise transport.max_message_bytes or lower the chunk size)")
    yield (not isinstance(tr.chunk_size, int) or tr.chunk_size % 8 == 0,
           f"transport.chunk_size={tr.chunk_size}: must be a multiple of 8")

    rate = tr.get("min_upload_mib_s")
    yield (rate is None or (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0),
           f"transport.min_upload_mib_s={rate}: must be a number of MiB/s > 0, or null (no floor)")
    keepalive = tr.get("keepalive_s")
    yield (keepalive is None or (isinstance(keepalive, (int, float)) and not isinstance(keepalive, bool)
                                 and keepalive >= 1),
           f"transport.keepalive_s={keepalive}: must be a number of seconds >= 1, or null (gRPC's defaults: "
           "a hung server is noticed only at timeouts.rpc_s)")
    yield from _security_rules(cfg)

    for key, value in cfg.timeouts.items():
        yield positive(f"timeouts.{key}", value, " seconds")

    prof = cfg.profiling
    yield (prof.capture_format in ("aggregated", "all_allocations"),
           f"profiling.capture_format={prof.capture_format}: must be aggregated or all_allocations")
    yield at_least("profiling.memory_interval_ms", prof.memory_interval_ms, 1)
    yield at_least("profiling.top_sites", prof.top_sites, 0)

    for key in ("host", "address"):  # Hydra reads server.host=[::1] as a list
        value = cfg.server.get(key)
        yield (isinstance(value, str) and bool(value),
               f"server.{key}={value}: must be a host name or address; write an IPv6 literal without brackets "
               "(server.host=::1, server.address=::1:50051: the last colon starts the port) or quote it "
               "('server.address=\"[::1]:50051\"')")
    yield (isinstance(cfg.server.port, int) and 0 <= cfg.server.port <= 65535,
           f"server.port={cfg.server.port}: must be 0 (any free port) to 65535")
    non_finite = OmegaConf.select(cfg, "server.non_finite")
    yield (non_finite in ("reject", "accept"),
           f"server.non_finite={non_finite}: must be reject (refuse an update holding NaN or infinity) or accept")
    if cfg.role.name == "client":
        rank = cfg.role.rank
        n = cfg.num_clients if isinstance(cfg.num_clients, int) else 0
        yield (isinstance(rank, int) and 0 <= rank < n, f"role.rank={rank}: must be in 0..num_clients-1 = 0..{n - 1}")
        host, _, port = str(cfg.server.address).rpartition(":")
        yield (bool(host) and port.isdigit() and 0 < int(port) < 65536,
               f"server.address={cfg.server.address}: role=client needs the server's HOST:PORT with a real port "
               "(the server prints it), e.g. server.address=10.0.0.5:50051")


SECURITY_FILES = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key", "secret_file", "token_file")
CERTS_HINT = "`flmem certs --out certs --hosts HOST --clients N` makes them"


def _security_rules(cfg: DictConfig):
    """The ``security`` section: files that exist and are readable, and combinations that make sense
    (README "Running across hosts, securely")."""
    sec = cfg.get("security")
    if sec is None:
        return
    for key in ("tls", "insecure", "mutual_tls"):
        yield isinstance(sec.get(key), bool), f"security.{key}={sec.get(key)}: must be true or false"
    for key in SECURITY_FILES:
        path = sec.get(key)
        if path is None:
            continue
        file = Path(str(path)).expanduser()
        yield file.is_file(), f"security.{key}={path}: no such file ({CERTS_HINT})"
        if file.is_file():
            yield os.access(file, os.R_OK), f"security.{key}={path}: not readable by this user; fix its permissions"
    tls, role = sec.get("tls") is True, cfg.role.name
    if not tls:
        for key in ("ca_cert", "server_cert", "server_key", "client_cert", "client_key"):
            yield sec.get(key) is None, (f"security.{key}={sec.get(key)}: set, but security.tls=false; add "
                                         "security.tls=true, or drop it")
        yield sec.get("mutual_tls") is not True, "security.mutual_tls=true: needs security.tls=true"
    yield not (tls and sec.get("insecure") is True), ("security.insecure=true: contradicts security.tls=true; "
                                                      "drop security.insecure")
    for a, b in (("server_cert", "server_key"), ("client_cert", "client_key")):
        yield (sec.get(a) is None) == (sec.get(b) is None), (f"security.{a}={sec.get(a)} security.{b}={sec.get(b)}: "
                                                             "give both (a certificate and its key) or neither")
    if tls and role == "server":
        yield sec.get("server_cert") is not None, ("security.tls=true: role=server needs security.server_cert and "
                                                   f"security.server_key ({CERTS_HINT}: server.pem, server.key)")
    if role == "local":
        for key in ("secret_file", "token_file"):
            yield sec.get(key) is None, (f"security.{key}={sec.get(key)}: role=local makes its own per-job secret "
                                         "and client tokens; this file is for role=server / role=client, drop it")
    if sec.get("mutual_tls") is True:
        if role == "local":
            yield False, ("security.mutual_tls=true: role=local authenticates its clients with per-job tokens; "
                          "mutual TLS is for role=server and role=client")
        elif role == "server":
            yield sec.get("ca_cert") is not None, ("security.mutual_tls=true: the server needs security.ca_cert, "
                                                   "the CA that signed the client certificates (ca.pem)")
        elif role == "client":
            yield sec.get("client_cert") is not None, ("security.mutual_tls=true: the client needs "
                                                       "security.client_cert and security.client_key "
                                                       "(client_K.pem, client_K.key)")
    host = cfg.server.get("host")
    if role in ("server", "local") and isinstance(host, str) and sec.get("insecure") is not True \
            and not is_loopback(host):
        n = cfg.num_clients
        if not tls:
            named = host if host not in ("0.0.0.0", "::", "[::]", "") else "HOSTNAME"
            fix = ("add security.tls=true (a throw-away certificate per job), bind server.host=127.0.0.1"
                   if role == "local" else
                   f"make certificates with `flmem certs --out certs --hosts {named} --clients {n}` "
                   "and add security.tls=true security.server_cert=certs/server.pem "
                   "security.server_key=certs/server.key security.secret_file=certs/server.secret")
            yield False, (f"server.host={host}: a server reachable from other hosts refuses to run without TLS "
                          f"(security.tls=false); {fix}, or accept a server anyone who reaches the port can "
                          "read and write with security.insecure=true (README: Running across hosts, securely)")
        elif role == "server":
            yield (sec.get("secret_file") is not None or sec.get("mutual_tls") is True,
                   f"server.host={host}: a server reachable from other hosts must authenticate its clients; set "
                   "security.secret_file=certs/server.secret (each client then needs its security.token_file) or "
                   "security.mutual_tls=true, or opt out with security.insecure=true")


def reference_config(overrides: list[str], config_name: str | None = None) -> DictConfig | None:
    """The config Hydra composes from ``overrides``' group selections alone (``dataset=cifar``,
    ``+experiment=NAME``), without their key assignments (``+dataset.partiton=...``): the keys
    flmem's config groups define for this job. None when no Hydra app or compose context is active
    (then :func:`validate` checks values only).

    ``config_name``: the primary config (default: the running app's, else ``config``).
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not GlobalHydra.instance().is_initialized():
        return None
    if config_name is None:
        config_name = HydraConfig.get().job.config_name if HydraConfig.initialized() else "config"
    loader = GlobalHydra.instance().config_loader()
    groups = [o.input_line for o in OverridesParser.create().parse_overrides([str(x) for x in overrides])
              if loader.get_group_options(o.get_key_element().lstrip("+~").split("@")[0])]
    return compose(config_name=config_name, overrides=groups)


def _keys(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value (unresolved) of every leaf and every mapping under ``node``."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        out[path] = value
        if isinstance(value, dict):
            out.update(_keys(value, f"{path}."))
    return out


def _open_argument(key: str, have: dict[str, object], known: dict[str, object]) -> bool:
    """Whether ``key`` is a keyword argument for a library's callable: its mapping names a ``_target_``
    outside flmem (``torch.optim.SGD``: ``+optimizer.weight_decay=0.01``), and the key is no near miss of
    a key that mapping defines (``+optimizer.momentom`` is a typo). The callable itself refuses an
    argument it does not take when the role builds it. flmem's own targets (models, data sources) take
    exactly the keys their yaml defines, so a key added under them stays unknown."""
    parent, _, leaf = key.rpartition(".")
    mapping = have.get(parent)
    if not parent or not isinstance(mapping, dict):
        return False
    target = mapping.get("_target_")
    if not isinstance(target, str) or target.startswith(OWN_TARGETS):
        return False
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    return not difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)


def unknown_keys(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """One message per key of ``cfg`` that ``reference`` lacks (the outermost only), naming the
    closest known key (difflib) and the fix. Keys added under a library's ``_target_`` (see
    :func:`_open_argument`) are the callable's keyword arguments, not unknown."""
    have = _keys(OmegaConf.to_container(cfg, resolve=False))
    known = _keys(OmegaConf.to_container(reference, resolve=False))
    problems = []
    for key, value in have.items():
        parent = key.rpartition(".")[0]
        if key in known or (parent and parent not in known) or _open_argument(key, have, known):
            continue  # known, inside an unknown mapping (reported once, at its top), or a library's argument
        scalar = not isinstance(value, (dict, list))
        if scalar:  # as it is typed on the command line
            value = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        shown = f"{key}={value}" if scalar else key
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        fix = (f"did you mean {close[0]}? Set it without '+': {close[0]}={value if scalar else '...'}" if close
               else "flmem reads no such key; drop it (python launch.py --help lists the groups and common keys)")
        problems.append(f"{shown}: unknown key, added with '+' or '++' and read by nothing; {fix}")
    return problems


def _not_derived(problems: list[str], cfg: DictConfig) -> list[str]:
    """``problems`` without those about a key whose value is an interpolation (``${optimize}``) of a
    key already reported: the user set that one, and one error for it says all."""
    raw = _keys(OmegaConf.to_container(cfg, resolve=False))
    reported: set[str] = set()
    kept = []
    for message in problems:
        key = message.split("=", 1)[0]
        value = raw.get(key)
        refs = set(re.findall(r"\$\{([^}:]+)\}", value)) if isinstance(value, str) else set()
        if refs and refs <= reported:
            reported.add(key)
            continue
        reported.add(key)
        kept.append(message)
    return kept


def validate(cfg: DictConfig, reference: DictConfig | None = None) -> None:
    """Check every rule on a composed config and, given ``reference`` (see :func:`reference_config`),
    that it holds no key the config groups do not define.

    Raises:
        ConfigError: listing each broken rule as ``key=value: rule``.
    """
    problems = unknown_keys(cfg, reference) if reference is not None else []
    if problems:  # the value rules below may trip over what an unknown key displaced
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    problems = _not_derived([message for ok, message in _rules(cfg) if not ok], cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def misspelled_keys(args: list[str], config_dir: str, config_name: str = "config") -> list[str]:
    """One hint per plain ``KEY=VALUE`` among the command-line ``args`` whose key the config lacks:
    ``did you mean dataset.partition? ...`` (difflib), so a typo is not "fixed" with the ``+KEY`` Hydra
    suggests, which :func:`validate` would refuse. Composes the config from the group selections
    among ``args`` (``config_dir``: the primary config's folder); [] when they do not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra has reported the syntax error itself
        return []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            groups = [o for o in overrides if loader.get_group_options(o.get_key_element().lstrip("+~").split("@")[0])]
            reference = compose(config_name=config_name, overrides=[o.input_line for o in groups])
    except Exception:
        return []
    tree = _keys(OmegaConf.to_container(reference, resolve=False))
    known = list(tree)
    hints = []
    for o in overrides:
        key = o.get_key_element()
        if o.type != OverrideType.CHANGE or o in groups or key.startswith("hydra.") or key in known:
            continue
        value = o.input_line.split("=", 1)[1]
        if _open_argument(key, tree, tree):  # a library's keyword argument: Hydra's '+' is the fix
            parent = key.rpartition(".")[0]
            hints.append(f"{key} is not a key of flmem's config; as an argument of {tree[parent]['_target_']}, "
                         f"add it with '+': +{key}={value}")
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{key} is not a key of flmem's config: did you mean {close[0]}? "
                         f"{close[0]}={value} (a key added with '+' would be refused)")
    return hints
