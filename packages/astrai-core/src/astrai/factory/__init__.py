"""Component registries and generic factories (the extension point of every configurable component)."""

from astrai.factory.factory import BaseFactory, check_arguments, factory_for_kind, known_names
from astrai.factory.registry import Registry, RegistryEntry

__all__ = ["BaseFactory", "Registry", "RegistryEntry", "check_arguments", "factory_for_kind", "known_names"]
