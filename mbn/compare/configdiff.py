"""How the runs' configs differ: the common config, per-row settings and each run's deviations.

Keys below a table key's group (``norm.*`` when rows or columns are ``norm.name``) belong to that
key's value: GN's ``norm.num_groups`` is compared among the GN runs only, so it is a setting of GN rather
than a difference of every GN run. Other keys are compared across all runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd

from mbn.compare.aggregate import GridSpec, sort_key
from mbn.compare.collect import UNREADABLE, RunSet, plain
from mbn.results import HASH_EXCLUDED_KEYS

# Config keys that say where/how a run was stored or logged, not what it computed; never diffed.
BOOKKEEPING_PREFIXES = tuple(key for key in HASH_EXCLUDED_KEYS if key != "sweep_name")


@dataclass
class ConfigSummary:
    """Attributes:
        common: most common value of each key that is not a row setting.
        row_settings: ``table key -> value -> {key: most common value among those runs}`` for the keys
            of the table key's group (``norm.name -> "gn" -> {"norm.num_groups": 8}``; ``"bn" -> {}``);
            None values dropped.
        diffs: ``run_id -> {key: value}`` of the keys where a run differs from the common value (row settings:
            from its group's value), for every readable run, ordered by the table keys.
        varying: keys whose value is not the same for all runs (row settings: within one group) -> number
            of distinct values.
    """

    common: dict[str, Any]
    row_settings: dict[str, dict[Any, dict[str, Any]]]
    diffs: dict[int, dict[str, Any]]
    varying: dict[str, int]


def summarize_config(runset: RunSet, spec: GridSpec) -> ConfigSummary:
    """Compare the configs of the readable runs.

    Args:
        runset: the runs.
        spec: the table layout; its keys are not diffed (they are what the table is about).
    """
    runs = readable_runs(runset)
    runs = runs.loc[sorted(runs.index, key=lambda i: tuple(
        sort_key(plain(runs.at[i, k]), k) for k in spec.keys if k in runs.columns))]
    scopes = {key: _scope(key, spec) for key in diffable_keys(runset, spec.keys)}
    common: dict[str, Any] = {}
    row_settings: dict[str, dict[Any, dict[str, Any]]] = {row: {} for row in set(scopes.values()) if row}
    expected = pd.DataFrame(index=runs.index, columns=list(scopes), dtype=object)
    varying: dict[str, int] = {}
    for key, row_key in scopes.items():
        if row_key is None:
            common[key] = most_common(runs[key])
            expected[key] = [common[key]] * len(runs)
            distinct = len({plain(v) for v in runs[key]})
        else:
            distinct = 1
            for row_value, group in runs.groupby(runs[row_key].map(plain), sort=False, dropna=False):
                value = most_common(group[key])
                settings = row_settings[row_key].setdefault(row_value, {})
                if value is not None:
                    settings[key] = value
                expected.loc[group.index, key] = pd.Series([value] * len(group), index=group.index, dtype=object)
                distinct = max(distinct, len({plain(v) for v in group[key]}))
        if distinct > 1:
            varying[key] = distinct
    diffs = {int(run_id): {key: plain(run[key]) for key in scopes if plain(run[key]) != expected.at[run_id, key]}
             for run_id, run in runs.iterrows()}
    for row_key, settings in row_settings.items():
        row_settings[row_key] = dict(sorted(settings.items(), key=lambda item: sort_key(item[0], row_key)))
    return ConfigSummary(common=common, row_settings=row_settings, diffs=diffs, varying=varying)


def differing_keys(runset: RunSet, run_ids: Sequence[int]) -> list[str]:
    """Config keys (bookkeeping excluded) whose values differ among ``run_ids``."""
    subset = runset.runs.loc[list(run_ids)]
    return [key for key in diffable_keys(runset) if len({plain(v) for v in subset[key]}) > 1]


def diffable_keys(runset: RunSet, exclude: Iterable[str] = ()) -> list[str]:
    """Config keys worth comparing (no storage/logging bookkeeping, none of ``exclude``)."""
    excluded = set(exclude)
    return [key for key in runset.config_keys
            if key not in excluded and key.split(".")[0] not in BOOKKEEPING_PREFIXES]


def readable_runs(runset: RunSet) -> pd.DataFrame:
    return runset.runs[runset.runs["status"] != UNREADABLE]


def most_common(values: Iterable[Any]) -> Any:
    """Most frequent value (missing counts as None); ties go to the smallest text, so run order does not matter."""
    counts = Counter(plain(v) for v in values)
    if not counts:
        return None
    return min(counts.items(), key=lambda item: (-item[1], str(item[0])))[0]


def _scope(key: str, spec: GridSpec) -> str | None:
    """The table key whose group ``key`` belongs to (``norm.num_groups`` -> ``norm.name``), if any."""
    for table_key in spec.keys:
        if table_key.endswith(".name") and key.startswith(table_key[: -len("name")]):
            return table_key
    return None
