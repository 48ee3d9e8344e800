"""The feedback API: ``POST /feedback`` (a confirmed label for a prediction id) and
``GET /feedback/stats``.

The id is the ``X-Prediction-Id`` header of a ``/predictions`` answer. A feedback answer is
sent only after the label is committed to the store; sending another label for the same id
later replaces it (the latest wins, earlier ones stay as history). Errors are the API's
usual ``{"code", "type", "message"}``: 404 unknown id, 400 a label that is not a class of the
model version that answered (unless ``allow_new_class``), 503 store unavailable.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from serving.errors import ServingError
from serving.feedback import MAX_LABEL_CHARS, FeedbackStore

router = APIRouter()


class FeedbackOff(ServingError):
    """The server runs without a feedback store."""

    status = 404
    type = "FeedbackDisabled"


class FeedbackRequest(BaseModel):
    """The body of ``POST /feedback``."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=64,
                               description="the X-Prediction-Id header of the answer")
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS,
                       description="the dish the person confirmed")
    allow_new_class: bool = Field(False, description="accept a label that is not one of the "
                                                     "model's classes")
    source: str | None = Field(None, max_length=200,
                               description="who confirmed it (an app name), kept with the label")


async def get_feedback(request: Request) -> FeedbackStore:
    """The server's feedback store, or FeedbackOff."""
    store = getattr(request.app.state.dataplane, "feedback", None)
    if store is None:
        raise FeedbackOff("feedback is off on this server: start it with --feedback-db URL "
                          "(e.g. sqlite:///feedback.db)")
    return store


FeedbackDep = Annotated[FeedbackStore, Depends(get_feedback)]


def recorded_source(request: Request, source: str | None) -> str:
    """The source kept with a label: the client's address, after the app name it sent
    (``app@address``), so a retrain can cap what one client contributes."""
    address = request.client.host if request.client else "unknown"
    return f"{source[:150]}@{address}" if source else address


@router.post("/feedback")
async def post_feedback(request: Request, body: FeedbackRequest, store: FeedbackDep) -> dict:
    """Attach the confirmed label; answers after the commit (a 200 survives kill -9)."""
    result = await run_in_threadpool(store.add_feedback, body.prediction_id, body.label,
                                     allow_new_class=body.allow_new_class,
                                     source=recorded_source(request, body.source))
    return result.to_dict()


@router.get("/feedback/stats")
async def feedback_stats(store: FeedbackDep, model: str | None = None) -> dict:
    """Logged predictions, confirmed labels and agreement with the served top-1, per version."""
    return await run_in_threadpool(store.stats, model)
