"""Config composition (Hydra compose API) and validation."""
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from flmem.config import ConfigError, reference_config, validate
from tests.conftest import CONF

GROUPS = {"dataset": ["synthetic", "cifar", "mnist", "fashion_mnist", "tokens"],
          "model": ["cnn", "resnet18", "transformer"],
          "optimizer": ["sgd", "adam"], "role": ["local", "server", "client"], "optimization": ["paths"]}


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_group_option_is_on_disk():
    for group, options in GROUPS.items():
        assert sorted(p.stem for p in (CONF / group).glob("*.yaml")) == sorted(options)


@pytest.mark.parametrize("dataset", ["synthetic", "cifar", "mnist", "fashion_mnist"])
@pytest.mark.parametrize("model", ["cnn", "resnet18"])
def test_image_dataset_and_model_compose_and_fit(dataset, model):
    cfg = compose_cfg(f"dataset={dataset}", f"model={model}")
    validate(cfg)
    net = instantiate(cfg.model)
    ds = cfg.dataset
    logits = net.eval()(torch.zeros(2, ds.channels, ds.image_size, ds.image_size))
    assert logits.shape == (2, ds.num_classes)
    assert net.state_dict()[next(iter(net.state_dict()))].shape[1] == ds.channels  # first conv takes the channels


def test_language_model_composes_with_token_data():
    cfg = compose_cfg("dataset=tokens", "model=transformer", "model.d_model=64", "model.n_layers=2")
    validate(cfg)
    net = instantiate(cfg.model)
    logits = net(torch.zeros(2, cfg.dataset.seq_len, dtype=torch.int64))
    assert logits.shape == (2, cfg.dataset.seq_len, cfg.dataset.vocab_size)


@pytest.mark.parametrize("dataset, model", [("tokens", "cnn"), ("cifar", "transformer")])
def test_model_that_does_not_fit_the_data_is_refused(dataset, model):
    with pytest.raises(ConfigError, match="model=transformer needs dataset=tokens"):
        validate(compose_cfg(f"dataset={dataset}", f"model={model}"))


@pytest.mark.parametrize("role", GROUPS["role"])
def test_role_options_compose(role):
    extra = ["server.address=10.0.0.5:50051", "role.rank=1"] if role == "client" else []
    cfg = compose_cfg(f"role={role}", *extra)
    validate(cfg)
    assert cfg.role.name == role


def test_optimize_switches_every_path_and_each_flag_overrides_alone():
    on, off = compose_cfg("optimize=true"), compose_cfg("optimize=false")
    keys = ["trainer", "serde", "transport", "aggregation", "release"]
    assert all(on.optimization[k] is True for k in keys)
    assert all(off.optimization[k] is False for k in keys)
    mixed = compose_cfg("optimize=true", "optimization.trainer=false")
    assert mixed.optimization.trainer is False
    assert all(mixed.optimization[k] is True for k in keys if k != "trainer")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        compose_cfg("dataset=imagenet")
    for name in GROUPS["dataset"]:
        assert name in str(err.value)


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="num_client"):
        compose_cfg("num_client=3")


@pytest.mark.parametrize("override, expected", [
    ("num_clients=0", "num_clients=0: must be an integer >= 1"),
    ("rounds=-1", "rounds=-1: must be an integer >= 1"),
    ("transport.chunk_size=8388608", "transport.chunk_size=8388608: must be between 1024 and "
                                     "transport.max_message_bytes"),
    ("transport.chunk_size=1001", "must be a multiple of 8"),
    ("optimizer._target_=SGD", "optimizer._target_=SGD: must be the dotted name of a class or function"),
    ("optimizer._partial_=false", "optimizer._partial_=False: must be true"),
    ("optimizer.lr=-1", "optimizer.lr=-1: must be a number > 0"),
    ("dataset._target_=9", "dataset._target_=9: must be the dotted name"),
    ("lr=0", "lr=0: must be a number > 0"),
    ("dataset.partition=shards", "dataset.partition=shards: must be iid or dirichlet"),
    ("profiling.capture_format=json", "profiling.capture_format=json"),
    ("rounds=three", "rounds=three: must be an integer >= 1"),
    ("client.mode=fast", "client.mode=fast: must be train, local_only or comm_only"),
    ("evaluate=no", "evaluate=no: must be true or false"),
    ("profiling.enabled=1", "profiling.enabled=1: must be true or false"),
    ("timeouts.idle_s=0", "timeouts.idle_s=0: must be a number > 0 seconds"),
])
def test_bad_values_name_the_key_and_the_rule(override, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    assert expected in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("num_clients=0", "rounds=0"))
    assert "num_clients=0" in str(err.value) and "rounds=0" in str(err.value)


def test_client_role_needs_a_real_server_address_and_rank():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("role=client", "role.rank=5"))
    message = str(err.value)
    assert "role.rank=5: must be in 0..num_clients-1 = 0..1" in message
    assert "server.address=127.0.0.1:0" in message


def check(*overrides):
    """Compose like launch.py and validate with the keys the groups define (as every job does)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
        validate(cfg, reference_config(list(overrides)))
    return cfg


@pytest.mark.parametrize("override, named, fix", [
    ("+dataset.partiton=dirichlet", "dataset.partiton=dirichlet", "did you mean dataset.partition? Set it without "
                                                                  "'+': dataset.partition=dirichlet"),
    ("++strategy.wieghted=false", "strategy.wieghted=false", "strategy.weighted=false"),
    ("+model.widht=64", "model.widht=64", "model.width=64"),
    ("+nonsense.deep.key=1", "nonsense:", "flmem reads no such key; drop it"),
])
def test_a_key_added_with_plus_that_no_group_defines_is_refused(override, named, fix):
    with pytest.raises(ConfigError) as err:
        check(override)
    message = str(err.value)
    assert f"{named}" in message and "unknown key" in message and fix in message
    assert "nonsense.deep" not in message  # an unknown mapping is reported once, at its top


def test_a_key_of_another_option_of_the_group_is_unknown_for_this_one():
    with pytest.raises(ConfigError, match="dataset.vocab_size=3: unknown key"):
        check("+dataset.vocab_size=3")  # dataset=tokens has it; the default dataset=synthetic does not
    check("dataset=tokens", "model=transformer", "dataset.vocab_size=3")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_adds_only_keys_its_groups_define(experiment):
    cfg = check(f"+experiment={experiment}")
    assert cfg.rounds >= 1


def test_without_a_hydra_context_only_values_are_checked():
    assert reference_config(["+dataset.partiton=dirichlet"]) is None


@pytest.mark.parametrize("overrides, expected", [
    (["seed=-5"], "seed=-5: a seed must be an integer in 0..4294967295"),
    (["dataset.seed=-1"], "dataset.seed=-1: a seed must be an integer in 0..4294967295"),
    (["seed=99999999999999999999"], "seed=99999999999999999999: a seed must be an integer in 0..4294967295"),
    (["seed=4294967296"], "seed=4294967296: a seed must be an integer"),
    (["seed=1.5"], "seed=1.5: a seed must be an integer"),
])
def test_a_seed_outside_32_bits_is_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    message = str(err.value)
    assert expected in message
    assert message.count("a seed must be") == 1  # dataset.seed follows seed: reported once


@pytest.mark.parametrize("value", [0, 2**32 - 1])
def test_the_seed_range_ends_are_accepted_by_numpy_and_torch(value):
    import numpy as np

    validate(compose_cfg(f"seed={value}", "dataset=mnist"))
    np.random.default_rng(value), np.random.RandomState(value), torch.manual_seed(value)
    torch.Generator().manual_seed(value * 1_000_003 + 1009 * 64 + 10_000)  # the trainer's per-round mix


def test_a_bad_value_is_reported_once_not_again_for_the_keys_that_interpolate_it():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("optimize=maybe"))
    lines = str(err.value).splitlines()[1:]
    assert lines == ["  optimize=maybe: must be true or false"]
    with pytest.raises(ConfigError) as err:  # a derived key the user set himself is still reported
        validate(compose_cfg("optimize=maybe", "optimization.serde=2"))
    assert [ln.strip() for ln in str(err.value).splitlines()[1:]] == [
        "optimize=maybe: must be true or false", "optimization.serde=2: must be true or false"]


@pytest.mark.parametrize("name", GROUPS["dataset"])
def test_every_dataset_option_builds_its_source_keeping_its_name(name):
    from flmem.datasets.base import DataSource

    cfg = compose_cfg(f"dataset={name}")
    source = instantiate(cfg.dataset)
    assert isinstance(source, DataSource) and source.name == name == cfg.dataset.name
    assert type(source).__module__ == cfg.dataset._target_.rpartition(".")[0]


@pytest.mark.parametrize("overrides, kind, settings", [
    ([], torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}),
    (["optimizer=adam", "lr=0.001"], torch.optim.Adam, {"lr": 0.001, "weight_decay": 0.0}),
    (["optimizer.weight_decay=0.01"], torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.01}),
    (["optimizer=adam", "+optimizer.amsgrad=true"], torch.optim.Adam, {"amsgrad": True}),
    (["+optimizer.nesterov=true", "optimizer.momentum=0.5"], torch.optim.SGD, {"nesterov": True, "momentum": 0.5}),
])
def test_the_optimizer_group_builds_a_function_of_the_parameters(overrides, kind, settings):
    cfg = check(*overrides)  # a library's keyword argument added with '+' is not an unknown key
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(3))])
    assert type(optimizer) is kind
    assert {k: optimizer.defaults[k] for k in settings} == settings


def test_a_near_miss_of_an_optimizer_key_is_still_refused():
    with pytest.raises(ConfigError) as err:
        check("+optimizer.momentom=0.5")
    assert "did you mean optimizer.momentum? Set it without '+': optimizer.momentum=0.5" in str(err.value)


def test_an_experiment_can_switch_the_optimizer():
    cfg = check("+experiment=client_overhead")
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.001


def test_a_key_the_data_source_does_not_take_fails_before_any_role_starts(tmp_path):
    from flmem.launcher import dataset_source

    cfg = compose_cfg("dataset.samples_per_client=5")
    assert dataset_source(cfg.dataset).samples_per_client == 5
    with pytest.raises(ConfigError, match="unexpected keyword argument 'shards'"):
        dataset_source({**cfg.dataset, "shards": 3})
    with pytest.raises(ConfigError, match="flmem.datasets.nope.Nope"):
        dataset_source({**cfg.dataset, "_target_": "flmem.datasets.nope.Nope"})


@pytest.mark.parametrize("overrides, message", [
    (["strategy.min_fit_clients=3"], "strategy.min_fit_clients=3: must be in 1..num_clients = 1..2"),
    (["strategy=fedmedian", "strategy.fraction_fit=0"], "strategy.fraction_fit=0: must be in (0, 1]"),
    (["strategy.accept_failures=maybe"], "strategy.accept_failures=maybe: must be true or false"),
    (["strategy._target_=FedAvg"], "strategy._target_=FedAvg: must name a strategy class"),
    (["strategy._target_=nonexistent.Class"], "strategy._target_=nonexistent.Class: no module 'nonexistent'"),
    (["strategy=trimmed_mean", "strategy.beta=0.7"], "strategy.beta=0.7: must be in [0, 0.5)"),
    (["strategy=fedadam", "strategy.eta=-1"], "strategy.eta=-1: must be > 0"),
    (["strategy=fedyogi", "strategy.beta_2=1"], "strategy.beta_2=1: must be in [0, 1)"),
    (["strategy=fedprox", "strategy.proximal_mu=-0.1"], "strategy.proximal_mu=-0.1: must be >= 0"),
])
def test_strategy_values_are_checked_before_any_process_starts(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(*overrides)


def test_every_strategy_option_composes_and_names_its_class():
    for name, cls in [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam"), ("fedyogi", "FedYogi"),
                      ("fedadagrad", "FedAdagrad"), ("fedmedian", "FedMedian"), ("trimmed_mean", "TrimmedMean")]:
        cfg = check(f"strategy={name}")
        assert cfg.strategy._target_ == f"flmem.strategies.{cls}" and cfg.strategy.min_fit_clients == 1
