"""Request and response bodies of the HTTP API (pydantic), shaped like TEI's and OpenAI's.

Strict types: a number is never silently read as a string, nor a bool as an int. Unknown fields are
ignored, as both reference APIs do for forward compatibility.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Texts = Union[StrictStr, list[StrictStr]]
PROMPT_NAME_DESCRIPTION = ("a prompt of the model folder's config_sentence_transformers.json, put before every "
                           "text (default: its default_prompt_name, if any)")
TASK_DESCRIPTION = ("models with task adapters (jina-embeddings-v3): the task's LoRA adapter and instruction "
                    "(default: the server's --task)")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- TEI ----------------------------------------------------------------------------------------
class EmbedRequest(_Body):
    inputs: Texts
    normalize: StrictBool = True
    truncate: Optional[StrictBool] = Field(None, description="cut over-long inputs (default: the server's --auto-truncate)")
    truncation_direction: Literal["Right", "right"] = "Right"
    task: Optional[StrictStr] = Field(None, description=TASK_DESCRIPTION)
    prompt_name: Optional[StrictStr] = Field(None, description=PROMPT_NAME_DESCRIPTION)
    dimensions: Optional[StrictInt] = Field(None, ge=1, description="keep the first N dimensions (re-normalized "
                                            "when normalize is true)")


class PredictRequest(_Body):
    inputs: Texts
    raw_scores: StrictBool = False
    truncate: Optional[StrictBool] = None
    truncation_direction: Literal["Right", "right"] = "Right"


class Prediction(BaseModel):
    label: str
    score: float


class TokenizeRequest(_Body):
    inputs: Texts
    add_special_tokens: StrictBool = True


class SimpleToken(BaseModel):
    id: int
    text: Optional[str]
    special: bool
    start: Optional[int]
    stop: Optional[int]


# ---- OpenAI -------------------------------------------------------------------------------------
class OpenAIEmbeddingRequest(_Body):
    input: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(
        description="text, texts, or token ids without special tokens (one list, or a list of lists)")
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = Field(None, ge=1, description="keep the first N dimensions, re-normalized")
    user: Optional[str] = None
    task: Optional[StrictStr] = Field(None, description=TASK_DESCRIPTION + "; token-id inputs get no instruction")
    prompt_name: Optional[StrictStr] = Field(None, description=PROMPT_NAME_DESCRIPTION + "; not for token-id inputs")


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


# ---- service ------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model_id: str
    model_type: Literal["embedding", "classifier", "reranker"]
    version: str
