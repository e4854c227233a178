"""The report over the paper matrix's cells: a Markdown table, a figure, a flat summary, and the
checks the comparison is meant to pass, stated with the numbers that pass or fail them."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from pipeline.errors import UserError
from paper import DATASETS, METHODS, fmt
from pipeline.run.config import AUTO_LABEL_SCALES, AUTO_OPTIMIZER

METHOD_NAMES = {"random": "random real", "label_solve": "Label Solve", "kip": "KIP", "kip_labels": "KIP + labels"}
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "digits": "digits (scikit-learn)"}
KERNEL_ORDER = ("FC NTK", "FC NNGP", "RBF", "ConvNet-RF NNGP")


CONV_KERNEL = "ConvNet-RF NNGP"
SOURCE_PARTS = ("paper", "table", "row")
KIP_ROWS = ("kip", "kip_labels")


@dataclass(frozen=True)
class Goal:
    """One of issue 37's goals: the cell's KIP row chosen on validation reaches `accuracy` on the test
    split, by KRR with the cell's kernel (`measure: krr`) or by finite networks trained on it (`nn`)."""

    dataset: str
    kernel: str
    images: int
    measure: str
    accuracy: float
    why: str

    @property
    def name(self) -> str:
        return f"{self.dataset}_{_slug(self.kernel)}_{self.images}_{self.measure}"


_C1, _C2 = "[C] Table 1 (KIP FC / KIP ConvNet)", "[C] Table 2 (KIP ConvNet sets, finite ConvNet)"
GOALS: tuple[Goal, ...] = (
    Goal("mnist", "FC NTK", 10, "krr", 0.90, "kept at 10 images (the published KIP FC is 85.5 %)"),
    Goal("mnist", "FC NTK", 100, "krr", 0.972, _C1),
    Goal("mnist", "FC NTK", 500, "krr", 0.984, _C1),
    *(Goal("mnist", CONV_KERNEL, n, "krr", a, _C1) for n, a in ((10, 0.965), (100, 0.991), (500, 0.995))),
    *(Goal("fashion_mnist", CONV_KERNEL, n, "krr", a, _C1) for n, a in ((10, 0.767), (100, 0.888), (500, 0.910))),
    *(Goal("mnist", CONV_KERNEL, n, "nn", a, _C2) for n, a in ((10, 0.901), (100, 0.975), (500, 0.984))),
    *(Goal("fashion_mnist", CONV_KERNEL, n, "nn", a, _C2) for n, a in ((10, 0.738), (100, 0.868), (500, 0.878))),
)
"""Issue 37's goals ([C] is ../shared/ANCHORS.md's source: Nguyen, Novak, Xiao, Lee, NeurIPS 2021).
A missing cell counts as not met."""
CPU_MINUTES_GOAL = {10: 60.0, 100: 60.0, 500: 180.0}
"""CPU minutes allowed per KIP run (either row), by support size."""
CORRUPTION_GOAL = Goal("mnist", "FC NTK", 100, "krr", 0.02,
                       "KIP from 90 %-corrupted images within 2 points of clean KIP (issue 37's privacy row)")
"""The corrupted-support goal: `accuracy` is the largest gap allowed, as a fraction, between the
corrupted cell's chosen row and the clean cell's (same dataset, kernel and size)."""
CORRUPTION_GOAL_FRACTION = 0.9


def corruption(cell: Mapping[str, Any]) -> float:
    """The fraction of every support image's pixels a cell's KIP runs froze as noise (0: a clean cell).
    Such a cell is the privacy row's variant of the clean cell of the same dataset, kernel and size:
    it is kept out of the main table, the figure and the clean cells' checks."""
    config = cell.get("config") or {}
    return max(float((config.get(name) or {}).get("corruption", 0.0)) for name in KIP_ROWS)


def chosen_row(cell: Mapping[str, Any]) -> str:
    """The KIP row a cell reports against the goals: the better one on the validation split (never the
    test split, which is read once per support, for the table)."""
    methods = cell["methods"]
    scores = {name: (methods[name].get("krr_val") or {}).get("mean") for name in KIP_ROWS}
    known = {name: score for name, score in scores.items() if score is not None}
    return max(reversed(KIP_ROWS), key=lambda name: known.get(name, -1.0))


def checks(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """KIP (its better row) beats Label Solve and random at every size, per dataset and kernel, by KRR;
    networks trained on each KIP support (both label modes) beat networks on random real subsets; each
    goal of GOALS and CPU_MINUTES_GOAL, met or missed, with its number; and which KIP runs kept their
    last step (the best validation step being the last one says the step budget was too short)."""
    failures, network_failures = [], []
    clean = [cell for cell in cells if not corruption(cell)]
    for cell in clean:
        methods = cell["methods"]
        kip_best = max(methods["kip"]["krr"]["mean"], methods["kip_labels"]["krr"]["mean"])
        for rival in ("label_solve", "random"):
            if not kip_best > methods[rival]["krr"]["mean"]:
                failures.append(f"{cell['key']}: KIP {kip_best:.4f} <= {rival} {methods[rival]['krr']['mean']:.4f}")
        random_nn = methods["random"]["nn"]["mean"]
        for name in KIP_ROWS:
            nn = methods[name]["nn"]["mean"]
            if nn is None or random_nn is None or not nn > random_nn:
                shown = [f"{100 * v:.2f} %" if v is not None else "missing" for v in (nn, random_nn)]
                network_failures.append(f"{cell['key']}: {METHOD_NAMES[name]} networks {shown[0]} <= random real {shown[1]}")
    goals = {}
    for goal in GOALS:
        cell = _find(clean, goal.dataset, goal.kernel, goal.images)
        row = value = None
        if cell is not None:
            row = chosen_row(cell)
            value = cell["methods"][row][goal.measure]["mean"]
        goals[goal.name] = {"row": row, "accuracy": value, "goal": goal.accuracy,
                            "gap": None if value is None else round(value - goal.accuracy, 4),
                            "met": value is not None and value >= goal.accuracy}
    cpu = []
    for cell in cells:
        limit = CPU_MINUTES_GOAL.get(cell["images"])
        for name in KIP_ROWS:
            minutes = round(cell["methods"][name]["cpu_seconds"] / 60, 1)
            if limit is not None and minutes > limit:
                cpu.append(f"{cell['key']}: {METHOD_NAMES[name]} {minutes:.1f} CPU min > {limit:.0f}")
    short = [f"{cell['key']}: {METHOD_NAMES[name]} kept step {cell['methods'][name]['kept_step']} of "
             f"{cell['methods'][name]['steps']}" for cell in cells for name in KIP_ROWS
             if cell["methods"][name].get("kept_step") is not None
             and cell["methods"][name]["kept_step"] == cell["methods"][name].get("steps")]
    return {"kip_beats_baselines": not failures, "failures": failures,
            "networks_beat_random": not network_failures, "network_failures": network_failures,
            "goals": goals, "corruption": corruption_check(cells), "cpu_within_goal": not cpu, "cpu_failures": cpu,
            "budget_short": short, "cells": len(clean), "corrupted_cells": len(cells) - len(clean)}


def corruption_check(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """CORRUPTION_GOAL: the corrupted cell's KIP row chosen on validation against the clean cell's,
    by KRR on the test split; a missing cell counts as not met."""
    goal = CORRUPTION_GOAL
    found = [c for c in cells if c["dataset"] == goal.dataset and c["kernel_name"] == goal.kernel
             and c["images"] == goal.images]
    clean = next((c for c in found if not corruption(c)), None)
    corrupted = next((c for c in found if corruption(c) == CORRUPTION_GOAL_FRACTION), None)
    check: dict[str, Any] = {"cell": None if corrupted is None else corrupted["key"],
                             "clean_cell": None if clean is None else clean["key"], "allowed_gap": goal.accuracy,
                             "met": False}
    if clean is None or corrupted is None:
        return check
    ours, theirs = chosen_row(corrupted), chosen_row(clean)
    accuracy, clean_accuracy = (c["methods"][row]["krr"]["mean"] for c, row in ((corrupted, ours), (clean, theirs)))
    gap = round(clean_accuracy - accuracy, 4)
    return {**check, "row": ours, "accuracy": accuracy, "clean_row": theirs, "clean_accuracy": clean_accuracy,
            "gap": gap, "met": gap <= goal.accuracy}


def published_entries(paper: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The `paper:` entries, each required to name its source as {paper, table, row}, its kernel, and
    how its conditions differ from the cell's (`conditions`): a number whose source cannot be named is
    not shown (an empty cell beats one filled from memory). `measure` is krr (default) or nn."""
    entries = list(paper or [])
    for i, entry in enumerate(entries):
        source = entry.get("source") if isinstance(entry, Mapping) else None
        if not isinstance(source, Mapping) or any(not str(source.get(k) or "").strip() for k in SOURCE_PARTS):
            raise UserError(f"paper[{i}].source={source!r} is not allowed; expected a mapping naming paper, table and row")
        for key in ("dataset", "images", "method", "kernel", "accuracy", "conditions"):
            if key not in entry:
                raise UserError(f"paper[{i}] lacks {key}; expected dataset, images, method, kernel, accuracy, conditions, "
                                "source")
        if entry.get("measure", "krr") not in ("krr", "nn"):
            raise UserError(f"paper[{i}].measure={entry.get('measure')!r} is not allowed; expected krr|nn")
    return entries


def summary(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Flat metrics for `dvc metrics show` and MLflow: <dataset>.<kernel>.<images>.<method>.krr (and .nn)."""
    flat: dict[str, Any] = {}
    for cell in cells:
        prefix = f"{cell['dataset']}.{_slug(cell['kernel_name'])}.{cell['images']}"
        if corruption(cell):
            prefix += f".corrupted{round(100 * corruption(cell))}"
        for method, result in cell["methods"].items():
            flat[f"{prefix}.{method}.krr"] = result["krr"]["mean"]
            if result["nn"]["mean"] is not None:
                flat[f"{prefix}.{method}.nn"] = result["nn"]["mean"]
    flat["cpu_minutes_total"] = round(_total(cells, "cpu") / 60, 1)
    flat["wall_minutes_total"] = round(_total(cells, "wall") / 60, 1)
    return flat


def table_markdown(cells: Sequence[Mapping[str, Any]], paper: Iterable[Mapping[str, Any]], verdict: Mapping[str, Any]) -> str:
    published = _published(paper)
    out = ["# The KIP paper's comparison, reproduced", "",
           "Generated by `dvc repro` in `experiments/paper/` (settings: `experiments/paper/params.yaml`, KIP",
           "learning rates and steps chosen on the validation split by `benchmarks/select_kip_settings.py`).",
           "KRR test accuracy on the full test split (10k images) with the cell's kernel; KRR val: the same",
           "support on the validation split (held out of the training images, never a KIP target), which is",
           "what settings were chosen on. " + _network_sentence(cells),
           "KIP runs one seed per cell; random subsets and Label Solve are mean ± std over their seeds.", ""]
    not_run = verdict.get("networks_not_run") or []
    if not_run:
        out += [f"**Interim report:** the network stages of {len(not_run)} of {verdict['cells'] + verdict.get('corrupted_cells', 0)} cells have not run yet "
                f"({', '.join(not_run)}); their NN columns are empty and the network check counts them as missing. "
                "`dvc repro` in experiments/paper runs them and writes the final report.", ""]
    out += ["## Checks", ""]
    out += _check_lines(verdict["kip_beats_baselines"], verdict["failures"],
                        f"- KIP beats Label Solve and random real images by KRR in every cell ({verdict['cells']} cells): yes.",
                        "- KIP beats Label Solve and random real images in every cell: **no**")
    out += _check_lines(verdict["networks_beat_random"], verdict["network_failures"],
                        f"- Networks trained on KIP supports, fixed and learned labels alike, beat networks trained on random "
                        f"real images in every cell ({verdict['cells']} cells): yes.",
                        "- Networks on KIP supports beat networks on random real images in every cell: **no**")
    for goal, check in zip(GOALS, verdict["goals"].values()):
        what = "KRR" if goal.measure == "krr" else "finite networks"
        if check["accuracy"] is None:
            verdict_text = "missing: **not met**"
        else:
            gap = 100 * check["gap"]
            verdict_text = (f"{100 * check['accuracy']:.2f} % ({METHOD_NAMES[check['row']]}, the row chosen on validation), "
                            + ("met" if check["met"] else f"**not met** by {-gap:.2f} points"))
        out.append(f"- {DATASET_NAMES.get(goal.dataset, goal.dataset)}, {goal.kernel}, {goal.images} images, {what}: goal "
                   f"{100 * goal.accuracy:.1f} % ({goal.why}): {verdict_text}.")
    limits = ", ".join(f"{limit:.0f} at {images}" for images, limit in CPU_MINUTES_GOAL.items())
    within = f"- Every KIP run within its CPU minutes ({limits} images)"
    out += _check_lines(verdict["cpu_within_goal"], verdict["cpu_failures"], f"{within}: yes.", f"{within}: **no**")
    if verdict["budget_short"]:
        out.append(f"- KIP runs whose best validation step was their last (the step budget may be too short): "
                   f"{len(verdict['budget_short'])}:")
        out += [f"  - {line}" for line in verdict["budget_short"]]
    total_cpu, total_wall = _total(cells, "cpu") / 60, _total(cells, "wall") / 60
    out += [f"- Compute: {total_cpu:.0f} CPU minutes, {total_wall:.0f} minutes of wall time inside the stages "
            "(KIP and KRR per cell, networks per support, random-subset networks once per dataset and size).", ""]
    out += _corruption_line(verdict["corruption"])
    for dataset in _datasets(cells):
        rows = sorted((c for c in cells if c["dataset"] == dataset and not corruption(c)),
                      key=lambda c: (_kernel_rank(c["kernel_name"]), c["images"]))
        if not rows:
            continue
        out += [f"## {DATASET_NAMES.get(dataset, dataset)}", "",
                "| kernel | images | method | KRR test accuracy (%) | KRR val (%) | NN test accuracy (%) | NN labels, optimizer "
                "| paper KRR (%) | paper NN (%) | CPU min (method + NN) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for cell in rows:
            for method in METHODS:
                result = cell["methods"][method]
                key = (dataset, cell["images"], method, cell["kernel_name"])
                out.append(f"| {cell['kernel_name']} | {cell['images']} | {METHOD_NAMES[method]} | {fmt(result['krr'])} "
                           f"| {fmt(result.get('krr_val', {}))} | {fmt(result['nn'])} | {_settings_text(result)} "
                           f"| {published.get((*key, 'krr'), '')} | {published.get((*key, 'nn'), '')} | {_minutes(result)} |")
        out.append("")
    sources = _sources(paper, cells)
    if sources:
        out += ["Paper columns, by source (each entry in `experiments/paper/params.yaml` names its table and row, and",
                "how its conditions differ from the cell's):", ""]
        out += [f"- {line}" for line in sources]
        out.append("")
    out += _corruption_section(cells)
    out += _privacy_section(cells)
    out += ["Each cell's KIP + labels support beside the real images it started from: "
            "`results/supports/<cell>/kip_labels.png`.", ""]
    out += ["Paper columns: test accuracy as published, only for the row's own kernel and only where",
            "`experiments/paper/params.yaml` names the source (paper, table, row); an empty cell means no",
            "number could be checked against a source. CPU minutes are all threads of the stage's",
            "process: the method (KRR scoring; KIP or Label Solve runs) + its networks. The random-subset",
            "networks do not depend on the kernel: they are trained once per dataset, size and train settings",
            "and shown in the rows of every kernel that trains its networks with the same settings.", ""]
    return "\n".join(out)


def figure(cells: Sequence[Mapping[str, Any]], paper: Iterable[Mapping[str, Any]]) -> Figure:
    """KRR test accuracy against support size, one panel per dataset and kernel, one line per method."""
    kernels = [k for k in KERNEL_ORDER if any(c["kernel_name"] == k for c in cells)]
    datasets = _datasets(cells)
    fig = Figure(figsize=(4.0 * max(1, len(kernels)), 3.5 * len(datasets)), dpi=100)
    axes = fig.subplots(len(datasets), max(1, len(kernels)), squeeze=False, sharex=True)
    entries = published_entries(paper)
    for row, dataset in enumerate(datasets):
        for col, kernel in enumerate(kernels):
            ax = axes[row][col]
            chosen = sorted((c for c in cells if c["dataset"] == dataset and c["kernel_name"] == kernel
                             and not corruption(c)),
                            key=lambda c: c["images"])
            for method in METHODS:
                xs = [c["images"] for c in chosen]
                ys = [100 * c["methods"][method]["krr"]["mean"] for c in chosen]
                ax.plot(xs, ys, marker="o", label=METHOD_NAMES[method])
            for entry in entries:
                if entry["dataset"] != dataset or entry["kernel"] != kernel or entry.get("measure", "krr") != "krr":
                    continue
                kip_point = entry["method"] in KIP_ROWS
                ax.plot([entry["images"]], [entry["accuracy"]], marker="x" if kip_point else "+", color="black",
                        linestyle="none", markersize=9, label="published KIP" if kip_point else "published Label Solve")
            ax.set_xscale("log")
            ax.set_xticks([10, 100, 500], ["10", "100", "500"])
            ax.minorticks_off()
            ax.set_title(f"{DATASET_NAMES.get(dataset, dataset)}, {kernel}")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("KRR test accuracy (%)")
            if row == len(datasets) - 1:
                ax.set_xlabel("support images")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _check_lines(passed: bool, failures: Sequence[str], yes: str, no: str) -> list[str]:
    """A check's line: `yes`, or `no` with how many failed, then one indented line per failure."""
    return [yes] if passed else [f"{no}, in {len(failures)}:", *(f"  - {failure}" for failure in failures)]


def _corruption_line(check: Mapping[str, Any]) -> list[str]:
    goal = CORRUPTION_GOAL
    what = (f"- {DATASET_NAMES.get(goal.dataset, goal.dataset)}, {goal.kernel}, {goal.images} images, KIP from noise with "
            f"{100 * CORRUPTION_GOAL_FRACTION:.0f} % of every image's pixels noise and never learned, within "
            f"{100 * goal.accuracy:.0f} points of clean KIP by KRR (each cell's row chosen on validation)")
    if "gap" not in check:
        return [f"{what}: missing (needs a clean and a corrupted cell): **not met**."]
    verdict = "met" if check["met"] else f"**not met** by {100 * (check['gap'] - goal.accuracy):.2f} points"
    return [f"{what}: {100 * check['accuracy']:.2f} % ({METHOD_NAMES[check['row']]}) against {100 * check['clean_accuracy']:.2f} % "
            f"({METHOD_NAMES[check['clean_row']]}), {100 * check['gap']:.2f} points apart: {verdict}."]


def _corruption_section(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The corrupted cells' KIP rows beside their clean cell's (same dataset, kernel and size)."""
    corrupted = [c for c in cells if corruption(c)]
    if not corrupted:
        return []
    out = ["## Corrupted supports (the KIP paper's privacy experiment)", "",
           "KIP started from noise images of which a fixed fraction of every image's pixels stays noise, never learned "
           "(`distill.init: noise`, `distill.corruption`); beside it the clean cell (real-image start, nothing frozen).", "",
           "| cell | corrupted pixels | method | KRR test accuracy (%) | KRR val (%) | NN test accuracy (%) | steps "
           "| CPU min (method + NN) |", "|---|---|---|---|---|---|---|---|"]
    for cell in sorted(corrupted, key=lambda c: (c["dataset"], _kernel_rank(c["kernel_name"]), c["images"], c["key"])):
        clean = _find([c for c in cells if not corruption(c)], cell["dataset"], cell["kernel_name"], cell["images"])
        for source, share in ((cell, f"{100 * corruption(cell):.0f} %"), (clean, "0 (clean)")):
            if source is None:
                continue
            for name in KIP_ROWS:
                result = source["methods"][name]
                steps = result.get("kept_step") or result.get("steps") or ""
                out.append(f"| {source['key']} | {share} | {METHOD_NAMES[name]} | {fmt(result['krr'])} "
                           f"| {fmt(result.get('krr_val', {}))} | {fmt(result['nn'])} | {steps} | {_minutes(result)} |")
    return out + [""]


def _privacy_section(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per cell that has one: each support's membership-attack AUCs and nearest-training-image distance."""
    measured = [c for c in cells if c.get("privacy")]
    if not measured:
        return []
    out = ["## Privacy: membership inference and distance to the training images", "",
           "AUC of two threshold attacks telling training members from held-out validation images, from the support "
           "alone (0.5: cannot tell; pipeline/evaluate/membership.py): the KRR loss on the candidate, and its distance "
           "to the nearest support image. Beside it, the median L2 distance (preprocessed space) from each support "
           "image to its nearest training image, and the same for held-out real images.", "",
           "| cell | support | loss-attack AUC | distance-attack AUC | nearest-train distance, median (support / held-out real) |",
           "|---|---|---|---|---|"]
    for cell in sorted(measured, key=lambda c: (c["dataset"], _kernel_rank(c["kernel_name"]), c["images"])):
        for name, row in cell["privacy"].items():
            distance = ("0 (training images)" if name == "random" else
                        f"{row['nearest_train_distance_median']:.2f} / {row['real_heldout_distance_median']:.2f}"
                        if "nearest_train_distance_median" in row else "")
            out.append(f"| {cell['key']} | {METHOD_NAMES.get(name, name)} | {row['loss_auc']:.3f} | {row['distance_auc']:.3f} "
                       f"| {distance} |")
    return out + [""]


def _settings_text(result: Mapping[str, Any]) -> str:
    """`× 10, adam 0.001 × 1000` (or just the label scale, for cells from before the optimizer choice)."""
    scale, settings = result.get("nn_label_scale"), result.get("nn_settings")
    if scale is None:
        return ""
    if not settings:
        return f"× {scale:g}"
    labels = ", solved labels" if settings.get("labels") == "solved" else ""
    return f"× {scale:g}, {settings['optimizer']} {settings['learning_rate']:g} × {settings['steps']}{labels}"


def _network_sentence(cells: Sequence[Mapping[str, Any]]) -> str:
    """What the NN column is, from the cells' own train configs: one sentence per train settings
    name, saying which kernels' rows it covers when there is more than one."""
    by_name: dict[str, tuple[Mapping[str, Any], list[str]]] = {}
    for cell in cells:
        train = cell.get("config", {}).get("train")
        if train:
            entry = by_name.setdefault(cell.get("train", "?"), (train, []))
            if cell["kernel_name"] not in entry[1]:
                entry[1].append(cell["kernel_name"])
    if not by_name:
        return "NN: finite networks trained on the support, mean ± std over seeds."
    if len(by_name) == 1:
        return "NN: " + _train_sentence(next(iter(by_name.values()))[0])
    return " ".join(f"NN in the {', '.join(sorted(kernels, key=_kernel_rank))} rows (`train.{name}`): {_train_sentence(train)}"
                    for name, (train, kernels) in by_name.items())


def _train_sentence(train: Mapping[str, Any]) -> str:
    labels = ("the support's own labels (learned ones included), scaled by the factor of "
              f"{', '.join(f'{v:g}' for v in AUTO_LABEL_SCALES)} whose network does best on validation, per support and per random subset side"
              if train.get("label_scale_choice") == "validation" else f"the support's labels × {train.get('label_scale')}")
    optimizer = f"{train['optimizer']} {train['learning_rate']:g} for {train['steps']} steps"
    if train.get("optimizer_choice") == "validation":
        optimizer = (f"{optimizer} or adam {AUTO_OPTIMIZER['learning_rate']:g} for {AUTO_OPTIMIZER['steps']} steps, "
                     "chosen jointly with the label scale on validation (the column says which)")
    if train.get("labels_choice") == "validation":
        labels += ("; or on labels solved for each network's own NTK (pipeline/kernels/network_kernel.py), whichever does "
                   "better on validation")
    elif train.get("labels") == "solved":
        labels = "labels solved for each network's own NTK (pipeline/kernels/network_kernel.py)"
    if train.get("architecture", "fc") == "conv":
        pooling = "no pooling" if train.get("pooling") == "none" else f"2x2 {train.get('pooling', 'avg')} pooling"
        network = (f"ConvNets of {train['conv_depth']} blocks (3x3 convolution with {train['conv_width']} channels, ReLU, "
                   f"{pooling}) and a dense readout ({train['parameterization']} parameterisation)")
    else:
        network = (f"width-{train['width']} {train.get('architecture', 'fc').upper()} ReLU networks (depth {train.get('depth', 1)}, "
                   f"{train['parameterization']} parameterisation)")
    return (f"{network} trained by {optimizer} on loss {train['loss']} with {labels}; "
            f"test accuracy, mean ± std over {train['seeds']} seeds.")


def _datasets(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The datasets present, the paper's first."""
    present = {c["dataset"] for c in cells}
    return [d for d in DATASETS if d in present] + sorted(present - set(DATASETS))


def _published(paper: Iterable[Mapping[str, Any]]) -> dict[tuple, str]:
    """(dataset, images, method, kernel, measure) -> the published value(s), for entries that name their source."""
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for entry in published_entries(paper):
        key = (entry["dataset"], entry["images"], entry["method"], entry["kernel"], entry.get("measure", "krr"))
        grouped[key].append(f"{entry['accuracy']:.1f}")
    return {key: ", ".join(values) for key, values in grouped.items()}


def _sources(paper: Iterable[Mapping[str, Any]], cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (source, kernel, method, measure, conditions), naming the numbers it gives beside
    a cell of the table (the others are shown nowhere)."""
    shown = {(c["dataset"], c["images"], c["kernel_name"]) for c in cells}
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for entry in published_entries(paper):
        if (entry["dataset"], entry["images"], entry["kernel"]) not in shown:
            continue
        source = entry["source"]
        key = (source["paper"], source["table"], source["row"], entry["kernel"], entry["method"],
               entry.get("measure", "krr"), entry["conditions"])
        grouped[key].append(f"{DATASET_NAMES.get(entry['dataset'], entry['dataset'])} {entry['images']}: {entry['accuracy']:.1f}")
    return [f"{paper}, {table}, row \"{row}\" ({kernel}, {METHOD_NAMES.get(method, method)}, "
            f"{'KRR' if measure == 'krr' else 'finite networks'}: {'; '.join(values)}): {conditions}"
            for (paper, table, row, kernel, method, measure, conditions), values in grouped.items()]


def _find(cells, dataset: str, kernel: str, images: int):
    return next((c for c in cells if c["dataset"] == dataset and c["kernel_name"] == kernel and c["images"] == images), None)


def _kernel_rank(name: str) -> int:
    return KERNEL_ORDER.index(name) if name in KERNEL_ORDER else len(KERNEL_ORDER)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def _minutes(result: Mapping[str, Any]) -> str:
    method = f"{result['cpu_seconds'] / 60:.1f}"
    nn = result.get("nn_cpu_seconds")
    return method if nn is None else f"{method} + {nn / 60:.1f}"


def _total(cells: Sequence[Mapping[str, Any]], clock: str) -> float:
    """Seconds of `clock` (cpu or wall) over the matrix: every cell's KIP/KRR and support networks, and
    each (dataset, size)'s random-subset networks once, though every kernel's cell shows them."""
    total, shared = 0.0, {}
    for cell in cells:
        for name, method in cell["methods"].items():
            total += method.get(f"{clock}_seconds", 0.0)
            if name == "random" and "baseline_key" in cell:
                shared[cell["baseline_key"]] = method.get(f"nn_{clock}_seconds", 0.0)
            else:
                total += method.get(f"nn_{clock}_seconds", 0.0)
    return total + sum(shared.values())
