"""Recipe validation: bad input fails at load time with a message naming the offending value."""

from __future__ import annotations

import pytest
import yaml

import dimred_dist
from dimred_dist.core.config import Recipe, load_recipe, recipe_from_dict
from dimred_dist.core.registry import get_method, register_method, registered_methods
from dimred_dist.core.targets import TargetConfig
from dimred_dist.methods.static import StaticConfig

BASE = {"method": "random", "sparsity": 0.5}


def test_minimal_recipe_defaults():
    r = load_recipe(BASE)
    assert (r.method, r.sparsity, r.distribution, r.seed) == ("random", 0.5, "erk", 0)
    assert r.density == 0.5
    assert r.targets == TargetConfig() and isinstance(r.args, StaticConfig)


@pytest.mark.parametrize("sparsity", [1.0, 1, -0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match="sparsity must be in"):
        load_recipe({**BASE, "sparsity": sparsity})


@pytest.mark.parametrize("sparsity", ["0.5", None, True, [0.5]])
def test_sparsity_not_a_number(sparsity):
    with pytest.raises((TypeError, ValueError), match="sparsity must be a number"):
        load_recipe({**BASE, "sparsity": sparsity})
    with pytest.raises(TypeError, match="sparsity must be a number"):
        Recipe(method="random", sparsity=sparsity)


def test_sparsity_zero_and_int_are_accepted():
    r = load_recipe({**BASE, "sparsity": 0})
    assert r.sparsity == 0.0 and isinstance(r.sparsity, float)


def test_unknown_method_lists_registered_ones_and_how_to_add():
    with pytest.raises(ValueError, match="unknown method 'rigl2'") as info:
        load_recipe({**BASE, "method": "rigl2"})
    msg = str(info.value)
    for name in ("magnitude", "random", "random_freeze", "rigl", "set"):
        assert name in msg
    assert "register_method" in msg


def test_method_name_is_case_insensitive():
    assert load_recipe({**BASE, "method": "RigL"}).method == "rigl"


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown sparsity distribution 'gauss'; known: uniform, erk, global"):
        load_recipe({**BASE, "distribution": "gauss"})


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        load_recipe({**BASE, "seed": seed})


def test_unknown_top_level_key_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"recipe: unknown key\(s\) \['sparsty'\]; valid keys: \[.*'sparsity'"):
        load_recipe({**BASE, "sparsty": 0.9})


def test_unknown_key_in_targets():
    with pytest.raises(ValueError, match=r"targets: unknown key\(s\) \['bias'\]; valid keys: \['biases'"):
        load_recipe({**BASE, "targets": {"bias": True}})


def test_unknown_key_in_args():
    with pytest.raises(ValueError, match=r"args of method 'rigl': \['interval'\] are values of the 'periodic'"):
        load_recipe({**BASE, "method": "rigl", "args": {"interval": 10}})
    with pytest.raises(ValueError, match=r"args of method 'rigl': unknown key\(s\) \['x'\]; valid keys: \['init'\]"):
        load_recipe({**BASE, "method": "rigl", "args": {"x": 10}})
    with pytest.raises(ValueError, match=r"args of method 'random': unknown key\(s\) \['x'\]"):
        load_recipe({**BASE, "args": {"x": 1}})


def test_bad_values_in_args_and_targets():
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        load_recipe({**BASE, "method": "set", "args": {"drop_fraction": 1.5}})
    with pytest.raises(ValueError, match="targets: expected a mapping, got list"):
        load_recipe({**BASE, "targets": ["fc"]})
    with pytest.raises(ValueError, match="invalid regular expression"):
        load_recipe({**BASE, "targets": {"include": ["("]}})


def test_missing_required_key():
    with pytest.raises(ValueError, match="sparsity"):
        load_recipe({"method": "random"})


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- method: random\n- sparsity: 0.5\n")
    with pytest.raises(TypeError, match="a recipe must be a YAML mapping, got list"):
        load_recipe(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(TypeError, match="got NoneType"):
        load_recipe(str(empty))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: random\nsparsity: 0.5\nextra: 1\n")
    with pytest.raises(ValueError, match=rf"{path}: unknown key\(s\) \['extra'\]"):
        load_recipe(path)


def test_yaml_round_trip(tmp_path):
    recipe = load_recipe({
        "method": "rigl", "sparsity": 0.9, "distribution": "uniform", "seed": 7,
        "targets": {"exclude": ["lm_head"], "biases": True},
        "args": {"update_interval": 50, "drop_fraction": 0.25, "decay": "constant"},
    })
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    again = load_recipe(path)
    assert again == recipe
    assert again.schedule.interval == 50 and again.targets.exclude == ["lm_head"]
    assert again.schedule.drop_fraction == 0.25 and again.schedule.decay == "constant"  # legacy args moved
    saved = yaml.safe_load(path.read_text())
    assert saved["schedule"] == {"kind": "periodic", "interval": 50, "drop_fraction": 0.25, "end_fraction": 0.75,
                                 "decay": "constant", "skip_step": True, "offset": 0,
                                 "first_drop_fraction": None}  # plain data, no python tags
    assert saved["args"] == {"init": "random"}


def test_shipped_configs_load():
    import pathlib

    for path in sorted(pathlib.Path(__file__).parents[2].joinpath("configs").glob("*.yaml")):
        assert isinstance(load_recipe(path), Recipe), path


def test_recipe_from_dict_accepts_built_parts():
    r = recipe_from_dict({**BASE, "targets": TargetConfig(include=["fc"])})
    assert r.targets.include == ["fc"]


def test_registry():
    assert {"random", "magnitude", "random_freeze", "set", "rigl"} <= set(registered_methods())
    assert registered_methods() == sorted(registered_methods())
    assert dimred_dist.registered_methods is registered_methods
    with pytest.raises(ValueError, match="already registered"):
        register_method("random")(type("Other", (), {}))
    cls = get_method("random")
    assert register_method("random")(cls) is cls  # re-registering the same class is harmless
