"""The console's pages: Jinja2 templates (escaped by default) rendered to strings."""

from __future__ import annotations

import datetime as dt
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

NONE = "\N{EN DASH}"  # shown where nothing is recorded

_env = Environment(
    loader=PackageLoader("mlpipe_console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _seconds(value: float | None) -> str:
    if value is None:
        return NONE
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _when(value: dt.datetime | str | None) -> str:
    if not value:
        return NONE
    if isinstance(value, str):
        return value.replace("T", " ")[:19]
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: Any) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_env.filters["seconds"] = _seconds
_env.filters["when"] = _when
_env.filters["number"] = _number


def render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)
