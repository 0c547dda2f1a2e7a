"""Every strategy as a whole job (launch.py, real processes, tiny CIFAR-10 files in torchvision's layout), on both
memory paths: the same global model bit for bit (FedProx: to float rounding, as its gradients round differently)."""
import pytest
import torch

from conftest import CONF, TINY, job_dirs, launch, result

STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


@pytest.mark.slow
def test_every_strategy_runs_on_both_paths_with_the_same_global_model(tmp_path, tiny_data):
    proc = launch(["-m", f"strategy={','.join(STRATEGIES)}", "optimize=true,false", *TINY, "rounds=1",
                   "num_clients=3", "dataset=cifar", "profiling.enabled=false"], tmp_path,
                  env={"FLMEM_DATA": str(tiny_data)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = {}
    for job in job_dirs(tmp_path):
        res = result(job)
        assert res["status"] == "completed", res["failure"]
        params = dict(o.lower().split("=", 1) for o in res["overrides"])
        (record,) = res["rounds"]
        assert record["sampled"] == [0, 1, 2] and record["updates"] == 3 and record["failures"] == []
        models[params["strategy"], params["optimize"]] = torch.load(job / "roles/server/global_model.pt",
                                                                    weights_only=True)
    assert {s for s, _ in models} == set(STRATEGIES) and len(models) == 2 * len(STRATEGIES)
    for name in STRATEGIES:
        original, optimized = models[name, "false"], models[name, "true"]
        for key in original:
            if name == "fedprox":
                assert torch.allclose(original[key].float(), optimized[key].float(), rtol=1e-4, atol=1e-6), key
            else:
                assert torch.equal(original[key], optimized[key]), (name, key)
