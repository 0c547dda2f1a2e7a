"""A composed config resolved once, in the launcher, and read by the roles as exactly those values.

OmegaConf reads ``${...}`` in every string it holds as an interpolation, each time the string is read
again: a value that resolved to ``${x}`` (the user escaped it, ``key='\\${x}'``) or to a path holding
``${`` would be resolved a second time by whoever loads it. So the launcher resolves the composed
config once (:func:`resolve`: a broken interpolation is a :class:`~flmem.config.ConfigError` naming the
override and the fix), and :func:`literal_config` escapes each ``${`` of the result (``\\${``, OmegaConf's
own escape) so that reading it back, from ``config.yaml`` in a role, gives the same strings.
``hydra.utils.instantiate`` resolves a config and then reads it again (``OmegaConf.resolve`` stores an
escaped string unescaped), so :func:`instantiate` hands such strings to the target itself.
"""
from __future__ import annotations

import functools
import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError

from flmem.config import ConfigError

_BRACE = re.compile(r"(\\*)\$\{")  # a "${" and the backslashes right before it


def escape(text: str) -> str:
    """``text`` as an OmegaConf string that reads back as ``text``: each ``${`` becomes ``\\${``, and the
    backslashes right before it are doubled (OmegaConf unescapes backslashes only there)."""
    return _BRACE.sub(lambda m: m.group(1) * 2 + "\\${", text) if "${" in text else text


def _escaped(value):
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def _holds_brace(value) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_holds_brace(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_brace(v) for v in value)
    return False


def _culprits(key: str | None, overrides: list[str]) -> list[str]:
    """The overrides behind a failed interpolation at ``key``: the one that sets ``key``, else every
    override whose value holds ``${``."""
    def key_of(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    direct = [o for o in overrides if "=" in o and key_of(o) == key]
    return direct or [o for o in overrides if "${" in o.partition("=")[2]]


def resolve(cfg: DictConfig, overrides: list[str]) -> dict:
    """Every value of ``cfg`` resolved once (plain dicts, lists and scalars).

    Raises:
        ConfigError: an interpolation names no key, an unknown resolver, or is malformed; the message
            names the key, the override that set it (from ``overrides``, as typed) and the two fixes.
    """
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, GrammarParseError) as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        setting = ", ".join(_culprits(key, overrides)) or f"{key} (in the config files)"
        raise ConfigError(
            f"invalid config:\n  {setting}: the interpolation in {key} does not resolve ({reason}). "
            "Refer to a key the config has (e.g. ${server.host}, ${oc.env:NAME}), or keep '${' literally by "
            "escaping it, quoted: " + (f"'{key}=\\${{...}}'" if key else "'KEY=\\${...}'")) from None


def literal_config(values: dict) -> DictConfig:
    """A config holding ``values`` (from :func:`resolve`) that reads back as exactly those values: each
    string's ``${`` escaped. ``OmegaConf.to_yaml`` of it is what the roles load (struct mode, as Hydra's)."""
    cfg = OmegaConf.create(_escaped(values))
    OmegaConf.set_struct(cfg, True)
    return cfg


def instantiate(node):
    """``hydra.utils.instantiate(node)`` for one config group (``_target_`` and its keyword arguments),
    where an argument holding ``${`` (read from a :func:`literal_config`) reaches the target as that
    string: such arguments are passed to the target directly, the others through Hydra.

    Raises:
        hydra.errors.InstantiationException: as ``hydra.utils.instantiate`` does, also when calling the
            target with the literal arguments fails.
    """
    import hydra.utils
    from hydra.errors import InstantiationException

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    literal = {k: v for k, v in values.items() if not str(k).startswith("_") and _holds_brace(v)}
    if not literal:
        return hydra.utils.instantiate(node)
    rest = {k: v for k, v in values.items() if k not in literal}
    partial = bool(rest.get("_partial_", False))
    built = hydra.utils.instantiate({**rest, "_partial_": True})
    if partial:
        return functools.partial(built, **literal)
    try:
        return built(**literal)
    except Exception as exc:
        raise InstantiationException(f"Error in call to target '{rest.get('_target_')}':\n"
                                     f"{type(exc).__name__}({exc})") from exc


def broken_hydra_overrides(args: list[str], config_dir: str, config_name: str = "config") -> list[str]:
    """One message per ``hydra.*`` override among the command-line ``args`` whose ``${...}`` cannot resolve
    (``hydra.run.dir=out/${oops}``): Hydra itself would stop on it with a traceback before any job starts.
    The command line is composed as Hydra would (``config_dir``: the primary config's folder); what cannot
    be told before Hydra runs (a sweep, its runtime keys, the ``hydra:`` resolver) is left to Hydra.
    [] when there is nothing to say."""
    candidates = [a for a in args if "=" in a and not a.startswith("-") and a.lstrip("+~").startswith("hydra.")
                  and "${" in a.partition("=")[2]]
    if not candidates:
        return []
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf.errors import InterpolationToMissingValueError

    problems = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            overrides = [a for a in args if "=" in a and not a.startswith("-")]  # a key ${...} may name
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception:  # a sweep, a malformed override: Hydra reports what it finds itself
        return []
    finally:
        GlobalHydra.instance().clear()
    for override in candidates:
        key = override.partition("=")[0].lstrip("+~")
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except InterpolationToMissingValueError:
            continue  # a runtime key Hydra fills in when it runs the job
        except (InterpolationResolutionError, GrammarParseError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "HydraConfig" in reason or "'hydra." in reason:
                continue
            problems.append(f"{override}: the interpolation in {key} does not resolve ({reason}). Refer to a key "
                            "the config has (e.g. ${now:%Y-%m-%d}, ${oc.env:NAME}), or keep '${' literally by "
                            f"escaping it, quoted: '{key}=\\${{...}}'")
        except Exception:  # not an interpolation problem: Hydra reports it
            continue
    return problems
