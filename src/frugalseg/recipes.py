"""Recipes: named chains of stages in ``configs/recipes/<name>.yaml``.

A recipe is any sequence of stages, each initialised from the weights the previous one produced. A stage is a
method with optional config overrides; a pre-training method reads every training image without labels, a
training method the N labelled volumes (and, when it declares an unlabelled stream, every training image). The
last stage must be a training method: its model is the one evaluated::

    description: one line
    stages:
      - method: byol              # pre-training: every training image, no labels
        set: {train: {steps: 1000}} # optional config overrides for this stage
      - method: supervised        # trains with the N labelled volumes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugalseg.config import configs_dir, read_yaml
from frugalseg.errors import UserError


@dataclass
class RecipeStage:
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    description: str
    stages: list[RecipeStage]

    @property
    def final(self) -> RecipeStage:
        """The training stage whose model is evaluated."""
        return self.stages[-1]


def recipes_dir() -> Path:
    return configs_dir() / "recipes"


def available() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--recipes: unknown recipe {name!r} (available: {', '.join(available())})")
    return parse_recipe(name, read_yaml(path), path)


def parse_recipe(name: str, data: dict[str, Any], path: Path | str) -> Recipe:
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
        parsed.append(RecipeStage(st["method"], overrides))
    from frugalseg.methods.base import TRAIN
    from frugalseg.registry import METHODS, method_class

    for i, st in enumerate(parsed):
        if st.method not in METHODS:
            raise UserError(f"{path}: stage {i + 1}: unknown method {st.method!r} (choose from {', '.join(METHODS)})")
    last = parsed[-1]
    cls = method_class(last.method)
    if cls.declare(cls.Options()).kind != TRAIN:
        raise UserError(f"{path}: stage {len(parsed)} ({last.method}): the last stage must be a training method")
    return Recipe(name, str(data.get("description", "")), parsed)


def stage_key(stages: list[RecipeStage], sets: list[str]) -> str:
    """A folder name for the chain of stages ``stages`` under ``--set`` values ``sets``.

    Equal chains get equal keys, so recipes that share a prefix (``gcl-gd`` and ``gcl-gd+lcl-lr``) share its
    weights.
    """
    import hashlib
    import json

    text = json.dumps([[st.method, st.overrides] for st in stages] + [sorted(sets)], sort_keys=True)
    return "+".join(st.method for st in stages) + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
