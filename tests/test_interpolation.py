"""A '$' or '${' in an override: a literal one reaches the roles as typed, a legitimate interpolation is resolved
once (by the launcher), a broken one is a config error naming the override, and result.json keeps it as typed."""
import itertools

import pytest
from omegaconf import OmegaConf

from flmem.literal import escape, literal_config
from tests.conftest import TINY, job_dirs, launch, result, write_cifar

ONE = [*TINY[:-1], "rounds=1", "num_clients=1", "profiling.flamegraph=false", "dataset=cifar"]


def test_escaped_strings_read_back_as_themselves():
    for n in range(1, 6):  # every string of up to 5 of the characters OmegaConf's grammar treats specially
        for chars in itertools.product("a$\\{}:", repeat=n):
            text = "".join(chars)
            assert OmegaConf.create({"v": escape(text)}).v == text
            assert OmegaConf.create(OmegaConf.to_yaml(literal_config({"v": text}))).v == text
    assert escape("/data/a$b") == "/data/a$b" and escape("x${y}") == "x\\${y}" and escape("\\${y}") == "\\\\\\${y}"


@pytest.mark.parametrize("override, key, reason", [
    ("dataset.root=${oops}", "dataset.root", "Interpolation key 'oops' not found"),
    ("server.host=${nope:x}", "server.host", "Unsupported interpolation type nope"),
    ("+note=${oops}", "note", "Interpolation key 'oops' not found"),
])
def test_a_broken_interpolation_is_a_config_error_naming_the_override(tmp_path, override, key, reason):
    proc = launch([override], tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["failure"]["role"] == "config" and not (job / "roles").exists()
    assert res["failure"]["reason"] == (
        f"invalid config:\n  {override}: the interpolation in {key} does not resolve ({reason}). Refer to a key "
        "the config has (e.g. ${server.host}, ${oc.env:NAME}), or keep '${' literally by escaping it, quoted: "
        f"'{key}=\\${{...}}'")
    assert res["overrides"] == [override]  # as typed, never resolved
    assert f"{override}: the interpolation in {key} does not resolve" in " ".join(proc.stdout.split())


@pytest.mark.slow
def test_literal_dollar_and_brace_reach_the_roles_as_typed(tmp_path):
    literal = tmp_path / "lit${x}"  # the data exists under this very name only: a role that resolves it fails
    write_cifar(literal)
    proc = launch([*ONE, f"dataset.root='{tmp_path}/lit\\${{x}}'"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "completed" and res["overrides"][-1] == f"dataset.root='{tmp_path}/lit\\${{x}}'"
    assert OmegaConf.load(job / "config.yaml").dataset.root == str(literal)  # what every role read
    assert (job / "config.yaml").read_text().count(f"root: {tmp_path}/lit\\${{x}}") == 1


@pytest.mark.slow
def test_a_sweep_over_dollar_values_resolves_each_once_and_records_them_as_typed(tmp_path):
    for name in ("a$b", "lit${x}", "cifar"):
        write_cifar(tmp_path / name)
    values = [f"{tmp_path}/a$b", f"{tmp_path}/lit\\${{x}}", f"{tmp_path}/${{dataset.name}}"]
    proc = launch(["-m", *ONE, "dataset.root=" + ",".join(values)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_dirs(tmp_path)
    assert [result(j)["status"] for j in jobs] == ["completed"] * 3
    assert [result(j)["overrides"][-1] for j in jobs] == [f"dataset.root={v}" for v in values]
    roots = [OmegaConf.load(j / "config.yaml").dataset.root for j in jobs]
    assert roots == [f"{tmp_path}/a$b", f"{tmp_path}/lit${{x}}", f"{tmp_path}/cifar"]


def test_a_broken_interpolation_in_a_hydra_setting_stops_before_hydra_with_one_line(tmp_path):
    proc = launch(["hydra.run.dir=out/${oops}", "num_clients=0"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "flmem: hydra.run.dir=out/${oops}: the interpolation in hydra.run.dir does not resolve (Interpolation key "
        "'oops' not found). Refer to a key the config has (e.g. ${now:%Y-%m-%d}, ${oc.env:NAME}), or keep '${' "
        "literally by escaping it, quoted: 'hydra.run.dir=\\${...}'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()
    ok = launch(["hydra.run.dir=out/${dataset.name}", "num_clients=0"], tmp_path)  # resolves: Hydra runs the job
    assert ok.returncode == 1 and "num_clients=0: must be an integer >= 1" in ok.stdout
    assert (tmp_path / "out" / "synthetic" / "result.json").exists()
