"""Recipes: named chains of stages in ``configs/recipes/<name>.yaml``.

A recipe holds zero or more pre-training stages (unlabelled data only, each initialised from the previous one)
followed by exactly one training stage that starts from the last pre-trained weights::

    description: one line
    stages:
      - method: supervised        # the last stage trains with the N labelled volumes
        set: {train: {steps: 500}} # optional config overrides for this stage
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugalseg.config import configs_dir, read_yaml
from frugalseg.errors import UserError


@dataclass
class Stage:
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    description: str
    pretrain: list[Stage]
    train: Stage


def recipes_dir() -> Path:
    return configs_dir() / "recipes"


def available() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--recipes: unknown recipe {name!r} (available: {', '.join(available())})")
    data = read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{path}: 'stages' must be a non-empty list")
    parsed = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("method"), str):
            raise UserError(f"{path}: stage {i + 1} needs a 'method'")
        unknown = set(st) - {"method", "set"}
        if unknown:
            raise UserError(f"{path}: stage {i + 1} has unknown key(s) {sorted(unknown)}")
        overrides = st.get("set") or {}
        if not isinstance(overrides, dict):
            raise UserError(f"{path}: stage {i + 1} 'set' must be a mapping")
        parsed.append(Stage(st["method"], overrides))
    if len(parsed) > 1:
        # pre-training stages run with the methods of later issues through the same training loop
        raise UserError(f"{path}: pre-training stages are not supported yet by this version of frugalseg")
    return Recipe(name, str(data.get("description", "")), parsed[:-1], parsed[-1])
