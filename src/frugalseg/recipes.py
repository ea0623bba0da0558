"""Recipes: named chains of stages in ``configs/recipes/<name>.yaml``.

A recipe holds zero or more pre-training stages (unlabelled data only, each initialised from the previous one)
followed by exactly one training stage that starts from the last pre-trained weights::

    description: one line
    stages:
      - method: byol              # pre-training: every training image, no labels
        set: {train: {steps: 1000}} # optional config overrides for this stage
      - method: supervised        # the last stage trains with the N labelled volumes
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
    from frugalseg.registry import METHODS, method_kind

    for i, st in enumerate(parsed):
        if st.method not in METHODS:
            raise UserError(f"{path}: stage {i + 1}: unknown method {st.method!r} (choose from {', '.join(METHODS)})")
        want = "train" if i == len(parsed) - 1 else "pretrain"
        if method_kind(st.method) != want:
            where = "the last stage must be a training method" if want == "train" else (
                "only the last stage may train with labels; earlier stages must be pre-training methods")
            raise UserError(f"{path}: stage {i + 1} ({st.method}): {where}")
    return Recipe(name, str(data.get("description", "")), parsed[:-1], parsed[-1])


def stage_key(stages: list[Stage], sets: list[str]) -> str:
    """A folder name for the pre-training chain ``stages`` under ``--set`` values ``sets``.

    Equal chains get equal keys, so recipes that share a prefix (``gcl-gd`` and ``gcl-gd+lcl-lr``) share its
    pre-trained weights.
    """
    import hashlib
    import json

    text = json.dumps([[st.method, st.overrides] for st in stages] + [sorted(sets)], sort_keys=True)
    return "+".join(st.method for st in stages) + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
