"""What ``fedbabu analyze`` writes: ``analysis.json`` (every number), ``analysis.md``, ``clients.csv`` and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedbabu.files import atomic_write_text, write_csv, write_json
from fedbabu.results.plots import plot_distributions, plot_gains, plot_head_cosines, plot_spectra
from fedbabu.results.representation import RANK_TOLERANCE

CLIENT_COLUMNS = ("client", "train_size", "test_size", "classes", "label_entropy", "initial_accuracy",
                  "personalized_accuracy", "gain", "nearest_mean_global_euclidean", "nearest_mean_global_cosine",
                  "nearest_mean_personalized_euclidean", "nearest_mean_personalized_cosine",
                  "cka_global_personalized", "body_change", "head_change", "head_norm_cv", "head_mean_abs_cosine")

NOTE = ("Features are the body's outputs, taken in inference batches as evaluation takes them (a client's "
        "split, or the probe set, as one batch up to `eval_batch_size`). Batch norm uses batch statistics, as in "
        "the paper's code, so a feature depends on the batch it was computed in. Nearest class mean: each test "
        "feature goes to the closest mean of the client's own training features per class. Linear probe: a "
        "multinomial logistic regression on standardized global-body features of the analyzed clients' training "
        "data, tested on their test data. CKA is linear CKA on the probe images. Changes are "
        "||after - before|| / ||before|| from the model the client holds at the end of training to its "
        "personalized one.")


def _pct(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _reproduction_line(check: dict[str, Any]) -> str:
    if not check.get("checked"):
        return f"The personalization could not be checked against the run ({check.get('reason')})."
    where = f"`{check['reference']}/clients.csv`" if "reference" in check else "the run's `clients.csv`"
    return (f"Personalization re-derived with the run's own fine-tuning: {check['identical_clients']} of "
            f"{check['clients']} clients' accuracy curves identical to {where}.")


def analysis_markdown(a: dict[str, Any]) -> str:
    """The run's analysis as a short page: accuracy with and without the head, head geometry, CKA, spectrum."""
    nm, head, probe = a["nearest_mean"], a["head"], a["linear_probe"]
    cka, change, gain = a["cka"], a["change"], a["gain"]
    spectrum, settings = a["spectrum"], a["settings"]
    analyzed = a.get("analyzed_clients", a["clients"])
    group = a.get("client_group")
    if group is not None:
        which = ("held out, never trained" if group == "unseen" else "those the federation could train")
        clients = (f"{a['clients']} clients, of which the {analyzed} {group} ones ({which}; `--clients {group}`) "
                   "are analyzed")
    elif analyzed == a["clients"]:
        clients = f"{a['clients']} clients"
    else:
        clients = (f"{a['clients']} clients, of which the {analyzed} the run personalized (seeded sample, "
                   "`personalize_clients`) are analyzed")
    lines = [
        f"# Inside {a['label']}: {a['algorithm']} on {a['dataset']} ({a['model']}), seed {a['seed']}",
        "",
        f"{clients}; personalization: {a['personalization']}. {_reproduction_line(a['reproduces_run'])}",
        "",
        "| accuracy (%), mean ± std over clients | global body | personalized bodies |",
        "|---|---|---|",
        f"| with the model's own head | {_pct(a['initial_accuracy'])} | {_pct(a['personalized_accuracy'])} |",
        f"| nearest class mean, Euclidean | {_pct(nm['global']['euclidean'])} | "
        f"{_pct(nm['personalized']['euclidean'])} |",
        f"| nearest class mean, cosine | {_pct(nm['global']['cosine'])} | {_pct(nm['personalized']['cosine'])} |",
        f"| linear probe on {'all' if analyzed == a['clients'] else 'the analyzed'} clients "
        f"(test) | {100 * probe['test_accuracy']:.2f} | |",
        "",
        f"Linear probe: {probe['train_samples']:,} training and {probe['test_samples']:,} test features, "
        f"train accuracy {100 * probe['train_accuracy']:.2f}%, C = {probe['C']}, "
        f"{'converged' if probe['converged'] else 'not converged'} within {probe['max_iter']} iterations.",
        "",
        "| head | norm CV (std/mean of class norms) | mean abs cosine between classes |",
        "|---|---|---|",
        f"| global | {_num(head['global']['norm_cv'])} | {_num(head['global']['mean_abs_cosine'])} |",
        f"| personalized (mean ± std over clients) | {_num(head['personalized']['norm_cv']['mean'])} ± "
        f"{_num(head['personalized']['norm_cv']['std'])} | {_num(head['personalized']['mean_abs_cosine']['mean'])} ± "
        f"{_num(head['personalized']['mean_abs_cosine']['std'])} |",
        "",
        f"Personalization moves the body by {_num(change['body']['mean'], 4)} ± {_num(change['body']['std'], 4)} "
        f"and the head by {_num(change['head']['mean'], 4)} ± {_num(change['head']['std'], 4)} (relative L2).",
        "",
        f"Linear CKA, global body against each personalized body: {_num(cka['global_vs_personalized']['mean'])} ± "
        f"{_num(cka['global_vs_personalized']['std'])}; between the personalized bodies of "
        f"{len(cka['between_clients']['clients'])} sampled clients: {_num(cka['between_clients']['mean'])} "
        f"(on {settings['probe_size']} probe images).",
        "",
        f"Feature spectrum of the global body: effective rank {_num(spectrum['effective_rank'], 1)} of "
        f"{settings['feature_dim']} dimensions; {spectrum['rank']} singular values above {RANK_TOLERANCE:g} of the "
        "largest (dimensions in use).",
        "",
        f"Who gains: correlation of the personalization gain with the number of classes "
        f"{_num(gain['correlation_with_classes'], 2)}, with the label entropy "
        f"{_num(gain['correlation_with_label_entropy'], 2)}.",
        "",
        NOTE,
        "",
        f"Analysis time: {a['wall_time_s']:.1f} s.",
        "",
        "![head cosines](head_cosine.png)", "", "![CKA](cka.png)", "", "![gain](gain.png)", "",
        "![spectrum](spectrum.png)", "",
    ]
    return "\n".join(lines)


def _write_plots(folder: Path, analyses: list[dict[str, Any]]) -> None:
    def per_client(a: dict[str, Any], key: str) -> np.ndarray:
        return np.array([row[key] for row in a["per_client"]], dtype=np.float64)

    plot_head_cosines([(a["label"], np.array(a["head"]["global"]["cosine"]),
                        np.array(a["head"]["personalized"]["mean_cosine"])) for a in analyses],
                      folder / "head_cosine.png")
    plot_distributions([(a["label"], per_client(a, "cka_global_personalized")) for a in analyses],
                       folder / "cka.png", "linear CKA, global vs personalized body", "how far personalization "
                       "moves each client's representation")
    plot_gains([(a["label"], per_client(a, "label_entropy"), per_client(a, "gain")) for a in analyses],
               folder / "gain.png")
    plot_spectra([(a["label"], np.array(a["spectrum"]["singular_values"])) for a in analyses],
                 folder / "spectrum.png")


def write_analysis(folder: Path, analysis: dict[str, Any]) -> None:
    """One run's analysis files; ``clients.csv`` holds the per-client numbers of ``analysis.json``."""
    write_json(folder / "analysis.json", analysis)
    write_csv(folder / "clients.csv", list(CLIENT_COLUMNS),
              [[row[k] for k in CLIENT_COLUMNS] for row in analysis["per_client"]])
    _write_plots(folder, [analysis])
    atomic_write_text(folder / "analysis.md", analysis_markdown(analysis))


COMPARISON_COLUMNS = (
    ("run", lambda a: a["label"]),
    ("algorithm", lambda a: a["algorithm"]),
    ("personalized %", lambda a: f"{100 * a['personalized_accuracy']['mean']:.2f}"),
    ("NCM global %", lambda a: f"{100 * a['nearest_mean']['global']['euclidean']['mean']:.2f}"),
    ("NCM personalized %", lambda a: f"{100 * a['nearest_mean']['personalized']['euclidean']['mean']:.2f}"),
    ("probe %", lambda a: f"{100 * a['linear_probe']['test_accuracy']:.2f}"),
    ("head norm CV", lambda a: _num(a["head"]["global"]["norm_cv"])),
    ("head mean abs cos", lambda a: _num(a["head"]["global"]["mean_abs_cosine"])),
    ("body change", lambda a: _num(a["change"]["body"]["mean"], 4)),
    ("head change", lambda a: _num(a["change"]["head"]["mean"], 4)),
    ("CKA global-personalized", lambda a: _num(a["cka"]["global_vs_personalized"]["mean"])),
    ("CKA between clients", lambda a: _num(a["cka"]["between_clients"]["mean"])),
    ("effective rank", lambda a: _num(a["spectrum"]["effective_rank"], 1)),
    ("dimensions in use", lambda a: str(a["spectrum"]["rank"])),
)
"""The comparison's columns: NCM is nearest-class-mean accuracy (Euclidean); head columns are the global head's."""


def comparison_rows(analyses: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The comparison table as header and rows of text, for the markdown page and the terminal."""
    return [name for name, _ in COMPARISON_COLUMNS], [[cell(a) for _, cell in COMPARISON_COLUMNS] for a in analyses]


def write_analysis_comparison(folder: Path, analyses: list[dict[str, Any]]) -> None:
    """Several runs side by side: one table (``comparison.md``, ``comparison.csv``) and overlaid plots."""
    header, rows = comparison_rows(analyses)
    write_csv(folder / "comparison.csv", header, rows)
    _write_plots(folder, analyses)
    lines = ["# Inside the representation: " + ", ".join(a["label"] for a in analyses), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "NCM: nearest class mean (Euclidean) on each client's test data, with the global body or the "
              "client's personalized body; probe: linear probe of the global body; head columns describe the "
              "global head; changes and CKA are from the model a client holds at the end of training to its "
              "personalized one. Each run's own folder has its full `analysis.md`.", "", NOTE, "",
              "![head cosines](head_cosine.png)", "", "![CKA](cka.png)", "", "![gain](gain.png)", "",
              "![spectrum](spectrum.png)", ""]
    atomic_write_text(folder / "comparison.md", "\n".join(lines))
