"""The report over the paper matrix's cells: a Markdown table, a figure, a flat summary, and the
checks the comparison is meant to pass, stated with the numbers that pass or fail them."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from pipeline.errors import UserError
from paper import DATASETS, METHODS, fmt
from pipeline.run.config import AUTO_LABEL_SCALES, AUTO_OPTIMIZER

METHOD_NAMES = {"random": "random real", "label_solve": "Label Solve", "kip": "KIP", "kip_labels": "KIP + labels"}
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "digits": "digits (scikit-learn)"}
KERNEL_ORDER = ("FC NTK", "FC NNGP", "RBF", "ConvNet-RF NNGP")


# KRR test accuracy goals with the FC NTK, chosen above the numbers the paper reports (issue 13:
# beat the paper, not a lowered bar). A cell that is missing counts as not met.
GOALS = {("mnist", 10): 0.90, ("mnist", 100): 0.975, ("mnist", 500): 0.983,
         ("fashion_mnist", 10): 0.84, ("fashion_mnist", 100): 0.89, ("fashion_mnist", 500): 0.90}
# Issue 13's goal for finite networks: width-1024 FC networks on 100 MNIST images distilled with
# learned labels (the FC kernels' KIP + labels supports), mean over the seeds.
NETWORK_GOALS = {("mnist", 100, "FC NTK"): 0.93, ("mnist", 100, "FC NNGP"): 0.93}
# Issue 14's goals for the ConvNet kernel (random-feature NNGP, `kernel.architecture: conv_rf`), 100
# images: KRR test accuracy of the better KIP row, and finite ConvNets trained on that same support.
CONV_KERNEL = "ConvNet-RF NNGP"
CONV_GOALS = {("mnist", 100): {"krr": 0.985, "nn": 0.97}, ("fashion_mnist", 100): {"krr": 0.88, "nn": 0.85}}
SOURCE_PARTS = ("paper", "table", "row")


def checks(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """KIP (its better row) beats Label Solve and random at every size, per dataset and kernel, by KRR;
    networks trained on each KIP support (both label modes) beat networks on random real subsets; and
    the FC NTK cells reach GOALS."""
    failures, network_failures = [], []
    for cell in cells:
        methods = cell["methods"]
        kip_best = max(methods["kip"]["krr"]["mean"], methods["kip_labels"]["krr"]["mean"])
        for rival in ("label_solve", "random"):
            if not kip_best > methods[rival]["krr"]["mean"]:
                failures.append(f"{cell['key']}: KIP {kip_best:.4f} <= {rival} {methods[rival]['krr']['mean']:.4f}")
        random_nn = methods["random"]["nn"]["mean"]
        for name in ("kip", "kip_labels"):
            nn = methods[name]["nn"]["mean"]
            if nn is None or random_nn is None or not nn > random_nn:
                shown = [f"{100 * v:.2f} %" if v is not None else "missing" for v in (nn, random_nn)]
                network_failures.append(f"{cell['key']}: {METHOD_NAMES[name]} networks {shown[0]} <= random real {shown[1]}")
    goals = {}
    for (dataset, images), goal in GOALS.items():
        cell = _find(cells, dataset, "FC NTK", images)
        value, cpu_minutes = None, None
        if cell is not None:
            best = max(("kip", "kip_labels"), key=lambda name: cell["methods"][name]["krr"]["mean"])
            value = cell["methods"][best]["krr"]["mean"]
            cpu_minutes = round(cell["methods"][best]["cpu_seconds"] / 60, 1)
        goals[f"{dataset}_fc_ntk_{images}"] = {"kip_accuracy": value, "goal": goal, "cpu_minutes": cpu_minutes,
                                               "met": value is not None and value >= goal}
    network_goals = {}
    for (dataset, images, kernel), goal in NETWORK_GOALS.items():
        cell = _find(cells, dataset, kernel, images)
        value = None if cell is None else cell["methods"]["kip_labels"]["nn"]["mean"]
        labels = None if cell is None or value is None else cell["methods"]["kip_labels"]["nn_settings"]["labels"]
        network_goals[f"{dataset}_{_slug(kernel)}_{images}_kip_labels_nn"] = {
            "nn_accuracy": value, "labels": labels, "goal": goal, "met": value is not None and value >= goal}
    return {"kip_beats_baselines": not failures, "failures": failures,
            "networks_beat_random": not network_failures, "network_failures": network_failures,
            "fc_ntk_goals": goals, "network_goals": network_goals, "conv_goals": conv_goals(cells), "cells": len(cells)}


def conv_goals(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """CONV_GOALS per dataset: the better KIP row by KRR, its networks, and the CPU minutes of its KIP
    run (the goal also asks for one run within 60 minutes on 2 cores). A missing cell is not met."""
    goals = {}
    for (dataset, images), goal in CONV_GOALS.items():
        cell = _find(cells, dataset, CONV_KERNEL, images)
        row = krr = nn = cpu_minutes = None
        if cell is not None:
            row = max(("kip", "kip_labels"), key=lambda name: cell["methods"][name]["krr"]["mean"])
            krr, nn = cell["methods"][row]["krr"]["mean"], cell["methods"][row]["nn"]["mean"]
            cpu_minutes = round(cell["methods"][row]["cpu_seconds"] / 60, 1)
        goals[f"{dataset}_conv_{images}"] = {
            "row": row, "krr_accuracy": krr, "nn_accuracy": nn, "goal_krr": goal["krr"], "goal_nn": goal["nn"],
            "cpu_minutes": cpu_minutes, "met": krr is not None and nn is not None and krr >= goal["krr"] and nn >= goal["nn"]}
    return goals


def published_entries(paper: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The `paper:` entries, each required to name its source as {paper, table, row} and its kernel:
    a number whose source cannot be named is not shown (an empty cell beats one filled from memory)."""
    entries = list(paper or [])
    for i, entry in enumerate(entries):
        source = entry.get("source") if isinstance(entry, Mapping) else None
        if not isinstance(source, Mapping) or any(not str(source.get(k) or "").strip() for k in SOURCE_PARTS):
            raise UserError(f"paper[{i}].source={source!r} is not allowed; expected a mapping naming paper, table and row")
        for key in ("dataset", "images", "method", "kernel", "accuracy"):
            if key not in entry:
                raise UserError(f"paper[{i}] lacks {key}; expected dataset, images, method, kernel, accuracy, source")
    return entries


def summary(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Flat metrics for `dvc metrics show` and MLflow: <dataset>.<kernel>.<images>.<method>.krr (and .nn)."""
    flat: dict[str, Any] = {}
    for cell in cells:
        prefix = f"{cell['dataset']}.{_slug(cell['kernel_name'])}.{cell['images']}"
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
        out += [f"**Interim report:** the network stages of {len(not_run)} of {verdict['cells']} cells have not run yet "
                f"({', '.join(not_run)}); their NN columns are empty and the network check counts them as missing. "
                "`dvc repro` in experiments/paper runs them and writes the final report.", ""]
    out += ["## Checks", ""]
    if verdict["kip_beats_baselines"]:
        out.append(f"- KIP beats Label Solve and random real images by KRR in every cell ({verdict['cells']} cells): yes.")
    else:
        out.append(f"- KIP beats Label Solve and random real images in every cell: **no**, in {len(verdict['failures'])}:")
        out += [f"  - {failure}" for failure in verdict["failures"]]
    if verdict["networks_beat_random"]:
        out.append(f"- Networks trained on KIP supports, fixed and learned labels alike, beat networks trained on random "
                   f"real images in every cell ({verdict['cells']} cells): yes.")
    else:
        out.append(f"- Networks on KIP supports beat networks on random real images in every cell: **no**, in "
                   f"{len(verdict['network_failures'])}:")
        out += [f"  - {failure}" for failure in verdict["network_failures"]]
    for (dataset, images), check in zip(GOALS, verdict["fc_ntk_goals"].values()):
        value = "missing" if check["kip_accuracy"] is None else f"{100 * check['kip_accuracy']:.2f} %"
        paper_value = published.get((dataset, images, "kip_labels", "FC NTK"))
        beside = f" (the paper: {paper_value} %)" if paper_value else ""
        cost = "" if check["cpu_minutes"] is None else f" in {check['cpu_minutes']:.1f} CPU min"
        out.append(f"- {DATASET_NAMES.get(dataset, dataset)}, FC NTK, {images} images: KIP {value}{cost} against the goal "
                   f"of {100 * check['goal']:.1f} %{beside}: {'met' if check['met'] else '**not met**'}.")
    for (dataset, images, kernel), check in zip(NETWORK_GOALS, verdict["network_goals"].values()):
        value = "missing" if check["nn_accuracy"] is None else f"{100 * check['nn_accuracy']:.2f} %"
        source = {"solved": ", labels solved for each network", "support": ", the support's own labels"}.get(check["labels"], "")
        out.append(f"- {DATASET_NAMES.get(dataset, dataset)}, {kernel}, {images} images, KIP + labels, width-1024 networks: "
                   f"{value}{source}, against the goal of {100 * check['goal']:.1f} %: {'met' if check['met'] else '**not met**'}.")
    for (dataset, images), check in zip(CONV_GOALS, verdict.get("conv_goals", {}).values()):
        shown = ["missing" if v is None else f"{100 * v:.2f} %" for v in (check["krr_accuracy"], check["nn_accuracy"])]
        row = f" ({METHOD_NAMES[check['row']]}, KIP run {check['cpu_minutes']:.1f} CPU min)" if check["row"] else ""
        out.append(f"- {DATASET_NAMES.get(dataset, dataset)}, {CONV_KERNEL}, {images} images{row}: KRR {shown[0]} and finite "
                   f"ConvNets {shown[1]}, against the goals of {100 * check['goal_krr']:.1f} % and {100 * check['goal_nn']:.1f} %: "
                   f"{'met' if check['met'] else '**not met**'}.")
    total_cpu, total_wall = _total(cells, "cpu") / 60, _total(cells, "wall") / 60
    out += [f"- Compute: {total_cpu:.0f} CPU minutes, {total_wall:.0f} minutes of wall time inside the stages "
            "(KIP and KRR per cell, networks per support, random-subset networks once per dataset and size).", ""]
    for dataset in _datasets(cells):
        rows = sorted((c for c in cells if c["dataset"] == dataset),
                      key=lambda c: (_kernel_rank(c["kernel_name"]), c["images"]))
        if not rows:
            continue
        out += [f"## {DATASET_NAMES.get(dataset, dataset)}", "",
                "| kernel | images | method | KRR test accuracy (%) | KRR val (%) | NN test accuracy (%) | NN labels, optimizer "
                "| paper (%) | CPU min (method + NN) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for cell in rows:
            for method in METHODS:
                result = cell["methods"][method]
                reference = published.get((dataset, cell["images"], method, cell["kernel_name"]), "")
                out.append(f"| {cell['kernel_name']} | {cell['images']} | {METHOD_NAMES[method]} | {fmt(result['krr'])} "
                           f"| {fmt(result.get('krr_val', {}))} | {fmt(result['nn'])} | {_settings_text(result)} "
                           f"| {reference} | {_minutes(result)} |")
        out.append("")
    out += ["Paper column: KRR test accuracy as published, only for the row's own kernel and only where",
            "`experiments/paper/params.yaml` names the source (paper, table, row); an empty cell means no",
            "number could be checked against the paper itself. CPU minutes are all threads of the stage's",
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
            chosen = sorted((c for c in cells if c["dataset"] == dataset and c["kernel_name"] == kernel),
                            key=lambda c: c["images"])
            for method in METHODS:
                xs = [c["images"] for c in chosen]
                ys = [100 * c["methods"][method]["krr"]["mean"] for c in chosen]
                ax.plot(xs, ys, marker="o", label=METHOD_NAMES[method])
            for entry in entries:
                if entry["dataset"] == dataset and entry["method"] in ("kip", "kip_labels") and entry["kernel"] == kernel:
                    ax.plot([entry["images"]], [entry["accuracy"]], marker="x", color="black", linestyle="none",
                            markersize=9, label="paper (KIP)")
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
    """(dataset, images, method, kernel) -> the published value(s), for entries that name their source."""
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for entry in published_entries(paper):
        key = (entry["dataset"], entry["images"], entry["method"], entry["kernel"])
        grouped[key].append(f"{entry['accuracy']:.1f}")
    return {key: ", ".join(values) for key, values in grouped.items()}


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
