"""MkDocs hook: the configuration reference, generated at build time from the one configuration object.

``docs/configuration.md`` holds the prose and a marker line, ``<!-- config-reference -->``; this hook
imports :mod:`fedbabu.config` and :mod:`fedbabu.algorithms` (which registers every algorithm with its
settings model) and replaces the marker with tables of every ``Config`` field, every ``finetune.*``
field and every algorithm's own section, each key with its type, default and description. A
description is the field's attribute docstring (``use_attribute_docstrings``), else an entry of
``DESCRIPTIONS`` below; a key with neither, or an entry of ``DESCRIPTIONS`` for a key that no longer
exists, is a warning, which fails ``mkdocs build --strict``. So the page cannot drift from the code.
"""

from __future__ import annotations

import logging
import types
import typing
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.config_reference")

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"

DESCRIPTIONS: dict[str, str] = {
    # Config fields that have no attribute docstring in fedbabu/config.py (from the README's old table).
    "algorithm": "The algorithm: `fedavg`, `fedbabu`, the baselines and the head family (see "
                 "[Algorithms](algorithms.md)); each algorithm's own settings are a section named after it "
                 "(`fedprox.mu`), listed below.",
    "dataset": "`digits`, `fmnist`, `cifar10`, `cifar100`, `hf` (a Hugging Face dataset, the `hf.*` keys; see "
               "[Datasets](datasets.md)) (`custom`: data given in code through the Python API).",
    "data_dir": "Where to look for the data first (then `$FEDBABU_DATA`, then `~/.cache/fedbabu`).",
    "download": "Fetch the official archive (md5-verified) when the data is not found.",
    "model": "`4convnet`, `mobilenet`, `resnet18`, `resnet50`, `digitcnn`; `auto` = `digitcnn` for digits, "
             "else `4convnet` (`custom`: a network given in code).",
    "head_init": "`default` (nn.Linear's), `orthogonal`, `zeros` (refused by FedBABU: a zero head that never "
                 "trains gives the body no gradient).",
    "num_clients": "Clients in the federation.",
    "partition": "`shards` (the paper's), `dirichlet`, `iid`; `natural`: one client per value of "
                 "`hf.partition_column`, or client ids given in code.",
    "shards_per_client": "Shards per client of the `shards` partition (s counts shards, not classes).",
    "dirichlet_alpha": "Concentration of the `dirichlet` partition.",
    "samples_per_client": "Cap on each client's training set (smaller shards / subsampled clients); test sets "
                          "keep the dataset's test:train ratio.",
    "rounds": "Communication rounds (0 = only evaluate and fine-tune the initial model).",
    "client_fraction": "Fraction f of clients sampled per round (at least one).",
    "local_epochs": "tau, local epochs per round.",
    "batch_size": "Local SGD batch size.",
    "lr": "Local SGD learning rate (optimizer re-created every round unless the algorithm keeps it).",
    "momentum": "Local SGD momentum.",
    "weight_decay": "Local SGD weight decay.",
    "lr_milestones": "Rounds at which the `step` schedule multiplies the lr by `lr_decay`; unset = 50% and "
                     "75% of the rounds (the paper's).",
    "lr_decay": "The schedule's factor: per milestone (`step`) or per round (`exponential`).",
    "augment": "Random crop 32 (padding 4) + horizontal flip: `auto` = on for CIFAR, off otherwise.",
    "eval_every": "Rounds between evaluations of the global model on the clients' test sets (0 = never).",
    "finetune": "The personalization every client runs after the last round (its keys below).",
    "seed": "Model init, partition, client sampling and every client's batches.",
    "device": "`cpu`, `cuda`, `auto` (CUDA when torch sees it); `cuda` without a CUDA device is refused.",
    "workers": "Worker processes (`auto`: one per core on CPU; in-process on CUDA); changes speed only.",
    "precision": "`bf16` autocast; faster only where the hardware computes bf16 (see "
                 "[Engine and speed](engine.md)); a CPU that emulates it warns.",
    "channels_last": "NHWC memory format (`auto`: on for CPU with the sequential executor, where it pays).",
    "executor": "How a round's clients train in the simulator: `sequential` (the worker pool) or `vectorized` "
                "(all at once with `torch.func`, for GPUs); `auto` = vectorized on CUDA for algorithms whose "
                "client update is plain SGD, else sequential.",
    "checkpoint_every": "Rounds between checkpoints (0 = only at the start and the end); see "
                        "[Checkpoints and faults](checkpoints.md).",
    "client_failure_rate": "Probability that each sampled client drops out of a round (seeded by seed and round).",
    "max_update_norm": "An update moving the shared parameters by more than this L2 norm is rejected (`null` "
                       "disables the check).",
    "finetune.part": "`head`, `body` or `full` fine-tuning for personalization.",
    "finetune.epochs": "Fine-tuning epochs, all through one SGD optimizer (the authors' evaluation).",
    "finetune.lr": "Fine-tuning learning rate.",
    "finetune.momentum": "Fine-tuning momentum.",
    "finetune.weight_decay": "Fine-tuning weight decay.",
    "finetune.batch_size": "Fine-tuning batch size.",
    # Algorithm settings without an attribute docstring in their algorithm's file.
    "fedetf.etf_epochs": "Own protocol: epochs of fitting M (plain SGD) in each alternation (the authors': 3).",
    "fedetf.projection_epochs": "Own protocol: epochs of fitting the projection in each alternation (the "
                                "authors': 3).",
    "fedetf.projection_momentum": "Own protocol: momentum of fitting the projection (the authors': 0.9).",
    "fedetf.projection_weight_decay": "Own protocol: weight decay of fitting the projection (the authors': 5e-4).",
}
"""Descriptions of keys whose field has no attribute docstring; a docstring, where there is one, wins."""

NOTES: dict[str, str] = {
    "eval_clients": "With N, the same N clients every evaluation round, in both engines; see "
                    "[Large federations](large-federations.md).",
    "personalize_clients": "With N, `clients.csv` and the accuracies over clients cover only them, and "
                           "`summary.json` (`personalized_clients`) and `report.md` say so. Both samples come "
                           "from one seeded order of the clients, so the smaller lies inside the larger.",
    "eval_batch_size": "Otherwise the fewest near-equal batches; batch norm uses batch statistics, as in the "
                       "paper's code.",
    "precision": "On CPUs without native bf16 PyTorch emulates it, much slower than fp32 (measured about 8x: 58 vs "
                 "481 img/s for 4convNet on one AVX2 core); such a CPU (read from `/proc/cpuinfo` on Linux) "
                 "warns with one line when a run starts.",
    "personal_memory": "A number of bytes or a size such as `512MiB` or `2GiB` (KiB = 1024 B, KB = 1000 B).",
}
"""Sentences added after a key's description."""

SKIPPED = {"settings"}
"""``Config`` fields that are not keys of a config file (the algorithms' sections are listed by algorithm)."""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" if isinstance(value, str) else f"`{value!r}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if annotation is type(None):
        return "`null`"
    if origin is not None:
        inner = ", ".join(_type_name(arg).strip("`") for arg in args)
        return f"`{getattr(origin, '__name__', str(origin))}[{inner}]`"
    if annotation is Path:
        return "path"
    return f"`{getattr(annotation, '__name__', str(annotation))}`"


def _bounds(info: Any) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for item in info.metadata:
        for attr, sign in signs.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return f" ({', '.join(parts)})" if parts else ""


def _default(info: Any) -> str:
    value = info.get_default(call_default_factory=True)
    if hasattr(value, "model_dump"):
        return "section"
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _description(key: str, info: Any, used: set[str]) -> str:
    text = info.description
    if not text:
        text = DESCRIPTIONS.get(key)
        if text is not None:
            used.add(key)
    if not text:
        log.warning("configuration reference: %s has no attribute docstring and no entry in "
                    "docs/hooks/config_reference.py DESCRIPTIONS", key)
        text = ""
    if text and text.rstrip()[-1] not in ".!?)":
        text = text.rstrip() + "."
    if text:
        text = text[0].upper() + text[1:]
    if key in NOTES:
        used.add(f"note:{key}")
        text = f"{text.rstrip()} {NOTES[key]}"
    return _cell(text)


def _table(prefix: str, model: type, used: set[str], skip: set[str] = frozenset(),
           roles: dict[str, str] | None = None) -> list[str]:
    """A table of ``model``'s fields; with ``roles`` (``Config.roles()``) a column says each key's role."""
    rows = ["| key | type | default | role | description |", "|---|---|---|---|---|"] if roles is not None else \
        ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = prefix + (info.alias or name)
        role = f" {roles[name]} |" if roles is not None else ""
        rows.append(f"| `{key}` | {_type_name(info.annotation)}{_bounds(info)} | {_default(info)} |{role} "
                    f"{_description(key, info, used)} |")
    return rows


def _roles_legend(roles: dict[str, str]) -> list[str]:
    """What each role means (``fedbabu.config.ROLES``), one bullet each."""
    return [f"- **{role}**: {_cell(text)}." for role, text in roles.items()]


def reference() -> str:
    """The generated tables, as Markdown."""
    import fedbabu.algorithms  # noqa: F401  (registers every algorithm's settings)
    from fedbabu.config import ROLES, Config, DpConfig, FinetuneConfig, HfConfig, registered_algorithms

    used: set[str] = set()
    lines = ["## Shared keys", "", "Every `Config` field, in the order of `fedbabu/config.py`, with its role: what "
             "the key is for, which decides where it may differ from a run (resume, `personalize`, `compare`, "
             "`reproduce`):", ""]
    lines += [*_roles_legend(ROLES), ""]
    lines += _table("", Config, used, SKIPPED, Config.roles())
    lines += ["", "## `finetune.*`", "", FinetuneConfig.__doc__.strip() + " Every key has the role "
              f"*{Config.roles()['finetune']}*.", ""]
    lines += _table("finetune.", FinetuneConfig, used)
    lines += ["", "## `dp.*`", "", " ".join(DpConfig.__doc__.split("\n\n")[0].split()) + " Every key has the role "
              f"*{Config.roles()['dp']}*; what the guarantee covers is on [Privacy](privacy.md).", ""]
    lines += _table("dp.", DpConfig, used)
    lines += ["", "## `hf.*`", "", " ".join(HfConfig.__doc__.split("\n\n")[0].split()) + " Every key has the role "
              f"*{Config.roles()['hf']}*; sources and commands are on [Datasets](datasets.md).", ""]
    lines += _table("hf.", HfConfig, used)
    lines += ["", "## Each algorithm's own section", "",
              "A section named after the algorithm (`fedprox: {mu: 0.5}` in YAML, `--set fedprox.mu=0.5`, "
              "`fedprox:mu=0.5` as a `compare` entry). A run reads only its own algorithm's section. "
              "*Evaluation keys* change only how clients are evaluated at the end, never the training: like "
              "`finetune.*` they may differ in `fedbabu personalize` and do not make a finished run stale.", ""]
    for name, settings in registered_algorithms().items():
        lines += [f"### `{name}`", ""]
        if not settings.model_fields:
            lines += ["No settings of its own.", ""]
            continue
        lines += _table(f"{name}.", settings, used)
        lines.append("")
        if settings.evaluation_keys:
            keys = ", ".join(f"`{name}.{key}`" for key in settings.evaluation_keys)
            lines += [f"Evaluation keys: {keys}.", ""]
        if settings.legacy_keys:
            old = ", ".join(f"`{old}`" for old in settings.legacy_keys)
            lines += [f"Older run folders' flat names still load: {old}.", ""]
        for option, values in settings.training_options.items():
            shown = ", ".join(f"`{key}: {'null' if value is None else value}`" for key, value in values.items())
            lines += [f"`{name}.training: {option}` sets {shown} (written over the config's values when the "
                      f"config is built, so the run's `config.yaml` shows them).", ""]
    stale = {key for key in DESCRIPTIONS if key not in used} | {
        f"note:{key}" for key in NOTES if f"note:{key}" not in used}
    for key in sorted(stale):
        log.warning("configuration reference: docs/hooks/config_reference.py describes %s, which is no longer "
                    "a key without a docstring; remove the entry", key)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        log.warning("configuration reference: %s lacks the marker %s", PAGE, MARKER)
        return markdown
    return markdown.replace(MARKER, reference())
