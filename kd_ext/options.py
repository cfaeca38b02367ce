"""The option rules of kd_ext, one place for every choice and range check.

Options that take one of a few names are str Enums (as anomalib's options are), and every public function or
constructor also accepts their string values. :func:`check_choice` turns a value into the Enum member, or refuses it
with a message that names the option, the value and the allowed values; :func:`check_name` does the same for a
plain tuple of names. Numbers are checked by :func:`check_positive` (a finite number ``> 0``, such as a learning
rate; :func:`check_learning_rate`), :func:`check_fraction` (a share in ``(0, 1]`` or ``(0, 1)``) and
:func:`check_whole` (a whole number with a lower bound; :func:`check_epochs`). Kernels, models, datamodules and the
``kd-ext distill`` configuration all use these functions, so an option is accepted or refused the same way
wherever it is given.

anomalib's command line (jsonargparse) parses an Enum-typed argument by member *name* (``MAX``), not by value
(``max``), so a signature typed ``Enum | str`` lets any string through to the constructor. Signatures therefore
type such arguments with :func:`literal_of`, a ``typing.Literal`` of the allowed values: jsonargparse then lists
them in ``--help`` and refuses any other value while parsing, before the model is built.

Nothing here imports torch or numpy: the edge install's kernels use this module too.

Example:
    >>> from enum import Enum
    >>> from kd_ext.options import check_choice, check_learning_rate
    >>> class Colour(str, Enum):
    ...     RED = "red"
    ...     BLUE = "blue"
    >>> check_choice("red", Colour, "colour")
    <Colour.RED: 'red'>
    >>> check_learning_rate(1e-3)
    0.001
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from enum import Enum
from typing import Any, Literal, TypeVar

__all__ = [
    "check_choice",
    "check_epochs",
    "check_fraction",
    "check_learning_rate",
    "check_name",
    "check_positive",
    "check_whole",
    "choice_values",
    "literal_of",
]

EnumT = TypeVar("EnumT", bound=Enum)


def choice_values(options: type[Enum] | Iterable[str]) -> tuple[str, ...]:
    """The allowed values of an option: an Enum's member values, or the names of a tuple.

    Args:
        options: A str Enum, or the allowed names.

    Returns:
        tuple[str, ...]: The values, in definition order.
    """
    if isinstance(options, type) and issubclass(options, Enum):
        return tuple(member.value for member in options)
    return tuple(options)


def literal_of(options: type[Enum] | Iterable[str]) -> Any:
    """A ``typing.Literal`` of an option's values, the type hint that makes jsonargparse check them.

    Args:
        options: A str Enum, or the allowed names.

    Returns:
        ``Literal[<value>, ...]``, for a signature's annotation.

    Example:
        >>> from kd_ext.options import literal_of
        >>> literal_of(("mean", "max"))
        typing.Literal['mean', 'max']
    """
    return Literal[choice_values(options)]  # a tuple subscript is the same as listing the values


def _unknown(value: object, values: tuple[str, ...], name: str) -> ValueError:
    """The error for a value that is not one of ``values``: the option, the value and the allowed values."""
    choices = ", ".join(repr(choice) for choice in values)
    return ValueError(f"Unknown {name} {value!r}; choose one of {choices}.")


def check_choice(value: object, options: type[EnumT], name: str) -> EnumT:
    """Return ``value`` as a member of the str Enum ``options`` (a member, or its string value).

    Args:
        value: The given value.
        options: The Enum of the allowed values.
        name: The option's name, for the message.

    Returns:
        The member.

    Raises:
        ValueError: If ``value`` is neither a member nor the value of one; the message names the option, the value
            and the allowed values.
    """
    if isinstance(value, options):
        return value
    try:
        return options(value)
    except ValueError:
        raise _unknown(value, choice_values(options), name) from None


def check_name(value: object, names: Iterable[str], name: str) -> str:
    """Return ``value`` as a plain string if it is one of ``names`` (options without an Enum).

    Args:
        value: The given value (a str Enum member counts as its value).
        names: The allowed names.
        name: The option's name, for the message.

    Returns:
        str: The value.

    Raises:
        ValueError: If ``value`` is not one of ``names``; the message names the option, the value and the allowed
            names.
    """
    values = choice_values(names)
    text = value.value if isinstance(value, Enum) else value
    if not isinstance(text, str) or text not in values:
        raise _unknown(value, values, name)
    return text


def _real(value: object, name: str, rule: str) -> float:
    """``value`` as a float if it is a real number (not a bool), else a ``ValueError`` stating ``rule``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be {rule}, got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_positive(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a finite number ``> 0``.

    Args:
        value: The given value.
        name: The option's name, for the message.

    Returns:
        float: The value.

    Raises:
        ValueError: If it is not a real number, or is zero, negative, NaN or infinite.
    """
    rule = "> 0 and finite"
    number = _real(value, name, rule)
    if not math.isfinite(number) or number <= 0:
        msg = f"{name} must be {rule}, got {value!r}."
        raise ValueError(msg)
    return number


def check_learning_rate(value: object, name: str = "learning_rate") -> float:
    """Return a learning rate as a float if it is a finite number ``> 0`` (see :func:`check_positive`).

    Args:
        value: The given learning rate.
        name: The option's name, for the message.

    Returns:
        float: The learning rate.

    Raises:
        ValueError: If it is not a finite number ``> 0``.
    """
    return check_positive(value, name)


def check_fraction(value: object, name: str, *, include_one: bool = True) -> float:
    """Return a share as a float if it lies in ``(0, 1]`` (or ``(0, 1)`` with ``include_one=False``).

    Args:
        value: The given share.
        name: The option's name, for the message.
        include_one: Whether 1 is allowed.

    Returns:
        float: The share.

    Raises:
        ValueError: If it is not a real number in the interval.
    """
    rule = f"a number in (0, 1{']' if include_one else ')'}"
    number = _real(value, name, rule)
    if not (0 < number < 1 or (include_one and number == 1)):
        msg = f"{name} must be {rule}, got {value!r}."
        raise ValueError(msg)
    return number


def check_whole(value: object, name: str, minimum: int = 0) -> int:
    """Return ``value`` if it is a whole number (an int, not a bool) ``>= minimum``.

    Args:
        value: The given value.
        name: The option's name, for the message.
        minimum: The smallest allowed value.

    Returns:
        int: The value.

    Raises:
        ValueError: If it is not an int, or is smaller than ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        msg = f"{name} must be a whole number >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return int(value)


def check_epochs(epochs: object, name: str = "epochs") -> int:
    """Return a number of training epochs if it is a whole number ``>= 1`` (see :func:`check_whole`).

    Args:
        epochs: The given number of epochs.
        name: The option's name, for the message.

    Returns:
        int: The epochs.

    Raises:
        ValueError: If it is not a whole number ``>= 1``.
    """
    return check_whole(epochs, name, minimum=1)
