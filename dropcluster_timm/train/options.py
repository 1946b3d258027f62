""" Training options, each declared once: a field of a config section made with ``option(...)``.

The field's name, type and default are the typed config's; its metadata holds the flag, the help,
the allowed values and the range. From that one declaration come the ``train`` flags
(``add_option_flags``), the checks of a config built anywhere (``option_errors``) and the
``args.yaml`` a run records (``option_values``), so none of them can drift from the others.
"""
import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

from timm.utils import ParseKwargs

__all__ = ['Bound', 'UNIT_RATE', 'AT_LEAST_ONE', 'NOT_NEGATIVE', 'POSITIVE', 'option', 'TrainOption', 'iter_options',
           'describe', 'flat_settings']

NO_FLAG = ''


@dataclass(frozen=True)
class Bound:
    """The range of a number: ``low`` / ``high`` (None: open-ended), each included unless ``*_open``."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        return ((self.low is None or value > self.low or (value == self.low and not self.low_open)) and
                (self.high is None or value < self.high or (value == self.high and not self.high_open)))

    def __str__(self) -> str:
        if self.high is None:
            return f'{">" if self.low_open else ">="} {self.low:g}'
        return f'in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'


UNIT_RATE = Bound(0.0, 1.0, high_open=True)  # a probability that must leave something
AT_LEAST_ONE = Bound(1)
NOT_NEGATIVE = Bound(0)
POSITIVE = Bound(0, low_open=True)


def option(default: Any, help: str, *, flag: Optional[str] = None, aliases: Sequence[str] = (),
           dest: Optional[str] = None, bound: Optional[Bound] = None, choices: Optional[Sequence[Any]] = None,
           metavar: Any = None, const: Any = None, group: Optional[str] = None,
           unset: Union[str, Callable[[Any], str], None] = None) -> Any:
    """A config field declaring one training option.

    Args:
        default: the default of the typed config and of the flag (timm's, for timm's options).
        help: what it does (the flag's help; the default is added where the embedded-data one differs).
        flag: the ``train`` flag (default ``--field-name``; ``''``: none, Python only).
        aliases: more spellings of the flag (``-b``, timm's older names).
        dest: the name in the parsed command line and ``args.yaml`` (default: from the flag).
        bound: the range of a number (each element of a list).
        choices: the allowed values (each element of a list).
        metavar, const: as ``argparse`` (``const``: a flag given without a value).
        group: the ``--help`` section, where it is not the config section's.
        unset: what ``None`` / ``''`` means, for the help (a text, or a function of the config).
    """
    mutable = isinstance(default, (list, dict))
    meta = dict(help=help, flag=flag, aliases=tuple(aliases), dest=dest, bound=bound,
                choices=tuple(choices) if choices is not None else None, metavar=metavar, const=const, group=group,
                unset=unset)
    if mutable:
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is Union and len(args) == 1 else tp


@dataclass(frozen=True)
class TrainOption:
    """One option as the command line and the checks see it: a field of the section ``section``."""
    section: str
    name: str
    type: Any  # the field's annotation, Optional removed
    default: Any
    meta: Dict[str, Any]

    @property
    def path(self) -> str:
        return f'{self.section}.{self.name}'

    @property
    def inverted(self) -> bool:
        """A switch that is on by default: its flag is ``--no-<name>``."""
        return self.type is bool and self.default is True

    @property
    def flag(self) -> str:
        if self.meta['flag'] is not None:
            return self.meta['flag']
        return '--' + ('no-' if self.inverted else '') + self.name.replace('_', '-')

    @property
    def dest(self) -> str:
        return self.meta['dest'] or self.flag.lstrip('-').replace('-', '_')

    @property
    def label(self) -> str:
        """How errors name it: the flag, or the config path of a Python-only option."""
        return self.flag or self.path

    def _element(self) -> Tuple[Any, Any]:
        """(nargs, element type) of a list or tuple option, else (None, type)."""
        origin, args = typing.get_origin(self.type), typing.get_args(self.type)
        if origin is list:
            return '+', args[0]
        if origin is tuple:
            return ('+', args[0]) if args[-1] is Ellipsis else (len(args), args[0])
        return None, self.type

    def flag_kwargs(self) -> Dict[str, Any]:
        """``add_argument`` keywords; not given, the flag is absent from the parsed namespace, so the
        config's default (or the embedded-data overlay) applies."""
        kwargs = dict(dest=self.dest, default=argparse.SUPPRESS, help=self.meta['help'])
        if self.type is bool:
            return dict(kwargs, action='store_true')
        if typing.get_origin(self.type) is dict:
            return dict(kwargs, nargs='*', action=ParseKwargs, metavar=self.meta['metavar'] or 'KEY=VALUE')
        nargs, element = self._element()
        kwargs.update(type=element, nargs=nargs)
        if self.meta['const'] is not None:
            kwargs.update(nargs='?', const=self.meta['const'])
        if self.meta['choices']:  # argparse's one-line error at once; check() for a config built in Python
            kwargs['choices'] = self.meta['choices']
            if '' in self.meta['choices']:  # no '{,a,b}' in the help
                kwargs['metavar'] = self.dest.upper()
        if self.meta['metavar'] is not None:
            kwargs['metavar'] = self.meta['metavar']
        return kwargs

    def from_flag(self, value: Any) -> Any:
        """The field's value of a parsed flag (or a ``-c`` file's entry)."""
        if self.inverted:
            return not value
        if value is None:
            return None
        origin = typing.get_origin(self.type)
        if origin in (list, tuple, dict):
            return origin(value)
        return value

    def to_flag(self, value: Any) -> Any:
        """The ``args.yaml`` entry of the field's value (YAML-ready)."""
        if self.inverted:
            return not value
        return list(value) if isinstance(value, tuple) else value

    def error(self, value: Any) -> Optional[str]:
        """Why ``value`` cannot work, or None."""
        bound, choices = self.meta['bound'], self.meta['choices']
        if value is None or (not bound and not choices):
            return None
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if choices and (not values or any(v not in choices for v in values)):
            return f'{self.label} must be one of {", ".join(repr(c) for c in choices)}, got {value!r}'
        if bound and any(not bound.holds(v) for v in values):
            shown = f'{value:g}' if isinstance(value, (int, float)) else f'{value}'
            return f'{self.label} must be {bound}, got {shown}'
        return None


def iter_options(config: Any) -> Iterator[TrainOption]:
    """The options of a ``TrainConfig`` (class or instance), section by section, in declaration order."""
    for section in dataclasses.fields(config):
        cls = section.default_factory if section.default_factory is not dataclasses.MISSING else section.type
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if 'help' not in f.metadata:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield TrainOption(section.name, f.name, _unwrap_optional(hints[f.name]), default, dict(f.metadata))


def describe(value: Any, opt: TrainOption, config: Any) -> str:
    """A value as ``--help`` states a default."""
    if value is None or value == '':
        unset = opt.meta['unset']
        return (unset(config) if callable(unset) else unset) or 'off'
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (list, tuple)):
        return ' '.join(describe(v, opt, config) for v in value)
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) or 'none'
    return f'{value:g}' if isinstance(value, float) else str(value)


def flat_settings(tree: Dict[str, Any], prefix: str = '', whole: Sequence[str] = ()) -> Dict[str, Any]:
    """``{'optim.lr': 0.1, ...}``: the settings of a nested dict (``TrainConfig.to_dict()``) by dotted
    key; the keys in ``whole`` keep their dict as one value."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = prefix + key
        if isinstance(value, dict) and name not in whole:
            flat.update(flat_settings(value, name + '.', whole))
        else:
            flat[name] = value
    return flat
