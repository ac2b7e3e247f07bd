"""Command-line overrides whose value holds ``=``: quoted for Hydra, which cannot parse them bare.

Hydra's override grammar allows no ``=`` in an unquoted value, so ``output_root=/tmp/a=b`` stops
with ``mismatched input '='``; yet every run dir of this project is named ``key=value,...``, so a
path below one (``output_root``, ``data.source.root``, ...) holds ``=`` as a matter of course. A
value with ``=`` never parses bare, so quoting it changes no override that worked: an override is
quoted only when Hydra rejects it as given and accepts it quoted (``range(start=1,stop=3)`` and
other sweep functions parse as given and are left alone). :mod:`mbn.cli.entry_points` applies it.
"""

from __future__ import annotations

import re
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

# key=value, the key as Hydra writes it: +key, ++key, ~key, group@package, a/b group paths.
_KEY_VALUE = re.compile(r"^(?P<key>[+~]{0,2}[\w./@-]+)=(?P<value>.*)$", re.S)


def quote_values_with_equals(args: Sequence[str]) -> list[str]:
    """``args`` with each ``key=value`` override whose value holds ``=`` quoted, where that makes it parse.

    Flags (``-m``, ``--help``, ...) and every override Hydra parses as given pass unchanged.

    Args:
        args: the command-line arguments after the program name.
    """
    parser = OverridesParser.create()
    return [_quoted(arg, parser) for arg in args]


def _quoted(arg: str, parser: OverridesParser) -> str:
    match = _KEY_VALUE.match(arg)
    if arg.startswith("-") or match is None or "=" not in match["value"] or _parses(parser, arg):
        return arg
    value = match["value"]
    quote = "'" if "'" not in value else '"'
    escaped = value.replace(quote, "\\" + quote)  # (only a value holding both quote kinds needs this)
    quoted = f"{match['key']}={quote}{escaped}{quote}"
    return quoted if _parses(parser, quoted) else arg


def _parses(parser: OverridesParser, override: str) -> bool:
    try:
        parser.parse_override(override)
    except HydraException:  # parse_override raises the grammar error as a plain HydraException
        return False
    return True
