"""Self-descriptions read through a typed schema, as the config is: what a checkpoint or an
export's ``FILE.json`` says about the model it holds (classes, preprocessing, head size) is
checked before anything trusts it, and a bad one is refused naming the file and the field."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import ranges as R
from ..errors import InputError

INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
# what the preprocessing's numbers may be: sizes a model can take, and mean/std of pixels in 0..1
CROP_SIZE = R.IMAGE_SIZE
RESIZE_SIZE = R.Range(int, ge=16, le=4096)
PIXEL_MEAN = R.Range(float, ge=0, le=1)
PIXEL_STD = R.Range(float, ge=1e-3, le=10)


class Described(BaseModel):
    """A section of a self-description: unknown keys refused, numbers typed by ranges.py."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class PreprocessDesc(Described):
    """The eval preprocessing a model was trained with (models.Preprocess as written)."""

    crop_size: CROP_SIZE.t
    resize_size: RESIZE_SIZE.t
    mean: tuple[PIXEL_MEAN.t, PIXEL_MEAN.t, PIXEL_MEAN.t]
    std: tuple[PIXEL_STD.t, PIXEL_STD.t, PIXEL_STD.t]
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _resize_covers_crop(self) -> "PreprocessDesc":
        if self.resize_size < self.crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}: "
                             "the centre crop would not fit")
        return self


class Classified(BaseModel):
    """The classes and head size every self-description carries (other keys allowed here:
    the schemas that extend it say which)."""

    model_config = ConfigDict(allow_inf_nan=False, frozen=True)

    model_name: str = Field(min_length=1)
    num_classes: R.CLASSES.t
    classes: list[str]
    preprocess: PreprocessDesc

    @field_validator("classes")
    @classmethod
    def _distinct_names(cls, v: list[str]) -> list[str]:
        blank = [i for i, c in enumerate(v) if not c.strip()]
        if blank:
            raise ValueError(f"class name {blank[0]} is empty")
        seen: set[str] = set()
        dup = [c for c in v if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
        if dup:
            raise ValueError(f"class names must be distinct; {dup[0]!r} appears more than once")
        return v

    @model_validator(mode="after")
    def _one_name_per_output(self) -> "Classified":
        if len(self.classes) != self.num_classes:
            raise ValueError(f"classes lists {len(self.classes)} name(s) but num_classes is {self.num_classes}: "
                             "every output of the head needs one name")
        return self


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 60, 60, 2, 4, 4


def problems(exc: ValidationError) -> list[str]:
    """One line per problem: the field's path, what is wrong, and the value found."""
    out = []
    for e in exc.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "value_error") or isinstance(e.get("input"), dict) else \
            f" (got {_short.repr(e.get('input'))})"
        out.append(f"{key}: {msg}{got}")
    return out


def read(schema: type[BaseModel], obj: Any, path: str | Path, what: str, error: type[InputError] = InputError,
         hint: str | None = None) -> Any:
    """``obj`` validated by ``schema``, or ``error`` (exit 2) naming ``path`` and each bad field."""
    if not isinstance(obj, dict):
        raise error(f"{path}: the {what} is not a mapping of fields", hint=hint)
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        found = problems(exc)
        raise error(f"{path}: invalid {what}: {len(found)} problem(s)" + "".join(f"\n  - {f}" for f in found),
                    hint=hint) from None
