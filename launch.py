"""flmem's Hydra entry point: `python launch.py [overrides]`, `python launch.py -m key=a,b ...`, `--help`."""
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from flmem.app import run_from_hydra

    return run_from_hydra(cfg)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the job stopped its roles and wrote a result.json saying when
        print("interrupted: the running job's roles were stopped and its result.json says so", file=sys.stderr)
        sys.exit(130)
    from flmem.app import exit_status

    sys.exit(exit_status())
