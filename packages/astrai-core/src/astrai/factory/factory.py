"""`BaseFactory[T]`: a string-keyed factory whose subclasses each own a `Registry`.

A factory subclass names the kind of thing it builds (`kind = "strategy"`) and, optionally, a base class
every registered component must derive from (`base_class = BaseStrategy`). Components register with the
`@Factory.register("name")` decorator in the module that defines them.

    class StrategyFactory(BaseFactory["BaseStrategy"]):
        kind = "strategy"

    @StrategyFactory.register("sft")
    class SFTStrategy(BaseStrategy): ...

    StrategyFactory.create("sft", model, device="cpu", label_smoothing=0.1)

`create` never drops an argument: a keyword the component does not accept is an error naming the keyword
and listing the accepted ones.

A class that derives from a factory (as `AutoRegressiveLM` derives from `AutoModel`) gets a fresh, empty
registry of its own unless it is declared with `class X(Factory, share_registry=True)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from astrai.factory.registry import Registry

T = TypeVar("T")

# kind -> factory class; lets torch-free code (e.g. TrainConfig.validate) check names that a heavier
# distribution registered, without importing that distribution.
_FACTORIES_BY_KIND: dict[str, type[BaseFactory[Any]]] = {}


class BaseFactory(Generic[T]):
    """Generic factory: `register` components by name, `create` them by name."""

    kind: ClassVar[str] = "component"
    base_class: ClassVar[type | None] = None
    _registry: ClassVar[Registry] = Registry()

    def __init_subclass__(cls, share_registry: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if share_registry:
            return
        cls._registry = Registry(cls.kind)
        if "kind" in cls.__dict__:
            _FACTORIES_BY_KIND[cls.kind] = cls

    @classmethod
    def register(cls, name: str, category: str | None = None, priority: int = 0) -> Callable[[type], type]:
        """Class decorator registering the class under `name`; returns the class unchanged."""

        def decorator(component: type) -> type:
            cls._validate_component(component)
            cls._registry.register(name, component, category=category, priority=priority)
            return component

        return decorator

    @classmethod
    def _validate_component(cls, component: type) -> None:
        base = cls.base_class
        if base is not None and not (isinstance(component, type) and issubclass(component, base)):
            raise TypeError(f"{cls.kind} {component!r} must inherit from {base.__qualname__}")

    @classmethod
    def create(cls, name: str, *args: Any, **kwargs: Any) -> T:
        """Instantiate the component registered as `name` with exactly the given arguments."""
        component = cls.get_component_class(name)
        check_arguments(component, args, kwargs, what=f"{cls.kind} {name!r}")
        return component(*args, **kwargs)

    @classmethod
    def get_component_class(cls, name: str) -> type[T]:
        if not cls._registry.contains(name):
            raise ValueError(f"unknown {cls.kind} {name!r}; registered: {cls._registry.list_names()}")
        return cls._registry.get(name)

    @classmethod
    def list_registered(cls) -> list[str]:
        return cls._registry.list_names()

    @classmethod
    def is_registered(cls, name: str) -> bool:
        return cls._registry.contains(name)

    @classmethod
    def list_by_category(cls, category: str | None) -> list[str]:
        return cls._registry.list_by_category(category)

    @classmethod
    def list_by_priority(cls, reverse: bool = False) -> list[str]:
        return cls._registry.list_by_priority(reverse)


def check_arguments(target: Callable[..., Any], args: tuple, kwargs: dict, what: str) -> None:
    """Raise `ValueError` naming the problem if `target(*args, **kwargs)` would not bind."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself decide
        return
    params = signature.parameters
    accepts_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if not accepts_any_keyword:
        unknown = sorted(k for k in kwargs if k not in allowed)
        if unknown:
            raise ValueError(f"{what} got unexpected argument(s) {unknown}; it accepts {allowed}")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{what}: {exc}; it accepts {allowed}") from None


def factory_for_kind(kind: str) -> type[BaseFactory[Any]] | None:
    """The factory class that declared `kind`, if the module defining it has been imported."""
    return _FACTORIES_BY_KIND.get(kind)


def known_names(kind: str, builtin: tuple[str, ...] = ()) -> list[str]:
    """`builtin` names plus those registered in the factory of `kind`, if its module is imported."""
    factory = factory_for_kind(kind)
    return sorted(set(builtin) | set(factory.list_registered() if factory else ()))
