"""exitnas._config: frozen validated configs from plain data — unknown keys, wrong types,
out-of-range and non-finite values are one ConfigError naming the dotted path; to_dict /
from_dict round-trip; overrides are re-validated; the YAML reader refuses duplicate keys."""
from __future__ import annotations

import dataclasses

import pytest

from exitnas._config import field, from_dict, parse_yaml, to_dict, with_overrides
from exitnas.errors import ConfigError
from exitnas.space import Space


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    rate: float = field(0.1, gt=0.0, le=1.0, doc="a rate")
    names: tuple[str, ...] = field(("a",), nonempty=True, doc="names")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    count: int = field(ge=1, le=10, doc="required")
    inner: Inner = field(Inner())


@pytest.mark.parametrize("data, path, words", [
    ({}, "count", "is required"),
    ({"count": 3, "extra": 1}, "extra", "unknown key"),
    ({"count": "3"}, "count", "expected"),
    ({"count": 0}, "count", ">= 1"),
    ({"count": 11}, "count", "<= 10"),
    ({"count": 2, "inner": {"rate": 0}}, "inner.rate", "> 0"),
    ({"count": 2, "inner": {"rate": float("nan")}}, "inner.rate", ""),
    ({"count": 2, "inner": {"names": []}}, "inner.names", ""),
    ({"count": 2, "inner": {"typo": 1}}, "inner.typo", "unknown key"),
    ({"count": 2, "inner": [1]}, "inner", "mapping"),
])
def test_bad_values_name_their_path(data, path, words):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert err.value.path == path and words in str(err.value)
    assert "\n" not in str(err.value)


def test_round_trip_and_frozen():
    obj = from_dict(Outer, {"count": 2, "inner": {"rate": 0.5, "names": ["x", "y"]}})
    assert obj == Outer(count=2, inner=Inner(rate=0.5, names=("x", "y")))
    assert from_dict(Outer, to_dict(obj)) == obj
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.count = 3


def test_keyword_only_construction():
    with pytest.raises(TypeError):
        Inner(0.5)  # noqa: the configs take keywords only


def test_overrides_are_revalidated(tiny_space):
    assert with_overrides(tiny_space, {"search.trials": 9}).search.trials == 9
    with pytest.raises(ConfigError, match="search.trials"):
        with_overrides(tiny_space, {"search.trials": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(tiny_space, {"search.trails": 9})
    assert isinstance(from_dict(Space, to_dict(tiny_space)), Space)
    assert from_dict(Space, to_dict(tiny_space)) == tiny_space


def test_yaml_refuses_duplicate_keys_and_parses_scalars():
    with pytest.raises(ConfigError, match="duplicate|twice"):
        parse_yaml("a: 1\na: 2\n", file="x.yaml")
    assert parse_yaml("0.5") == 0.5 and parse_yaml("[1, 2]") == [1, 2]


def test_the_strict_yaml_loader_constructs_no_python_objects(tmp_path):
    """The space reader's loader is a SafeLoader: a planted python tag is refused as an
    unknown tag and runs nothing."""
    import yaml

    from exitnas._config import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)
    assert not any("python" in tag for tag in _StrictLoader.yaml_constructors if tag)
    marker = tmp_path / "ran"
    for text in (f"a: !!python/object/apply:os.system ['touch {marker}']\n",
                 f"a: !!python/object/new:pathlib.Path ['{marker}']\n",
                 "a: !!python/name:os.system\n"):
        with pytest.raises(ConfigError, match="python"):
            parse_yaml(text, file="x.yaml")
    assert not marker.exists()
