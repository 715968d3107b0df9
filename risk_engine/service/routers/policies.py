"""Policies: versions, drafts (checked), diffs, publish and roll back; and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from risk_engine.dsl.parser import parse_duration
from risk_engine.errors import NotFound
from risk_engine.jobs import Jobs
from risk_engine.payments import Text
from risk_engine.policies import PolicyWorkflow
from risk_engine.service.deps import Analyst, EngineDep
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import (
    ERRORS,
    MAX_ROW_ID,
    MAX_VERSION,
    IdPath,
    JobIdPath,
    VersionPath,
    as_json_errors,
    errors,
)

router = APIRouter(tags=["policies"])


class DraftIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text = Field(min_length=1, max_length=200_000, description="The policy in the rules language")


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_version: int = Field(ge=1, le=MAX_VERSION)


class BacktestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: str = Field(default="30d", description="How far back from the latest stored event, e.g. 30d, 12h")

    @field_validator("since")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v


class JobOut(BaseModel):
    id: str
    kind: str
    target: str = Field(description="What it works on, e.g. payment:v2 since 30d")
    state: str = Field(description="running, done, failed or cancelled")
    processed: int
    started_by: str = Field(description="Who started it: key:ID")
    started_at: float
    finished_at: float | None
    result: dict[str, Any] | None
    error: str | None


class PolicyVersionOut(BaseModel):
    subject: str
    version: int
    label: str
    status: str
    digest: str
    source: str
    created_by: str
    created_at: str
    text: str | None = None


NO_SUBJECT = "No such subject"
NO_VERSION = "No such subject, or no such version of its policy"
NO_SHADOW = "No such subject, or none of its policies is in shadow"
NO_JOB = "No job with that id"


@router.get("/v1/policies/{subject}", response_model=list[PolicyVersionOut], responses=errors(not_found=NO_SUBJECT))
def list_versions(subject: str, engine: EngineDep, _: Analyst) -> JsonResponse:
    """Every version of the subject's policy, newest first, with its status."""
    return JsonResponse(PolicyWorkflow(engine).versions(subject))


@router.get(
    "/v1/policies/{subject}/versions/{version}", response_model=PolicyVersionOut, responses=errors(not_found=NO_VERSION)
)
def get_version(subject: str, version: VersionPath, engine: EngineDep, _: Analyst) -> JsonResponse:
    """One version with its text."""
    return JsonResponse(PolicyWorkflow(engine).version(subject, version))


class ReplayedReasonOut(BaseModel):
    rule: str
    code: str
    text: str
    decision: str | None = Field(description="The decision the rule forces, if any")
    score_delta: float


class LiveDecisionOut(BaseModel):
    policy_version: str
    decision: str
    score: int
    rule_codes: list[str] = Field(description="Reason codes of the rules that fired live")


class EvaluationOut(BaseModel):
    subject: str
    event_id: str
    label: str | None = Field(description="fraud, legitimate, or null when no label has come")
    version: str
    decision: str
    score: int
    reasons: list[ReplayedReasonOut]
    model_points: float = Field(description="What the detectors added live (stored with the decision)")
    rebuilt_aggregates: list[str] = Field(
        description="Aggregates this version names that live did not keep: rebuilt from the stored events before it"
    )
    live: LiveDecisionOut


@router.get(
    "/v1/policies/{subject}/versions/{version}/evaluate/{event_id}",
    response_model=EvaluationOut,
    responses=errors(not_found="No such subject, version of its policy, or stored event of that subject"),
)
def evaluate_version(
    subject: str, version: VersionPath, event_id: IdPath, engine: EngineDep, _: Analyst
) -> JsonResponse:
    """What this version would have decided on one stored event, with the windows that event saw, beside the
    live decision: to see why a draft would catch (or let through) a payment that is known to be fraud."""
    return JsonResponse(PolicyWorkflow(engine).evaluate_version(subject, version, event_id))


@router.get(
    "/v1/policies/{subject}/diff",
    response_class=PlainTextResponse,
    responses=as_json_errors(errors(not_found=NO_VERSION)),
)
def diff_versions(
    subject: str,
    engine: EngineDep,
    _: Analyst,
    old: Annotated[int, Query(alias="from", ge=1, le=MAX_VERSION)],
    new: Annotated[int, Query(alias="to", ge=1, le=MAX_VERSION)],
) -> PlainTextResponse:
    """Unified diff between two versions."""
    return PlainTextResponse(PolicyWorkflow(engine).diff(subject, old, new))


@router.post(
    "/v1/policies/{subject}/drafts",
    response_model=PolicyVersionOut,
    status_code=201,
    responses=errors(not_found=NO_SUBJECT),
)
def create_draft(subject: str, draft: DraftIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Check and store a draft: a 422 lists every error with line:column. The same text again answers 200."""
    view, created = PolicyWorkflow(engine).create_draft(subject, draft.text, f"key:{who.key_id}")
    return JsonResponse(view, status_code=201 if created else 200)


@router.post(
    "/v1/policies/{subject}/versions/{version}/publish",
    response_model=PolicyVersionOut,
    responses=errors(not_found=NO_VERSION),
)
def publish(subject: str, version: VersionPath, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Make a version live in every worker (checked again first). Publishing the live version is a no-op."""
    return JsonResponse(PolicyWorkflow(engine).publish(subject, version, f"key:{who.key_id}"))


@router.post(
    "/v1/policies/{subject}/rollback",
    response_model=PolicyVersionOut,
    responses=errors(not_found=NO_VERSION, conflict="That version was never live: publish it instead"),
)
def rollback(subject: str, body: RollbackIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Make an earlier version live again."""
    return JsonResponse(PolicyWorkflow(engine).rollback(subject, body.to_version, f"key:{who.key_id}"))


@router.post(
    "/v1/policies/{subject}/versions/{version}/shadow",
    response_model=PolicyVersionOut,
    responses=errors(not_found=NO_VERSION, conflict="That version is the published one: shadow a draft"),
)
def start_shadow(subject: str, version: VersionPath, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Score live events with this version too, recording (never acting on) its decisions."""
    return JsonResponse(PolicyWorkflow(engine).start_shadow(subject, version, f"key:{who.key_id}"))


@router.get("/v1/policies/{subject}/shadow", responses=errors(not_found=NO_SHADOW))
def shadow_report(subject: str, engine: EngineDep, _: Analyst) -> JsonResponse:
    """The shadow version's disagreement with live decisions so far, and its rule hits."""
    return JsonResponse(PolicyWorkflow(engine).shadow_report(subject))


@router.delete("/v1/policies/{subject}/shadow", response_model=PolicyVersionOut, responses=errors(not_found=NO_SHADOW))
def stop_shadow(subject: str, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Stop the shadow; its version becomes a draft again."""
    return JsonResponse(PolicyWorkflow(engine).stop_shadow(subject, f"key:{who.key_id}"))


@router.post(
    "/v1/policies/{subject}/drafts/{version}/backtest",
    response_model=JobOut,
    status_code=202,
    responses=errors(not_found=NO_VERSION),
)
def start_backtest(
    subject: str, version: VersionPath, body: BacktestIn, request: Request, engine: EngineDep, who: Analyst
) -> JsonResponse:
    """Replay stored events through this version and the published one, in the background; poll the job."""
    workflow = PolicyWorkflow(engine)
    workflow.version(subject, version)  # 404 now rather than a failed job later
    since_s = parse_duration(body.since)
    jobs: Jobs = request.app.state.jobs
    job = jobs.start(
        "backtest",
        lambda j: workflow.backtest_version(subject, version, since_s, j),
        f"{subject}:v{version} since {body.since}",
        f"key:{who.key_id}",
    )
    return JsonResponse(job, status_code=202)


@router.get("/v1/jobs", response_model=list[JobOut], responses=ERRORS)
def list_jobs(request: Request, _: Analyst) -> JsonResponse:
    """The recent background jobs of every worker (the last 100), newest first, without their reports: a
    job's report is at ``GET /v1/jobs/{id}``."""
    jobs: Jobs = request.app.state.jobs
    return JsonResponse(jobs.recent())


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors(not_found=NO_JOB))
def get_job(job_id: JobIdPath, request: Request, _: Analyst) -> JsonResponse:
    """A background job's state, progress (events processed) and, once done, its report."""
    jobs: Jobs = request.app.state.jobs
    job = jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return JsonResponse(job)


@router.delete("/v1/jobs/{job_id}", response_model=JobOut, status_code=202, responses=errors(not_found=NO_JOB))
def cancel_job(job_id: JobIdPath, request: Request, _: Analyst) -> JsonResponse:
    """Ask a running job to stop, whichever worker runs it; it ends in the cancelled state."""
    jobs: Jobs = request.app.state.jobs
    job = jobs.cancel(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return JsonResponse(job, status_code=202)


@router.get("/v1/policies/{subject}/rules/stats", responses=errors(not_found=NO_SUBJECT))
def rule_statistics(
    subject: str, engine: EngineDep, _: Analyst, days: Annotated[int, Query(ge=1, le=90)] = 30
) -> JsonResponse:
    """Per rule of the live policy: hits in the last hour, day and N days, and the share of its labelled hits
    that were fraud (counted back from the latest stored event)."""
    return JsonResponse(PolicyWorkflow(engine).rule_statistics(subject, days))


NO_NUL = r"^[^\x00]*$"  # PostgreSQL's text cannot hold NUL: refused here, not a 500 in the query


@router.get("/v1/audit", responses=ERRORS)
def audit(
    engine: EngineDep,
    _: Analyst,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    action: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=r"^[a-z_.]+$", description="policy.publish; list. for every list.*"),
    ] = None,
    target: Annotated[
        str | None, Query(min_length=1, max_length=256, pattern=NO_NUL, description="e.g. list:blocked_devices")
    ] = None,
    actor: Annotated[
        str | None, Query(min_length=1, max_length=128, pattern=NO_NUL, description="e.g. key:1f2e3d4c5b6a, cli")
    ] = None,
) -> JsonResponse:
    """The append-only audit log, newest first: who, when, what, before and after; filtered by action (a
    prefix ending in ``.`` takes a family), target and actor. Page with ``before_id`` (the last id seen)."""
    return JsonResponse(PolicyWorkflow(engine).audit(limit, before_id, action=action, target=target, actor=actor))
