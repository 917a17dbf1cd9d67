"""What the HTTP API accepts and answers: the request schemas (they make the OpenAPI spec), the error
shape, and the spec as the server behaves (`openapi`).

Every schema is strict (1.0 is not an integer, 0 is not a boolean; an integral float counts as an
integer, as in JSON Schema) and refuses a lone surrogate in any string. Bounds lie within
SamplingParams' own: a body that validates makes valid parameters.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling import GREEDY_BELOW, REPETITION_PENALTY_RANGE
from ..tokenizer import check_unicode


# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers, OpenAI's shape."""

    error: ErrorDetail


# what each kind of route can answer besides 200, documented in the spec (validation errors are 400, as
# OpenAI answers them, not FastAPI's 422)
_ERRORS = {
    "generation": {400: "invalid request (schema, values, context length, tokenizer)", 401: "missing, unknown or revoked API key",
                   404: "unknown model, or one the key may not use", 408: "the request body did not arrive in time",
                   413: "request body over the server's limit",
                   429: "a limit of the key (Retry-After), or its budget (x-should-retry: false)",
                   500: "the engine failed on this request", 503: "overloaded (Retry-After)"},
    "keyed": {401: "missing, unknown or revoked API key", 404: "unknown model, or one the key may not use"},
    "health": {503: "the engine thread is not running"},
    "admin": {400: "invalid request, or a key prefix shared by several keys", 401: "no admin credential, or a revoked one",
              403: "a tenant's key, or no admin credential configured", 404: "no key with that id or prefix"},
}


def openapi(app) -> dict:
    """The spec as the server behaves: 400 (not 422) with the error schema, and every error status a route
    can answer, so a client generator or a conformance checker sees what really comes back."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = spec.setdefault("components", {}).setdefault("schemas", {})
    err = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    comps.update(err.pop("$defs", {}))
    comps["ErrorResponse"] = err
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            kind = ("admin" if path.startswith("/admin/") else "generation" if method == "post" else
                    "keyed" if path.startswith("/v1/") else
                    "health" if path == "/health" else None)
            for status, what in _ERRORS.get(kind, {}).items():
                responses.setdefault(str(status), {"description": what, "content": content})
            if path in ("/v1/completions", "/v1/chat/completions"):  # "stream": true answers server-sent events
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"description": "data: {chunk JSON} events, then data: [DONE]"}}
    app.openapi_schema = spec
    return spec


# ---- request schemas (they make the OpenAPI spec) ---------------------------------------------------
def _no_surrogates(v, where: str = ""):
    """Every string of a request, however nested: a lone surrogate ("\\ud800") is valid JSON but not
    text; left in, it fails later (tokenizer, UTF-8 output) as a 500 instead of this 400."""
    if isinstance(v, str):
        check_unicode(v, where)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _no_surrogates(x, where)
    elif isinstance(v, dict):
        for k, x in v.items():
            _no_surrogates(k, " of a key")
            _no_surrogates(x, where)
    return v


def _integral(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


class _Body(BaseModel):
    """Base of every request schema: strings must be valid Unicode, and types are strict (1.0 is not an
    integer, 0 is not a boolean: the spec says what is accepted, and nothing else is)."""

    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, v, info):
        # JSON Schema counts 1.0 as an integer; strict pydantic does not: integral floats become ints in
        # fields with integers and no floats (prompt token ids included)
        ann = str(cls.model_fields[info.field_name].annotation)
        return _integral(v) if "int" in ann and "float" not in ann else v

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v):
        return _no_surrogates(v)


NonEmpty = Annotated[str, Field(min_length=1)]
MAX_SEED = 2**53 - 1  # every seed a JSON number holds exactly (larger ones round in clients that parse doubles)
# a cloze pattern: literal text, {{ and }} for braces, and at least one plain {text}, nothing else: str.format
# would otherwise run a client's format spec ("{text:a>10000000}" made 10 MB per text) or look up attributes
CLOZE_PATTERN = r"^([^{}]|\{\{|\}\}|\{text\})*\{text\}([^{}]|\{\{|\}\}|\{text\})*$"
Stops = NonEmpty | Annotated[list[NonEmpty], Field(max_length=16)] | None
REPETITION_PENALTY = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                           description="HF / CTRL repetition penalty (1 = off)")
TEMPERATURE_NOTE = f"0, or below {GREEDY_BELOW}, is greedy"


class StreamOptions(_Body):
    include_usage: bool = False


GUIDED = ("the output is constrained to match (constrained decoding: tokens that could not continue it are never "
          "drawn); at most one of response_format (json_object, json_schema), guided_json, guided_regex, "
          "guided_choice, guided_grammar and structured_outputs per request")


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` object: one of its fields."""

    json_: dict | bool | str | None = Field(None, alias="json", description="a JSON schema (an object, true, or its JSON text)")
    regex: NonEmpty | None = Field(None, description="a regular expression the whole output matches")
    choice: Annotated[list[NonEmpty], Field(min_length=1)] | None = Field(None, description="the output is one of these")
    grammar: NonEmpty | None = Field(None, description="a Lark grammar (its `start` rule)")


class _Sampling(_Body):
    """Sampling fields shared by the OpenAI endpoints (vLLM's extras top_k, min_p, repetition_penalty too)."""

    model: str | None = Field(None, description="the served model's name (default: it)")
    temperature: float = Field(1.0, ge=0, le=2, description=TEMPERATURE_NOTE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = REPETITION_PENALTY
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i uses seed + i")
    n: int = Field(1, ge=1, le=16)
    stop: Stops = Field(None, description="up to 16 non-empty stop strings, cut from the text")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: must be empty")
    user: str | None = None
    # vLLM's request fields for constrained decoding (glmkit.constrain); JSON comes out as json.dumps writes it
    guided_json: dict | bool | str | None = Field(None, description="a JSON schema (an object, true, or its JSON text): " + GUIDED)
    guided_regex: NonEmpty | None = Field(None, description="a regular expression the whole output matches: " + GUIDED)
    guided_choice: Annotated[list[NonEmpty], Field(min_length=1)] | None = Field(
        None, description="the output is exactly one of these strings: " + GUIDED)
    guided_grammar: NonEmpty | None = Field(None, description="a Lark grammar (its `start` rule): " + GUIDED)
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's newer form of the guided_* fields, {json | regex | choice | grammar}: " + GUIDED)


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)] = Field(
        ..., description="text(s) or token ids; a text of more than context x the longest token's "
        "characters is refused before tokenizing")
    suffix: str | None = Field(None, description="fill-in-the-middle: the text after the completion")
    max_tokens: int = Field(16, ge=1, description="per choice; prompt + max_tokens must fit the context")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of the chosen and top-k tokens")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


class ContentPart(_Body):
    type: Literal["text"] = Field(..., description="only text parts are supported")
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(..., description="the arguments as JSON text (an object)")


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "observation", "tool"]
    content: str | list[ContentPart] | None = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant messages: the calls it made")
    tool_call_id: str | None = Field(None, description="tool messages: the call this is the result of")


class FunctionDef(_Body):
    """A function the model may call. Rendered into the prompt as the family's format prints it (GLM-4:
    the object as JSON, in this field order)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema (type object); none: no arguments")
    strict: bool | None = Field(None, description="forced calls: refuse schema keywords the grammar engine cannot enforce")


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the schema's name (letters, digits, _ and -, "
                      "at most 64)")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema the output validates against "
                                 "(none: any JSON value)")
    strict: bool | None = Field(False, description="true: keywords the engine cannot enforce are refused (400); "
                                "false: they are ignored")


class ResponseFormat(_Body):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"] = Field("text", description=(
        "text: free text; json_object: a JSON object; json_schema: JSON valid under json_schema.schema: " + GUIDED))
    json_schema: JSONSchemaFormat | None = Field(None, description="with type json_schema (and only then)")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default max tokens "
                                   "(`glmkit serve --default-max-tokens`), within the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="functions the model may call (GLM-4, CodeGeeX4 and ChatGLM3 chat formats)")
    tool_choice: str | NamedToolChoice | None = Field(
        None, description="'none': tools are not shown to the model; 'auto' (the default with tools); 'required' or a "
        "named function: the reply is forced, by constrained decoding, to be a call whose arguments match the schema")
    parallel_tool_calls: bool = Field(True, description="false: at most one call per reply (the first)")
    response_format: ResponseFormat | None = None


class FillBlank(_Body):
    """A typed blank: what its span may be (at most one of choices, regex, json_schema) and its own limits."""

    choices: Annotated[list[NonEmpty], Field(min_length=1, max_length=1024)] | None = Field(
        None, description="the span is exactly one of these strings")
    regex: NonEmpty | None = Field(None, description="the span fullmatches this regular expression (the grammar "
                                   "engine's syntax, Rust's regex: \\d is any Unicode digit, write [0-9] for ASCII ones)")
    json_schema: dict | bool | None = Field(None, description="the span is JSON (compact, as json.dumps writes it) "
                                            "valid against this schema")
    max_tokens: int | None = Field(None, ge=1, description="this blank's limit (default: the request's max_tokens)")
    stop: Stops = Field(None, description="this blank's stop strings (default: the request's stop)")

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [f for f in ("choices", "regex", "json_schema") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of choices, regex, json_schema per blank (got {', '.join(given)})")
        return self


class FillRequest(_Body):
    model: str | None = None
    text: str = Field(..., pattern=r"\[(MASK|sMASK|gMASK)\]", description="text with one or more [MASK], [sMASK] or [gMASK] blanks")
    blanks: list[FillBlank] | None = Field(
        None, description="typed blanks: one per mask, in order (fewer: the rest untyped); the text around the "
        "blanks is never generated, so a constrained form keeps its shape")
    max_tokens: int = Field(32, ge=1, description="per blank")
    temperature: float = Field(0.0, ge=0, le=2, description="default greedy, as `glmkit fill`; " + TEMPERATURE_NOTE)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="blank j samples with seed + j")
    stop: Stops = None


class InfillRequest(_Body):
    """llama.cpp's /infill (defaults as llama.cpp's server)."""

    model: str | None = None
    input_prefix: str = ""
    input_suffix: str = ""
    n_predict: int = Field(-1, ge=-1, description="-1: the server's default max tokens, within the context")
    temperature: float = Field(0.8, ge=0, le=2, description=TEMPERATURE_NOTE)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = REPETITION_PENALTY
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    stop: Annotated[list[NonEmpty], Field(max_length=16)] = Field(default_factory=list)
    stream: Literal[False] = Field(False, description="not supported on /infill (use /v1/completions with suffix and stream)")

    @field_validator("stream", mode="before")
    @classmethod
    def _false_only(cls, v):
        if v is not False:  # Literal[False] would take 0
            raise ValueError("stream is not supported on /infill; use /v1/completions with suffix and stream")
        return v


class ClassifyRequest(_Body):
    model: str | None = None
    text: str | Annotated[list[str], Field(min_length=1, max_length=64)] = Field(..., description="one text or a list (at most 64)")
    pattern: str = Field("{text}[MASK]", pattern=CLOZE_PATTERN, description="the cloze: each plain {text} is replaced by the text (no "
                         "other fields, format specs or conversions; {{ and }} are literal braces), [MASK] is the blank")
    labels: dict[str, NonEmpty] = Field(
        ..., min_length=2, max_length=32, description="2 to 32 labels, label -> verbalizer, the text that fills the blank")
    score: Literal["sum", "mean"] = Field("sum", description="sum or per-token mean of the blank's log-probability")


# what a failed regex of the schema means, in words (pydantic's message quotes the regex)
PATTERN_ERRORS = {
    "pattern": "the cloze pattern must contain a plain {text} field and no other fields, format specs or conversions "
               "(write literal braces as {{ and }})",
    "text": "no [MASK], [sMASK] or [gMASK] in text: mark each blank to fill",
}
