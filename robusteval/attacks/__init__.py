"""Adversarial attacks: the catalog of attacks, deployed defenses, the engine and its sanity checks."""

from robusteval.attacks.catalog import ATTACKS, AttackSpec, resolve_attack
from robusteval.attacks.engine import AttackJob
from robusteval.attacks.evaluate import evaluate_attack, prepare_attack
from robusteval.attacks.results import AttackResult
from robusteval.attacks.settings import AttackSettings, ResolvedAttackSettings
from robusteval.attacks.verification import verify_adversarial

__all__ = [
    "ATTACKS",
    "AttackJob",
    "AttackResult",
    "AttackSettings",
    "AttackSpec",
    "ResolvedAttackSettings",
    "evaluate_attack",
    "prepare_attack",
    "resolve_attack",
    "verify_adversarial",
]
