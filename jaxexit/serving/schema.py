"""The service's contract: every request and response body as a pydantic model, built for one
service (its task's inputs and labels, its layers, the policies it can run, whether it has a
calibration table), and the statuses and error body of every endpoint (`Contract`).

The schema says exactly what the service takes, so that a client generated from it, or an API
fuzzer, can reach every request path: a single-sentence task takes `texts`, a pair task `pairs`;
`PUT /v1/policy` takes one of the objects `_PolicyBodies` lists (`anyOf`): per policy the model
runs, its parameters, a target saving or a risk target (parameters given are held; a risk target
leaves one open), with the policy written as a name (`pcee`, `confidence` and `ensemble` beside
it) or as the label `GET /v1/policy` shows (`pcee[maxprob]+ensemble`). What no schema can say,
whether the calibration table reaches a target saving or holds a setting with the values given,
is a 409. The app parses the bodies itself (its messages, its streamed size limit), so
`Contract.openapi` adds the request bodies to FastAPI's document.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, create_model

from jaxexit.exits import offline, policies, registry, risk

Text = Annotated[str, StringConstraints(min_length=1)]
Level = Annotated[float, Field(gt=0, lt=1)]

ERROR_STATUSES = {
    401: "the endpoint changes the service and the admin token is missing (`Authorization: Bearer <token>`)",
    403: "the admin token is wrong",
    409: "the service's state cannot meet the request: a target saving beyond what the calibration table "
         "reaches, or (re-calibration) no risk target active, a drop risk, too few shadowed inputs",
    413: "more inputs than --max-inputs, or a body over --max-body-bytes",
    415: "a Content-Type other than JSON",
    422: "the body is not JSON, or not what the schema says (the error names the field)",
    503: "the model could not run the request's batch, or the service is shutting down",
}


def _absent(**kwargs) -> Any:
    """A field that is left out of the answer when it does not apply (no default in the schema)."""
    return Field(default=None, json_schema_extra=lambda s: s.pop("default", None), **kwargs)


class ErrorBody(BaseModel):
    """Every refusal: 4xx (or 503) with what is wrong."""
    model_config = ConfigDict(extra="forbid")
    error: str = Field(description="what is wrong, naming the field, flag or limit")


class Calibration(BaseModel):
    """The active setting's row on the calibration split."""
    model_config = ConfigDict(extra="forbid")
    saving: float
    score: float
    drop: float = Field(description="full model's score minus this setting's")


class RiskTargetOut(BaseModel):
    """What a certified policy was asked for."""
    model_config = ConfigDict(extra="forbid")
    policy: str
    max_risk: Level
    risk_delta: Level
    risk: Literal[risk.RISKS]
    risk_bound: Literal[risk.BOUNDS]
    risk_tolerance: Optional[float]
    fixed: dict[str, float] = Field(description="parameters held")


class CertificateOut(BaseModel):
    """Learn then Test's certificate (`certified` false: the full model serves, `reason` says why)."""
    model_config = ConfigDict(extra="forbid")
    policy: str
    params: dict[str, float]
    certified: bool
    risk: Literal[risk.RISKS]
    max_risk: Level
    risk_delta: Level
    n: int = Field(ge=0, description="calibration inputs")
    bound: float = Field(ge=0, le=1, description="upper confidence bound on the risk")
    method: Literal[risk.BOUNDS]
    empirical_risk: float = Field(ge=0, le=1)
    saving: float = Field(ge=0, le=1)
    tested: int = Field(ge=0)
    rejected: int = Field(ge=0)
    sequences: int = Field(ge=1)
    tolerance: Optional[float]
    reason: str = _absent()
    calibrated_on: str


class ShadowOut(BaseModel):
    """The shadow buffer."""
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(ge=0, le=1)
    capacity: int = Field(ge=1)
    inputs: int = Field(ge=0)
    realised_consistency_risk: Optional[float] = Field(ge=0, le=1)


class TableOut(BaseModel):
    """The calibration table: its split and, per policy, the largest target saving it meets."""
    model_config = ConfigDict(extra="forbid")
    split: str
    inputs: int = Field(ge=1)
    metric: str
    full_score: float
    max_saving: dict[str, float]


class ControllerOut(BaseModel):
    """The latency controller (--latency-slo-ms)."""
    model_config = ConfigDict(extra="forbid")
    latency_slo_ms: float
    min_saving: float
    max_saving: float
    step: float
    interval_s: float
    window_s: float
    changes: int = Field(ge=0)


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ok"]
    model: str
    task: str
    num_layers: int = Field(ge=1)
    policy: str
    uptime_s: float = Field(ge=0)


def _param_type(p: registry.Param, num_layers: int) -> Any:
    """A policy parameter's JSON type and range, as `policies.make_policy` checks it."""
    high = num_layers if p.high == "L" else p.high
    if p.kind is int:
        return Annotated[int, Field(ge=p.low, le=high)] if high is not None else Annotated[int, Field(ge=p.low)]
    if high is None or high == float("inf"):
        return Annotated[float, Field(ge=p.low)]
    return Annotated[float, Field(ge=p.low, le=high)]


def _literal(values) -> Any:
    return Literal[tuple(values)]


def _model(title: str, doc: str, fields: dict) -> type[BaseModel]:
    return create_model(title, __config__=ConfigDict(extra="forbid"), __doc__=doc, **fields)


def _camel(*words: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in words if w)


class _PolicyBodies:
    """The objects `PUT /v1/policy` takes (see the module docstring), for a model of `num_layers`
    ramps and `num_labels` outputs, with or without a learning-to-exit module and a table."""

    def __init__(self, num_layers: int, num_labels: int, lte: bool, table: bool):
        self.L, self.C, self.lte, self.table = num_layers, num_labels, lte, table
        self.every_param = policies.PARAM_NAMES
        self.risk_keys = ("max_risk", "risk_delta", "risk", "risk_bound", "risk_tolerance")

    def confidences(self, name: str, tabled: bool) -> tuple[str, ...]:
        """The confidences policy `name` runs with on this model (tabled: through the table's grid,
        which refuses softmax policies on regression whatever their confidence)."""
        spec = registry.get(name)
        out = []
        for c in (registry.CONFIDENCES if spec.confidence else ("entropy",)):
            lte_ok = self.lte or not (spec.needs_lte or c == "learned")
            task_ok = self.C > 1 or not spec.softmax or (c == "learned" and not tabled)
            if lte_ok and task_ok:
                out.append(c)
        return tuple(out)

    def spellings(self, name: str, confidences: tuple[str, ...], default: bool) -> list[tuple[str, dict]]:
        """The ways to name `name` under `confidences`: the name with `confidence` and `ensemble`
        beside it; its label with the confidence in brackets; its label with `+ensemble`."""
        def optional(t, allow_none):
            return (Optional[t], None) if allow_none else (t, ...)
        plain = {"policy": optional(Literal[name], default),
                 "confidence": optional(_literal(confidences), "entropy" in confidences),
                 "ensemble": (Optional[bool], None)}
        bracket = {"policy": (_literal(f"{name}[{c}]" for c in confidences), ...),
                   "confidence": (Optional[Literal["entropy"]], None), "ensemble": (Optional[bool], None)}
        ensemble = ([f"{name}+ensemble"] if "entropy" in confidences else []) + [
            f"{name}[{c}]+ensemble" for c in confidences]
        joined = {"policy": (_literal(ensemble), ...), "confidence": (Optional[Literal["entropy"]], None),
                  "ensemble": (Optional[Literal[False]], None)}
        return [("", plain), ("Label", bracket), ("EnsembleLabel", joined)]

    def _rest(self, used: set[str]) -> dict:
        """Every other key of a policy body: absent or null (a null is ignored)."""
        return {k: (None, None) for k in ("target_saving", *self.risk_keys, *self.every_param) if k not in used}

    def explicit(self, name: str) -> list[type[BaseModel]]:
        spec = registry.get(name)
        params = {p: (_param_type(spec.param(p), self.L), ...) for p in policies.param_names(name, self.C)}
        out = []
        for suffix, naming in self.spellings(name, self.confidences(name, False), False):
            fields = {**naming, **params}
            out.append(_model(_camel("Explicit", name, suffix), f"{name} with its parameters given",
                              {**fields, **self._rest(set(fields))}))
        return out

    def target(self, name: str) -> list[type[BaseModel]]:
        spec = registry.get(name)
        held = {p: (Optional[_param_type(spec.param(p), self.L)], None) for p in policies.param_names(name, self.C)}
        out = []
        for suffix, naming in self.spellings(name, self.confidences(name, True), name == "pcee"):
            fields = {**naming, **held, "target_saving": (Annotated[float, Field(ge=0, lt=1)], ...)}
            out.append(_model(_camel("Target", name, suffix),
                              f"{name}: the best-scoring setting with at least target_saving saved on the calibration "
                              "split (parameters given are held: a value off the table's grid is a 409)",
                              {**fields, **self._rest(set(fields))}))
        return out

    def risk(self, name: str) -> list[type[BaseModel]]:
        spec = registry.get(name)
        names = policies.param_names(name, self.C)
        tolerance = (Annotated[float, Field(ge=0)], ...) if self.C == 1 else (None, None)
        target = {"max_risk": (Level, ...), "risk_delta": (Optional[Level], None),
                  "risk": (Optional[_literal(risk.RISKS)], None), "risk_bound": (Optional[_literal(risk.BOUNDS)], None),
                  "risk_tolerance": tolerance}
        out = []
        for open_param in names:  # at least one parameter is left to calibrate
            held = {p: (None, None) if p == open_param else (Optional[_param_type(spec.param(p), self.L)], None)
                    for p in names}
            for suffix, naming in self.spellings(name, self.confidences(name, True), name == "pcee"):
                fields = {**naming, **held, **target}
                title = _camel("Risk", name, *(("open", open_param) if len(names) > 1 else ()), suffix)
                out.append(_model(title, f"{name}: the setting with the largest saving whose risk is certified "
                                         "at most max_risk (Learn then Test), parameters given held",
                                  {**fields, **self._rest(set(fields))}))
        return out

    def all(self) -> list[type[BaseModel]]:
        out = []
        for name in registry.REGISTRY:
            if self.confidences(name, False):
                out += self.explicit(name)
            if self.table and self.confidences(name, True):
                out += self.target(name) + self.risk(name)
        return out


def _policy_examples(num_layers: int, num_labels: int, table: bool) -> list[dict]:
    """A body of each form for the first policy that applies (pcee on classification)."""
    name = offline.applicable(num_labels)[0] if "pcee" not in offline.applicable(num_labels) else "pcee"
    spec = registry.get(name)
    explicit = {"policy": name}
    for p in policies.param_names(name, num_labels):
        param = spec.param(p)
        high = num_layers if param.high == "L" else param.high
        explicit[p] = param.low if param.kind is int else (
            0.5 if high is None or high == float("inf") else (param.low + high) / 2)
    out = [explicit]
    if table:
        tolerance = {"risk_tolerance": 0.5} if num_labels == 1 else {}
        out += [{"policy": name, "target_saving": 0.25}, {"policy": name, "max_risk": 0.1, **tolerance}]
    return out


@dataclasses.dataclass
class Contract:
    """One service's bodies: `requests` by (path, method) and `responses` (FastAPI's `responses`)."""

    requests: dict[tuple[str, str], tuple[str, Any, str, list]]  # (title, type, description, examples)
    classify_answer: type[BaseModel]
    policy_state: type[BaseModel]
    policy_answer: type[BaseModel]

    def responses(self, ok: type[BaseModel] | None, *statuses: int, text: bool = False) -> dict:
        out: dict = {}
        if text:
            out[200] = {"description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}
        elif ok is not None:
            out[200] = {"model": ok, "description": ok.__doc__ or "OK"}
        for status in statuses:
            out[status] = {"model": ErrorBody, "description": ERROR_STATUSES[status]}
        return out

    def openapi(self, doc: dict) -> dict:
        """FastAPI's document with the request bodies added (they are parsed by the app)."""
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for (path, method), (title, body_type, description, examples) in self.requests.items():
            schema = TypeAdapter(body_type).json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[title] = {**schema, "title": title, "description": description, "examples": examples}
            doc["paths"][path][method]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{title}"}}}}
        return doc


def build(service) -> Contract:
    """The contract of `service` (a `serving.Service`)."""
    model, task = service.model, service.task
    L, C = model.num_layers, model.config.num_labels
    many = {"min_length": 1, "max_length": service.max_inputs}
    if task.is_pair:
        inputs = {"pairs": (Annotated[list[tuple[Text, Text]], Field(**many, description=(
            "sentence pairs [a, b], neither empty"))], ...)}
    else:
        inputs = {"texts": (Annotated[list[Text], Field(**many, description="sentences, none empty")], ...)}
    request = _model("Classify", f"{task.tsv_dir}: what to classify ({'pairs' if task.is_pair else 'texts'})",
                     inputs)

    common = {"exit_layer": (Annotated[int, Field(ge=1, le=L)], ...),
              "truncated": (bool, Field(description="the input had more tokens than the model takes and was cut"))}
    if task.is_regression:
        result = _model("Result", "one input's answer", {"score": (float, ...), **common})
    else:
        result = _model("Result", "one input's answer", {
            "label": (_literal(task.label_names), ...), "label_id": (Annotated[int, Field(ge=0, le=C - 1)], ...),
            "probabilities": (Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=C, max_length=C)],
                              ...), **common})
    params = {}
    for name in policies.PARAM_NAMES:
        p = next(s.param(name) for s in registry.REGISTRY.values() if s.param(name) is not None)
        params[name] = (_param_type(p, L), _absent())
    active = _model("ActivePolicy", "the policy answering requests: its label and parameters, the target it "
                    "came from (saving or risk), its calibration row or certificate", {
                        "policy": (str, ...), **params, "target_saving": (Optional[float], ...),
                        "fixed": (dict[str, float], _absent(description="parameters held")),
                        "calibration": (Calibration, _absent()), "risk_target": (RiskTargetOut, _absent()),
                        "certificate": (CertificateOut, _absent())})
    answer = _model("ClassifyAnswer", "per input, the answer and its exit layer; the policy that decided", {
        "results": (Annotated[list[result], Field(**many)], ...), "policy": (active, ...),
        "num_layers": (Literal[L], ...)})
    state = _model("PolicyState", "the active policy, the policies this model runs, the realised saving, the "
                   "shadow buffer; the calibration table and the controller when there are", {
                       "active": (active, ...), "task": (str, ...), "num_layers": (Literal[L], ...),
                       "policies": (list[str], ...), "realised_saving": (Optional[float], ...),
                       "shadow": (ShadowOut, ...), "table": (TableOut, _absent()),
                       "controller": (ControllerOut, _absent())})
    changed = _model("PolicyChanged", "the policy now active", {"active": (active, ...)})
    variants = _PolicyBodies(L, C, bool(model.config.lte), service.table is not None).all()
    examples = ([{"pairs": [["A man is playing a guitar.", "Someone plays music."]]}] if task.is_pair else
                [{"texts": ["a gripping, moving film", "the plot was dull"]}])
    return Contract(
        requests={("/v1/classify", "post"): ("ClassifyRequest", request, request.__doc__, examples),
                  ("/v1/policy", "put"): ("PolicyChange", Union[tuple(variants)], (
                      "a policy with its parameters, a target_saving or a max_risk (one object of these; "
                      "null values are ignored)"), _policy_examples(L, C, service.table is not None))},
        classify_answer=answer, policy_state=state, policy_answer=changed)
