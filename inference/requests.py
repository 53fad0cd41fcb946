"""The HTTP service's request models (`POST /v1/images`, `/v1/layers`): the sampling fields come from `SamplingConfig`
(types, help, limits) with this deployment's upper bounds from `serve`, so /openapi.json shows them, and every
request passes the sampling rules each edge calls (a SettingError is a 422 naming the field)."""

# No `from __future__ import annotations` here: pydantic must see the models built inside `request_models` (LoraRef,
# ElementRef) as real classes in the annotations of the models that use them.
import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator

from qwen_image_lora.image_files import OUTPUT_FORMATS
from qwen_image_lora.inference.generator import GenerationRequest
from qwen_image_lora.inference.layers import MAX_ELEMENTS
from qwen_image_lora.knobs import (
    DEFAULT_BACKGROUND_PROMPT,
    MASK_FEATHER,
    MAX_ADAPTER_WEIGHT,
    MAX_INPUT_IMAGES,
    QUALITY,
    SIZE_FIELDS,
    Bounded,
    SamplingConfig,
    limits_of,
    type_of,
)
from qwen_image_lora.serve_config import REQUEST_LIMITS, ServeConfig

MAX_PROMPT_CHARS = 20_000  # a cheap bound before the 1,024-token check with the model's tokenizer


def sampling_model(name: str, serve: ServeConfig, base, skip: tuple[str, ...] = ()):
    """A subclass of `base` with the `SamplingConfig` fields: types, help and limits from the dataclass, upper bounds
    from `serve` (this deployment's limits). All are optional here; an omitted seed is drawn at random."""

    upper = {name: getattr(serve, setting) for name, setting in REQUEST_LIMITS.items()}
    fields = {}
    for f in dataclasses.fields(SamplingConfig):
        if f.name in skip:
            continue
        limits, kind = limits_of(f), type_of(SamplingConfig, f)
        if "choices" in limits:
            kind = Literal[limits.pop("choices")]
        if f.name in upper:
            limits["le"] = min(upper[f.name], limits.get("le", upper[f.name]))
        extra = {"allow_inf_nan": False} if kind is float else {"max_length": MAX_PROMPT_CHARS} if kind is str else {}
        text = f.metadata["help"] + ("; omitted: random, returned in x-seed" if f.name == "seed" else "")
        fields[f.name] = (kind | None, Field(None, description=text, **limits, **extra))
    return create_model(name, __base__=base, **fields)


def bounded(knob: Bounded):
    """A request field for a whole-number value outside `SamplingConfig`, from its one declaration in knobs.py."""
    return Field(knob.default, ge=knob.low, le=knob.high, description=knob.help)


def _mapping_as_list(loras):
    """`{"brand": 0.8}` (a batch line's form) -> `[{"name": "brand", "weight": 0.8}]` (the API's): it was a 422."""
    if isinstance(loras, dict):
        return [{"name": name, "weight": weight} for name, weight in loras.items()]
    return loras


def request_models(serve: ServeConfig):
    """The request schema, with this deployment's limits in it (so /openapi.json shows them)."""

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)  # `true` is not 1 step, nor "64" a width

    class Sampled(Strict):
        @model_validator(mode="after")
        def _sampling_rules(self):
            GenerationRequest.from_settings(self, "").check()  # the rules every edge calls; a SettingError is a 422
            return self

    class LoraRef(Strict):
        name: str = Field(min_length=1, max_length=128, description="an adapter from serve.adapters")
        weight: float | None = Field(
            None,
            ge=-MAX_ADAPTER_WEIGHT,
            le=MAX_ADAPTER_WEIGHT,
            allow_inf_nan=False,
            description="default: the configured weight",
        )

    ImageStr = Annotated[str, Field(min_length=1, description="http(s) URL, base64, or a data: URL")]
    Loras = Annotated[Annotated[list[LoraRef], Field(max_length=16)] | None, BeforeValidator(_mapping_as_list),
                      Field(description="omitted: every configured adapter at its weight; []: the base model; a "
                                        "{name: weight} mapping too, as batch lines take")]  # fmt: skip

    class ImageRequest(sampling_model("ImageSampling", serve, Sampled)):
        """Text-to-image when `image` is absent; an edit of 1 to 10 input images otherwise."""

        prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="up to 1,024 tokens")
        image: ImageStr | Annotated[list[ImageStr], Field(min_length=1, max_length=MAX_INPUT_IMAGES)] | None = Field(
            None, description=f"the input image(s) of an edit, 1 to {MAX_INPUT_IMAGES}; omitted: text-to-image"
        )
        loras: Loras = None
        mask: ImageStr | None = Field(
            None,
            description="masked edit of the last image: white = may change, black = "
            "kept exactly (a JPEG or WebP output adds its loss); the image's size (or its aspect, resized)",
        )
        mask_feather: int = bounded(MASK_FEATHER)
        output_format: Literal[tuple(OUTPUT_FORMATS)] = Field("png", description="the image's file format")
        quality: int = bounded(QUALITY)
        response_format: Literal["bytes", "b64_json"] = Field(
            "bytes", description="bytes: the image file; b64_json: JSON with the image, its seed, size and settings"
        )

        @field_validator("image", mode="before")
        @classmethod
        def _image_count(cls, image):  # once, at `image`: pydantic named its union's branches, twice
            if isinstance(image, list) and not 1 <= len(image) <= MAX_INPUT_IMAGES:
                raise ValueError(f"give 1 to {MAX_INPUT_IMAGES} input images (got {len(image)}); omit image for "
                                 "text-to-image")  # fmt: skip
            return image

        @field_validator("mask")
        @classmethod
        def _no_auto_mask(cls, mask):
            if mask == "auto":
                raise ValueError("'auto' is for /v1/layers (the model's own cut-out); give a mask image here")
            return mask

    class ElementRef(Strict):
        """A generated element and its box, in the input image's pixels."""

        prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what the element shows")
        x: int = Field(ge=0, description="the box's left edge")
        y: int = Field(ge=0, description="the box's top edge")
        width: int = Field(ge=1, le=serve.max_side, description="the box's width")
        height: int = Field(ge=1, le=serve.max_side, description="the box's height")

    class LayersRequest(sampling_model("LayersSampling", serve, Sampled, skip=SIZE_FIELDS)):
        """Subject cut-out, background without it (a masked edit), and generated elements, as one layered file; the
        layers keep the input's size."""

        image: ImageStr
        mask: ImageStr = Field(
            description="white on the subject (URL or base64), or 'auto' for the model's own cut-out"
        )
        prompt: str | None = Field(
            None,
            max_length=MAX_PROMPT_CHARS,
            description=f"background instruction; omitted: {DEFAULT_BACKGROUND_PROMPT}",
        )
        elements: list[ElementRef] = Field(
            default_factory=list, max_length=MAX_ELEMENTS, description="generated elements, each its own layer"
        )
        loras: Loras = None
        mask_feather: int = bounded(MASK_FEATHER)
        output_format: Literal["psd", "ora", "zip"] = Field(
            "psd", description="psd (Photoshop), ora (OpenRaster: GIMP, Krita) or zip (PNG layers and layers.json)"
        )

    return ImageRequest, LayersRequest


_LIMITS = ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf")


def exact_limits(app, *models) -> None:
    """/openapi.json with the request models' limits as pydantic states them: FastAPI's OpenAPI model types every
    limit as a float, so `seed`'s 2**63 - 1 read 9.223372036854776e+18 (2**63, which the service refuses: a client
    generated from the schema sent it) and a width's 2048 and 32 read 2048.0 and 32.0."""
    built = app.openapi

    def openapi():
        if app.openapi_schema is None:
            components = built().get("components", {}).get("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, exact in {model.__name__: schema, **schema.get("$defs", {})}.items():
                    if name in components:
                        _restore_limits(components[name], exact)
        return app.openapi_schema

    app.openapi = openapi


def _restore_limits(served, exact) -> None:
    """Walk both schemas alike; where pydantic's gives a whole-number limit, the served one takes it."""
    if isinstance(served, dict) and isinstance(exact, dict):
        for key, value in exact.items():
            if key in _LIMITS and isinstance(value, int) and key in served:
                served[key] = value
            elif key in served:
                _restore_limits(served[key], value)
    elif isinstance(served, list) and isinstance(exact, list):
        for a, b in zip(served, exact, strict=False):
            _restore_limits(a, b)
