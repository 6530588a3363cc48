"""argparse flags generated from the settings dataclasses: one flag per field, grouped, typed by the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from typing import Any


log = logging.getLogger("duoclass")


# --- train flags generated from TrainConfig -------------------------------------------------
def add_config_flags(p: argparse.ArgumentParser, cls: type | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a settings dataclass (TrainConfig by default), except the fields in `skip`.

    Fields that name a `group` in their metadata go into an argument group of that title
    (config.GROUPS gives the order and descriptions), so `--help` reads by topic. Each value
    is converted by config.convert, so a bad one gets the same message as in a YAML file or
    through the Python API.
    """
    from duoclass.settings.config import GROUPS, TrainConfig, convert, field_type

    cls = cls or TrainConfig
    groups: dict[str, Any] = {}
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    for title in GROUPS:  # in GROUPS order, only those the class uses
        if any(f.metadata.get("group") == title for f in fields):
            groups[title] = p.add_argument_group(title, GROUPS[title])
    for f in fields:
        target = groups.get(f.metadata.get("group", ""), p)
        help_ = f.metadata.get("help", "")
        to_type = functools.partial(convert, f.name, cls=cls)
        if f.metadata.get("positional"):
            target.add_argument(f.name, nargs="?", type=to_type, default=argparse.SUPPRESS, help=help_)
            continue
        base, optional, choices = field_type(f.name, cls)
        flag = "--" + f.name.replace("_", "-")
        default = f"(default: {f.default})"
        if base is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_} {default}")
        else:
            target.add_argument(flag, type=to_type, choices=choices or None, default=argparse.SUPPRESS,
                                metavar=None if choices else f.name.upper(), help=f"{help_} {default}")
