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
