"""Browse and compare flmem runs and sweeps from what they left on disk.

``flmem browse`` (or ``python -m flmem.browse``) lists the sweeps and single runs under
``outputs/``, shows one row per job of a sweep, pairs jobs that differ in one override
(``--compare optimize``), shows a single run in detail, and writes an offline HTML report
(``--html``). Everything is read from the files the launcher writes (``result.json``,
``roles/<role>/summary.json``, ``capture.bin``), so sweeps that are still running, that partly
failed, or whose captures are missing or truncated can be browsed too.

Modules: :mod:`~flmem.browse.discover` (reading runs and sweeps), :mod:`~flmem.browse.captures`
(checking memray captures, memory over time), :mod:`~flmem.browse.tables` (rows, filters,
sorting, comparison), :mod:`~flmem.browse.render` (rich, csv, json, markdown),
:mod:`~flmem.browse.charts` and :mod:`~flmem.browse.html` (the report), :mod:`~flmem.browse.cli`.
"""
from flmem.browse.discover import load_job, load_sweep, list_outputs, resolve
from flmem.browse.model import BrowseError, Job, Sweep

__all__ = ["BrowseError", "Job", "Sweep", "load_job", "load_sweep", "list_outputs", "resolve"]
