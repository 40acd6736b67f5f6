from pathlib import Path

import pytest
import yaml

from fedbabu.config import DIGITS_DEFAULT, Config, build_config, load_config, parse_overrides
from fedbabu.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_setting():
    c = Config()
    assert (c.num_clients, c.client_fraction, c.local_epochs, c.rounds) == (100, 0.1, 1, 320)
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size) == (0.1, 0.9, 0.0, 50)
    assert (c.finetune.lr, c.finetune.momentum, c.finetune.epochs, c.finetune.batch_size) == (0.001, 0.9, 5, 50)
    assert c.resolved_milestones() == [160, 240]
    assert c.lr_at(159) == pytest.approx(0.1) and c.lr_at(160) == pytest.approx(0.01)
    assert c.lr_at(240) == pytest.approx(0.001)


def test_shipped_digits_config_is_the_embedded_default():
    from_file = load_config(ROOT / "configs" / "digits.yaml")
    assert from_file == load_config(None)
    assert load_config(None).dataset == DIGITS_DEFAULT["dataset"]


def test_paper_config_file_matches_the_defaults():
    paper = load_config(ROOT / "configs" / "cifar100-4convnet.yaml")
    assert paper.model_dump(exclude={"model"}) == Config().model_dump(exclude={"model"})


def test_overrides_use_yaml_types_and_dotted_keys():
    c = load_config(None, ["rounds=3", "finetune.part=head", "lr=0.5", "lr_milestones=[1, 2]"])
    assert c.rounds == 3 and c.finetune.part == "head" and c.lr == 0.5 and c.lr_milestones == [1, 2]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"rounds": "many"}, "rounds"),
        ({"client_fraction": 0}, "client_fraction"),
        ({"client_fraction": 1.5}, "client_fraction"),
        ({"lr": 0}, "lr"),
        ({"local_epochs": -1}, "local_epochs"),
        ({"algorithm": "fedsgd"}, "unknown algorithm 'fedsgd'"),
        ({"partition": "zipf"}, "partition"),
        ({"finetune": {"part": "tail"}}, "finetune.part"),
        ({"roudns": 3}, "did you mean 'rounds'"),
        ({"finetune": {"epoch": 3}}, "did you mean 'finetune.epochs'"),
    ],
)
def test_bad_values_name_the_key(values, fragment):
    with pytest.raises(UserError) as err:
        build_config({**DIGITS_DEFAULT, **values})
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors_say_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\nlr: [0.1\n")
    with pytest.raises(UserError, match=r"bad.yaml: YAML syntax error at line"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="mapping"):
        load_config(listing)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


# Roles: every field says once what it is for, and every rule about which keys may differ derives from them.

def test_every_field_carries_exactly_one_role():
    from fedbabu.config import ROLES, Role

    for name, info in Config.model_fields.items():
        carried = [item.name for item in info.metadata if isinstance(item, Role)]
        assert len(carried) == 1 and carried[0] in ROLES, f"Config.{name} carries roles {carried}"
    roles = Config.roles()
    assert list(roles) == list(Config.model_fields)
    assert set(roles.values()) == set(ROLES)


def test_a_field_without_a_role_or_an_unknown_role_is_refused():
    from fedbabu.config import Role

    class Unmarked(Config):
        extra_knob: int = 0

    with pytest.raises(TypeError, match=r"Config\.extra_knob carries 0 roles"):
        Unmarked.roles()
    with pytest.raises(ValueError, match="unknown role 'runtim'"):
        Config.keys_with_role("runtim")
    with pytest.raises(ValueError, match="unknown role"):
        Role("hardware")


def test_the_roles_of_the_fields():
    assert Config.keys_with_role("data") == ("dataset", "hf", "num_clients", "partition", "shards_per_client",
                                             "dirichlet_alpha", "samples_per_client", "holdout_clients", "seed")
    assert Config.keys_with_role("evaluation") == ("eval_batch_size", "finetune")
    assert Config.keys_with_role("runtime") == ("data_dir", "download", "device", "workers", "personal_memory")
    assert {"algorithm", "model", "rounds", "lr", "eval_every", "eval_clients", "personalize_clients", "settings",
            "precision", "executor", "channels_last", "checkpoint_every"} <= set(Config.keys_with_role("training"))
    assert Config.keys_with_role("evaluation", "runtime") == ("data_dir", "download", "eval_batch_size", "finetune",
                                                              "device", "workers", "personal_memory")


def test_the_lists_derived_from_the_roles():
    from fedbabu import personalization, reproduce, runner
    from fedbabu.algorithms.warm_start import WarmStart

    runtime = {"workers", "device", "data_dir", "download", "personal_memory"}
    assert set(personalization.FREE_KEYS) == runtime  # fedbabu analyze
    assert set(personalization.PERSONALIZE_KEYS) == runtime | {"finetune", "eval_batch_size"}
    # device stays out of a resume: another device does not resume bit-identically
    assert set(runner.RESUME_FREE_KEYS) == {"workers", "data_dir", "download", "personal_memory"}
    assert runner.SHARED_BY_ALL == ("dataset", "data_dir", "hf", "num_clients", "partition", "shards_per_client",
                                    "dirichlet_alpha", "samples_per_client", "holdout_clients", "seed")
    assert set(reproduce.CELL_KEYS) == {"algorithm", "seed", "dataset", "hf", "num_clients", "partition",
                                        "shards_per_client", "dirichlet_alpha", "samples_per_client",
                                        "holdout_clients"}
    assert set(reproduce.EVALUATION_KEYS) == runtime | {"finetune", "eval_batch_size"}
    assert set(reproduce.RUNTIME_KEYS) == runtime
    assert set(WarmStart.same) == set(Config.keys_with_role("data"))


def _digits(**values):
    return build_config({**DIGITS_DEFAULT, **values})


def test_personalize_may_change_evaluation_and_runtime_keys_only():
    from fedbabu.personalization import personalization_config

    run = _digits()
    changed = personalization_config(run, {"finetune": {"epochs": 2}, "eval_batch_size": 100, "device": "cpu",
                                           "workers": 1, "personal_memory": "1GiB", "download": True})
    assert (changed.finetune.epochs, changed.eval_batch_size, changed.workers) == (2, 100, 1)
    assert (changed.personal_memory, changed.download) == ("1GiB", True)
    for key, value in (("lr", 0.3), ("seed", 3), ("personalize_clients", 5), ("eval_every", 2), ("finetune", 3)):
        with pytest.raises(UserError, match=rf"--set {key}: only finetune\.\*, eval_batch_size, workers and device "
                                            "may differ from the trained run"):
            personalization_config(run, {key: value})


def test_resume_ignores_runtime_keys_but_device():
    from fedbabu.runner import config_differences

    saved = _digits()
    elsewhere = _digits(workers=3, data_dir="/elsewhere", download=True, personal_memory="1GiB")
    assert config_differences(saved, elsewhere) == []
    assert config_differences(saved, _digits(device="auto")) == ["device"]
    assert config_differences(saved, _digits(eval_batch_size=10, lr=0.5)) == ["lr", "eval_batch_size"]


def test_compared_entries_share_the_data_keys_and_the_data_folder():
    from fedbabu.runner import variant_config

    base = _digits(algorithm="fedavg")
    assert variant_config(base, "fedbabu:lr=0.5:workers=1:device=auto").lr == 0.5
    for pair in ("seed=3", "num_clients=5", "data_dir=/elsewhere", "partition=iid"):
        with pytest.raises(UserError, match="must be the same for every entry"):
            variant_config(base, f"fedbabu:{pair}")


def test_a_finished_run_counts_as_trained_whatever_its_evaluation_and_runtime_keys():
    from fedbabu.reproduce import _without_free_keys, training_values

    run = _digits()
    other = _digits(eval_batch_size=10, finetune={"epochs": 1}, device="auto", workers=2, data_dir="/x",
                    download=True, personal_memory="1GiB")
    assert training_values(run) == training_values(other)
    assert training_values(run) != training_values(_digits(eval_every=2))
    assert _without_free_keys(run) == _without_free_keys(_digits(device="auto", personal_memory="1GiB"))
    assert _without_free_keys(run) != _without_free_keys(_digits(eval_batch_size=10))
