"""flmem's Hydra entry point: `python launch.py [overrides]`, `python launch.py -m key=a,b ...`, `--help`."""
import signal
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from flmem.app import run_from_hydra

    return run_from_hydra(cfg)


def _sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)  # SIGTERM (kill, timeout, a scheduler) ends a launch like Ctrl-C
    if any("${" in a for a in sys.argv[1:]):  # a broken one in hydra.*: Hydra would stop with a traceback
        from pathlib import Path

        from flmem.literal import broken_hydra_overrides

        for problem in (broken := broken_hydra_overrides(sys.argv[1:], str(Path(__file__).resolve().parent / "conf"))):
            print(f"flmem: {problem}", file=sys.stderr)
        if broken:
            sys.exit(1)
    try:
        main()
    except SystemExit as exc:  # Hydra refused the command line: a misspelled key gets a hint
        if exc.code not in (0, None):
            from pathlib import Path

            from flmem.config import misspelled_keys

            for hint in misspelled_keys(sys.argv[1:], str(Path(__file__).resolve().parent / "conf")):
                print(hint, file=sys.stderr)
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: record what ran (flmem.interrupt), say what was recorded
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the recording short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from flmem.interrupt import record

        how = "SIGINT"
        if exc.args and str(exc.args[0]).startswith("SIG"):
            how = str(exc.args[0])
        try:
            message = record(how)
        except Exception as err:  # noqa: BLE001 - never hide the interrupt
            message = f"interrupted ({how}); recording it failed: {type(err).__name__}: {err}"
        print(message, file=sys.stderr)
        sys.exit(130)
    from flmem.app import exit_status

    sys.exit(exit_status())
