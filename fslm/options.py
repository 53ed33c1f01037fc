"""The base of every step's options object and of its result: `step(paths, Options, on_event=None) -> Result`.

Options are typed fields that own their defaults and help text: the CLI builds its flags from them (default and help
come from here, written once), and `build` turns a validation error into one line naming the flag, like any other
bad input. A Result is what the step did, as typed fields the caller reads (and the CLI prints).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fslm.errors import FslmError

OptionsT = TypeVar("OptionsT", bound="Options")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def pick(cls: type[OptionsT], values: dict[str, Any]) -> OptionsT:
        """Options from the entries of `values` that are fields of this class (a CLI command passes its `locals()`:
        each flag is then named once, as the command's parameter, and reaches its field by that name)."""
        return cls.build(**{k: v for k, v in values.items() if k in cls.model_fields})

    @classmethod
    def build(cls: type[OptionsT], **values: Any) -> OptionsT:
        """Validate `values` into options; a bad value is reported as `--flag-name: why` (exit code 2)."""
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or cls.__name__
            flag = "--" + where.split(".")[0].replace("_", "-")
            msg = err["msg"].removeprefix("Value error, ")
            raise FslmError(f"{flag}: {msg}") from None


class Result(BaseModel):
    """The base of every step's result."""

    model_config = ConfigDict(arbitrary_types_allowed=True)


def comma_list(value: Any) -> Any:
    """A CLI comma list ("a, b,c") as a list; other values pass through for the field's own validation."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return value
