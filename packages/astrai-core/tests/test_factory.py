import pytest

from astrai.factory import BaseFactory, Registry, RegistryEntry, check_arguments, factory_for_kind, known_names


def test_registry_register_get_contains():
    reg = Registry("widget")
    reg.register("b", int, category="num", priority=2)
    reg.register("a", str, category="text")
    assert reg.get("b") is int
    assert reg.get_entry("b").priority == 2
    assert reg.contains("a") and "a" in reg and not reg.contains("c")
    assert len(reg) == 2


def test_registry_listings():
    reg = Registry()
    reg.register("z", 1, category="x", priority=5)
    reg.register("m", 2, category="y", priority=1)
    reg.register("a", 3, category="x", priority=5)
    assert reg.list_names() == ["a", "m", "z"]
    assert reg.list_by_category("x") == ["a", "z"]
    assert reg.list_by_category("nope") == []
    assert reg.list_by_priority() == ["m", "z", "a"]  # ties keep registration order
    assert reg.list_by_priority(reverse=True) == ["z", "a", "m"]


def test_registry_duplicate_rejected():
    reg = Registry("strategy")
    reg.register("sft", int)
    with pytest.raises(ValueError, match="'sft' is already registered"):
        reg.register("sft", str)


def test_registry_unknown_name_lists_known():
    reg = Registry("strategy")
    reg.register("sft", int)
    with pytest.raises(KeyError, match=r"unknown strategy 'dpo'; registered: \['sft'\]"):
        reg.get("dpo")


@pytest.mark.parametrize("name", ["", None, 3])
def test_registry_bad_name(name):
    with pytest.raises(ValueError, match="non-empty string"):
        Registry().register(name, int)


def test_registry_bad_priority():
    with pytest.raises(TypeError, match="priority"):
        Registry().register("a", int, priority="high")


class Animal:
    def __init__(self, name, legs=4):
        self.name, self.legs = name, legs


class AnimalFactory(BaseFactory[Animal]):
    kind = "animal"
    base_class = Animal


@AnimalFactory.register("dog", category="pet", priority=1)
class Dog(Animal):
    pass


@AnimalFactory.register("bird")
class Bird(Animal):
    def __init__(self, name, **kwargs):
        super().__init__(name, legs=2)
        self.extra = kwargs


class PlantFactory(BaseFactory[object]):
    kind = "plant"


def test_factory_create_and_lookup():
    dog = AnimalFactory.create("dog", "rex", legs=3)
    assert isinstance(dog, Dog) and dog.name == "rex" and dog.legs == 3
    assert AnimalFactory.get_component_class("bird") is Bird
    assert AnimalFactory.list_registered() == ["bird", "dog"]
    assert AnimalFactory.is_registered("dog") and not AnimalFactory.is_registered("cat")
    assert AnimalFactory.list_by_category("pet") == ["dog"]
    assert AnimalFactory.list_by_priority(reverse=True) == ["dog", "bird"]


def test_factory_register_returns_class_unchanged():
    assert Dog.__name__ == "Dog" and issubclass(Dog, Animal)


def test_each_factory_has_its_own_registry():
    assert PlantFactory.list_registered() == []
    assert not PlantFactory.is_registered("dog")


def test_factory_unknown_name_lists_supported():
    with pytest.raises(ValueError, match=r"unknown animal 'cat'; registered: \['bird', 'dog'\]"):
        AnimalFactory.create("cat", "tom")
    with pytest.raises(ValueError, match="unknown animal"):
        AnimalFactory.get_component_class("cat")


def test_factory_rejects_unexpected_keyword():
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['wings'\]; it accepts \['name', 'legs'\]"):
        AnimalFactory.create("dog", "rex", wings=2)


def test_factory_passes_everything_to_var_keyword():
    bird = AnimalFactory.create("bird", "tweety", wings=2)
    assert bird.extra == {"wings": 2}


def test_factory_rejects_missing_or_extra_positional():
    with pytest.raises(ValueError, match="missing a required argument: 'name'"):
        AnimalFactory.create("dog")
    with pytest.raises(ValueError, match="too many positional arguments"):
        AnimalFactory.create("dog", "a", 4, 5)


def test_factory_base_class_check():
    with pytest.raises(TypeError, match="must inherit from Animal"):

        @AnimalFactory.register("rock")
        class Rock:
            pass

    assert not AnimalFactory.is_registered("rock")


def test_factory_duplicate_registration():
    with pytest.raises(ValueError, match="already registered"):
        AnimalFactory.register("dog")(Dog)


def test_subclass_of_factory_gets_fresh_registry_unless_shared():
    class Special(AnimalFactory):
        pass

    class Shared(AnimalFactory, share_registry=True):
        pass

    assert Special.list_registered() == []
    assert Shared.list_registered() == ["bird", "dog"]


def test_factory_for_kind_and_known_names():
    assert factory_for_kind("animal") is AnimalFactory
    assert factory_for_kind("no such kind") is None
    assert known_names("animal", ("cat",)) == ["bird", "cat", "dog"]
    assert known_names("no such kind", ("x",)) == ["x"]


def test_check_arguments_on_functions_and_builtins():
    def f(a, *, b=1):
        return a + b

    check_arguments(f, (1,), {"b": 2}, what="f")
    with pytest.raises(ValueError, match=r"f got unexpected argument\(s\) \['c'\]"):
        check_arguments(f, (1,), {"c": 2}, what="f")
    check_arguments(print, (1, 2), {}, what="print")  # no exception: signature may be unavailable


def test_registry_register_takes_the_documented_keywords():
    """Architecture document: `Registry.register(name, component_cls, category, priority)`."""
    reg = Registry("widget")
    reg.register(name="w", component_cls=int, category="num", priority=3)
    assert reg.get_entry("w") == RegistryEntry(int, "num", 3)
