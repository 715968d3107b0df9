"""The rules language: parse, type-check against a subject's schema, compile to one Python function."""

from risk_engine.dsl.ast import Decision
from risk_engine.dsl.compiler import (
    AggSpec,
    CompiledFeatures,
    CompiledPolicy,
    CompiledRule,
    Environment,
    aggregate_union,
    compile_features,
    compile_policy,
)
from risk_engine.dsl.errors import DslError, DslErrors
from risk_engine.dsl.parser import read_policy_file

__all__ = [
    "AggSpec",
    "CompiledFeatures",
    "CompiledPolicy",
    "CompiledRule",
    "Decision",
    "DslError",
    "DslErrors",
    "Environment",
    "aggregate_union",
    "compile_features",
    "compile_policy",
    "read_policy_file",
]
