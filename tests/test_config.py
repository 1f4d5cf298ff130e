"""Typed configs: YAML loading, overrides, and errors that name the key at fault."""

import pytest

from memray.config import apply_overrides, bundled_configs, dump_yaml, from_dict
from memray.errors import ConfigError, InputError
from memray.train import RunConfig, load_run_config


def test_bundled_configs_load():
    assert {"tiny", "demo"} <= set(bundled_configs())
    for name in bundled_configs():
        config = load_run_config(name)
        assert config.name == name


def test_overrides_are_typed_and_nested():
    config = load_run_config(
        "tiny",
        [
            "train.steps=3",
            "model.memory.knn=4",
            "optim.betas=[0.8, 0.9]",
            "model.memory.v_dim=null",
            "model.memory_pools={a: [1]}",
            "optim.lr=3e-5",  # YAML 1.1 reads this as a string (it wants 3.0e-5); a float key takes it
        ],
    )
    assert config.optim.lr == 3e-5
    with pytest.raises(ConfigError, match="optim.lr"):
        load_run_config("tiny", ["optim.lr=fast"])
    assert config.train.steps == 3 and config.model.memory.knn == 4
    assert config.optim.betas == [0.8, 0.9] and config.model.memory.v_dim is None
    assert config.model.memory_pools == {"a": [1]}


def test_resolved_config_round_trips():
    import yaml

    config = load_run_config("demo", ["optim.lr=0.01"])
    again = from_dict(RunConfig, yaml.safe_load(dump_yaml(config)))
    assert again == config


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.memory.bogus=1", "model.memory.bogus"),
        ("model.memory.n_keys=2", "model.memory.knn"),  # 2**2 < knn=8
        ("model.memory.k_dim=31", "model.memory.k_dim"),
        ("model.memory.heads=0", "model.memory.heads"),
        ("model.memory_layers=[5]", "model.memory_layers"),
        ("train.steps=many", "train.steps"),
        ("train.precision=fp8", "train.precision"),
        ("model.memory.swilu=3", "model.memory.swilu"),
        ("data.seq_len=1000", "data.seq_len"),
        ("model.memory_pools={p: [0]}", "model.memory_pools.p"),
        ("optim.value_optimizer=lion", "optim.value_optimizer"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_run_config("tiny", [override])
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_override_syntax_and_missing_files():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(InputError, match="nope.yaml"):
        load_run_config("nope.yaml")
    with pytest.raises(InputError, match="unknown config 'nosuch'"):
        load_run_config("nosuch")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_run_config(str(evil))
