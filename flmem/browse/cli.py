"""``flmem browse``: list, show, compare and report sweeps and runs.

Exit status: 0 shown (also when the reader closes the output early, as ``| head -1`` does), 2 bad
input (unknown directory, column, filter, key), with a message that names the value and the valid
choices on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from flmem.browse.compare import compare, default_key
from flmem.browse.discover import resolve
from flmem.browse.model import BrowseError, Job
from flmem.browse.render import FORMATS, emit, make_console
from flmem.browse.views import compare_view, listing_view, run_view, short, sweep_view
from flmem.termtable import quiet_broken_pipe

EPILOG = """examples:
  flmem browse                              sweeps and runs under ./outputs, newest first
  flmem browse latest                       the newest sweep: one row per job
  flmem browse latest --compare optimize    original vs optimized, per role, stage and phase
                                            (medians over repeats when the sweep varies repeat)
  flmem browse latest --filter dataset=cifar --sort=-server_peak_heap_bytes
  flmem browse outputs/multirun/<ts>/0      one job: per role, top allocation sites, per round
  flmem browse latest --format csv > jobs.csv
  flmem browse latest --html                writes <sweep>/report.html (offline) and report/*.png|svg
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="a sweep or run directory, or 'latest' (default: list --root)")
    parser.add_argument("--root", default="outputs", type=Path,
                        help="where the sweeps (multirun/) and runs (runs/) are (default: ./outputs)")
    parser.add_argument("--compare", metavar="KEY", help="pair jobs that differ only in override KEY "
                        "(e.g. optimize) and show before, after, difference and ratio per role and per phase "
                        "(medians over the repeats when the sweep varies repeat)")
    parser.add_argument("--baseline", metavar="VALUE", help="the value of KEY used as 'before' "
                        "(default: false for booleans, else the sweep's first value)")
    parser.add_argument("--noise", type=float, default=1.0, metavar="PCT",
                        help="relative noise floor for memory in --compare, in percent (default 1)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="keep rows where KEY (a column or an override) equals VALUE; KEY!=VALUE excludes; "
                        "repeatable")
    parser.add_argument("--sort", metavar="COLUMN", help="sort by COLUMN (--sort=-COLUMN: descending)")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (rich, for people) or csv/json/markdown (raw bytes and seconds in csv/json)")
    parser.add_argument("--top", type=int, default=5, help="allocation sites per role in a run's view (default 5)")
    parser.add_argument("--html", action="store_true",
                        help="also write report.html (offline) and report/*.png|svg at the sweep or run root")


def browse(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run one ``flmem browse`` invocation. Returns the exit status; raises BrowseError on bad input."""
    console = console or make_console()
    if args.noise < 0 or args.top < 0:
        bad = [f"--noise {args.noise}"] * (args.noise < 0) + [f"--top {args.top}"] * (args.top < 0)
        raise BrowseError(f"{' and '.join(bad)}: must not be negative")
    target = resolve(args.target, args.root)
    if isinstance(target, list):
        if args.compare or args.html:
            raise BrowseError("--compare and --html need a sweep or run: give its directory or 'latest'")
        emit(listing_view(target, args.root), args.format, console)
        return 0
    if isinstance(target, Job):
        if args.compare or args.sort or args.filter:
            option = "--compare" if args.compare else "--sort" if args.sort else "--filter"
            raise BrowseError(f"{option} applies to a sweep's jobs, and {target.dir} is a single job; "
                              "give its sweep directory")
        shown = emit(run_view(target, args.top), args.format, console)
        if args.html:
            from flmem.browse.html import write_run_report

            _report_written(write_run_report(target, args.top), console, args.format, shown)
        return 0
    if args.compare:
        comparison = compare(target, args.compare, args.baseline, args.noise / 100)
        shown = emit(compare_view(target, comparison, args.filter), args.format, console)
    else:
        shown = emit(sweep_view(target, args.filter, args.sort), args.format, console)
    if args.html:
        from flmem.browse.html import write_sweep_report

        key = args.compare or default_key(target)
        _report_written(write_sweep_report(target, key, args.baseline, args.noise / 100, args.top), console,
                        args.format, shown)
    return 0


def _report_written(path: Path, console: Console, fmt: str, shown: bool = True) -> None:
    """Say where the report went: after a table on stdout, else (or when stdout was closed) on stderr."""
    message = f"report: {short(path)}"
    if fmt == "table" and shown:
        console.print(message, soft_wrap=True, highlight=False, markup=False)
    else:
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``flmem COMMAND ...``: ``browse`` or ``certs`` (:mod:`flmem.certs`)."""
    parser = argparse.ArgumentParser(prog="flmem", description="flmem tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("browse", help="browse and compare runs and sweeps", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Browse and compare flmem runs and sweeps, read from disk.")
    add_arguments(p)
    c = sub.add_parser("certs", help="make TLS certificates and client tokens for a run across hosts",
                       description="Write a CA, a server certificate, and per client a certificate and a token; "
                                   "print the overrides for each role (README: Running across hosts, securely).")
    from flmem import certs

    certs.add_arguments(c)
    args = parser.parse_args(argv)
    if args.command == "certs":
        try:
            return certs.run(args)
        except (ValueError, OSError) as exc:
            c.exit(2, f"flmem certs: error: {exc}\n")
    return _run(p, args)


def browse_main(argv: list[str] | None = None) -> int:
    """``python -m flmem.browse ...``: the same as ``flmem browse ...``."""
    parser = argparse.ArgumentParser(prog="python -m flmem.browse", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Browse and compare flmem runs and sweeps, read from disk.")
    add_arguments(parser)
    return _run(parser, parser.parse_args(argv))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return browse(args)
    except BrowseError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except BrokenPipeError:  # the reader left early (| head): not an error (before OSError, its base class)
        quiet_broken_pipe()
        return 0
    except OSError as exc:  # an unreadable directory or file: say which, no traceback
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
