"""Search spaces: the `space:` block of a sweep YAML -> checked domains -> Ray Tune search space.

A domain is written either as a mapping with one key or as a one-line string:

    lora.r: {choice: [8, 16, 32]}        lora.r: choice [8, 16, 32]
    train.lr: {loguniform: [1e-5, 1e-3]} train.lr: loguniform [1e-5, 1e-3]

Every problem names its `space.<key>`; values are checked against the train config's own types and
bounds (by validating the base config with the value set), so a sweep fails before any trial starts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from raysft.config import load_yaml_text, parse_config, set_dotted
from raysft.errors import ConfigError

# form -> number of arguments (None: a non-empty list of values)
FORMS: dict[str, int | None] = {
    "choice": None,
    "grid": None,
    "uniform": 2,
    "quniform": 3,
    "loguniform": 2,
    "qloguniform": 3,
    "randint": 2,
    "qrandint": 3,
}
_ONE_LINE = re.compile(r"^\s*([a-z_]+)\s*(\[.*\])\s*$", re.DOTALL)


@dataclass(frozen=True)
class Domain:
    """One swept config field: its form (`choice`, `loguniform`, ...) and the form's arguments."""

    form: str
    args: tuple[Any, ...]

    @property
    def enumerated(self) -> bool:
        return self.form in ("choice", "grid")

    def edge_values(self) -> list[Any]:
        """Values that must all be valid config values for every sample to be valid."""
        if self.enumerated:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        return [low, high - 1] if self.form == "randint" else [low, high]  # randint's high is exclusive

    def to_tune(self, enumerate_choices: bool = False) -> Any:
        from ray import tune

        if self.form == "grid" or (self.form == "choice" and enumerate_choices):
            return tune.grid_search(list(self.args))
        return getattr(tune, self.form)(*([list(self.args)] if self.form == "choice" else self.args))


def parse_domain(key: str, spec: Any) -> tuple[Domain | None, list[str]]:
    where = f"space.{key}"
    if isinstance(spec, str) and (match := _ONE_LINE.match(spec)):
        try:
            spec = {match.group(1): load_yaml_text(match.group(2))}
        except yaml.YAMLError:
            return None, [f"{where}: cannot read the list in {spec!r}"]
    if not (isinstance(spec, dict) and len(spec) == 1):
        return None, [f"{where}: expected one of {', '.join(FORMS)} with its list, e.g. `choice [8, 16]` (got {spec!r})"]
    (form, args), = spec.items()
    if form not in FORMS:
        return None, [f"{where}: unknown form '{form}' (valid: {', '.join(FORMS)})"]
    if not isinstance(args, list):
        return None, [f"{where}: {form} takes a list (got {args!r})"]
    arity = FORMS[form]
    if arity is None:
        return (Domain(form, tuple(args)), []) if args else (None, [f"{where}: empty {form}; give at least one value"])
    if len(args) != arity or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        names = "[low, high]" if arity == 2 else "[low, high, q]"
        return None, [f"{where}: {form} takes {names} numbers (got {args!r})"]
    low, high = args[0], args[1]
    problems = []
    if low >= high:
        problems.append(f"{where}: {form} needs low < high (got low={low}, high={high})")
    if form.endswith("loguniform") and low <= 0:
        problems.append(f"{where}: {form} needs low > 0 (got {low})")
    if arity == 3 and args[2] <= 0:
        problems.append(f"{where}: {form} needs q > 0 (got {args[2]})")
    if form.endswith("randint") and not all(isinstance(a, int) for a in args):
        problems.append(f"{where}: {form} takes integers (got {args!r})")
    return (None if problems else Domain(form, tuple(args))), problems


def _check_values(key: str, domain: Domain, base_raw: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for value in domain.edge_values():
        raw = copy.deepcopy(base_raw)
        try:
            set_dotted(raw, key, value)
            parse_config(raw)
        except ConfigError as err:
            for problem in err.problems:
                shown = f"space.{problem}" if "unknown key" in problem else f"space.{problem} (value {value!r})"
                if shown not in problems:
                    problems.append(shown)
    return problems


def parse_space(space: dict[str, Any], base_raw: dict[str, Any], search_alg: str) -> dict[str, Domain]:
    """Check every domain of `space` against the base config; raise one ConfigError naming each key."""
    problems: list[str] = [] if space else ["space: empty; give at least one `dotted.key: domain`"]
    domains: dict[str, Domain] = {}
    for key, spec in space.items():
        domain, found = parse_domain(key, spec)
        if domain is not None:
            found = _check_values(key, domain, base_raw)
        if domain is not None and search_alg == "optuna" and domain.form == "grid":
            found.append(f"space.{key}: optuna does not take grid; use choice")
        if domain is not None and search_alg == "grid" and not domain.enumerated:
            found.append(f"space.{key}: search_alg grid needs choice or grid (got {domain.form})")
        problems.extend(found)
        if domain is not None and not found:
            domains[key] = domain
    if problems:
        raise ConfigError(problems)
    return domains


def to_param_space(domains: dict[str, Domain], search_alg: str) -> dict[str, Any]:
    """Tune's param_space: flat, keyed by the dotted config key."""
    return {key: domain.to_tune(enumerate_choices=search_alg == "grid") for key, domain in domains.items()}
