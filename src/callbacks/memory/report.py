"""A leak named: :func:`diagnose` turns two censuses of one loop (and where the tensors between them were made) into
a :class:`LeakReport`, and :func:`format_report` writes it as ``memory_leak.txt`` reads."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from src.callbacks.memory.census import census_diff, tensor_census, tensor_key
from src.callbacks.memory.graphs import graph_groups, storage_id
from src.callbacks.memory.provenance import format_frames, where_counts

MB = 2**20
Where = Callable[[torch.Tensor], "list[tuple[str, int, str]] | None"]


@dataclass
class LeakReport:
    """What grew in one loop between two of its steps. ``groups``: one dict per (shape, dtype, device) whose count
    grew, largest first (with what its tensors' graphs hold), as :func:`census_diff` gives them plus ``graph``,
    ``graph_bytes_per_iter``, ``held_by_graph_of`` and the places they were made (``made_at``: the top two;
    ``made_at_counts`` and each graph group's ``made_at_counts``: (place, count, of how many))."""

    loop: str
    growth: float  # bytes per step, the slope that started the census
    key: str  # the series the slope was fitted on (allocated_mb, heap_mb, rss_mb)
    window: int
    threshold: float  # bytes per step
    first_step: int
    step: int
    groups: list[dict] = field(default_factory=list)
    snapshot_file: str | None = None  # the CUDA allocator history of the census window, when there is one
    basis: str | None = None  # how the growth was called when not by the sustained rule (a loop's first steps)


def _made_at(tensors: list[torch.Tensor], where: Where, top: int) -> list[tuple[str, int, int]]:
    return [(format_frames(list(fr)), n, len(tensors)) for fr, n in where_counts(tensors, where).most_common(top)]


def diagnose(loop: str, first: Counter, first_refs: dict, tensors: list[torch.Tensor], first_step: int, step: int,
             where: Where, growth: float, key: str, window: int, threshold: float) -> LeakReport:
    """The tensors of ``tensors`` (live now) that grew since the census ``first`` (taken at ``first_step``, with
    weak references ``first_refs`` {id: ref} to the tensors then) by group; the tensors their autograd graphs keep
    alive; which group's graph holds another group's tensors (so nothing is counted twice); where each was made."""
    steps = step - first_step
    groups = census_diff(first, tensor_census(tensors), steps)
    new = defaultdict(list)  # group -> tensors made since the first census
    grown = {(r["shape"], r["dtype"], r["device"]) for r in groups}
    for t in tensors:
        k = tensor_key(t)
        if k in grown:
            ref = first_refs.get(id(t))
            if ref is None or ref() is not t:
                new[k].append(t)
    graphs = {}
    for r in groups:  # the memory each group's new tensors keep alive through their autograd graphs
        made = new.get((r["shape"], r["dtype"], r["device"]), [])
        graphs[id(r)] = graph = graph_groups([t for t in made if t.grad_fn is not None], steps)
        if graph:
            r["graph"] = [{k: v for k, v in g.items() if k != "tensors"} for g in graph]
            r["graph_bytes_per_iter"] = sum(g["bytes_per_iter"] for g in graph)
    groups.sort(key=lambda r: -(r["bytes_per_iter"] + r.get("graph_bytes_per_iter", 0.0)))
    held_by = {}  # storage -> the group whose graphs keep it alive (the largest such group)
    for r in reversed(groups):
        for g in graphs[id(r)]:
            for t in g["tensors"]:
                held_by[storage_id(t)] = r
    for r in groups[:20]:
        made, graph = new.get((r["shape"], r["dtype"], r["device"]), []), graphs[id(r)]
        owners = Counter(id(held_by[k]) for k in map(storage_id, made) if k in held_by and held_by[k] is not r)
        if owners:
            owner = next(o for o in groups if id(o) == owners.most_common(1)[0][0])
            r["held_by_graph_of"] = (owner["shape"], owner["dtype"])
            r["held_count"] = sum(owners.values())
        r["made_at_counts"] = _made_at(made, where, 2)
        for g, summary in zip(graph[:3], r.get("graph", [])):
            summary["made_at_counts"] = _made_at(g["tensors"], where, 1)
        r["made_at"] = [place for place, _, _ in r["made_at_counts"]]
    return LeakReport(loop, growth, key, window, threshold, first_step, step, groups)


def format_report(report: LeakReport) -> str:
    """The report as text: the growth, then each group (at most 20) with its rate, the graph it holds, and where its
    tensors (and the largest tensors of its graph) were made."""
    basis = report.basis or (f"Theil-Sen slope over {report.window} steps, above {report.threshold / MB:g} MiB/step "
                             f"for {report.window} steps")
    lines = [f"memory grows {report.growth / MB:.3f} MiB/step in the {report.loop} loop ({report.key}, {basis})",
             f"live tensors that grew between {report.loop} steps {report.first_step} and {report.step}:"]
    for r in report.groups[:20]:
        graph = r.get("graph", [])
        line = (f"  +{r['count_per_iter']:g}/step  {r['count']} x {r['shape']} {r['dtype']} {r['device']}"
                f"  = {r['bytes_per_iter'] / MB:.3f} MiB/step")
        if graph:
            parts = ", ".join(f"{g['count_per_iter']:g} x {g['shape']} {g['dtype']}" for g in graph[:4])
            more = f" and {len(graph) - 4} more shapes" if len(graph) > 4 else ""
            line += f", holding a graph of {parts}{more} = {r['graph_bytes_per_iter'] / MB:.3f} MiB/step"
        if "held_by_graph_of" in r:
            shape, dtype = r["held_by_graph_of"]
            line += f" - {r['held_count']} of them saved in the graph of the {shape} {dtype} group (the same memory)"
        lines.append(line)
        lines += [f"      made at {place}  ({n} of {total})" for place, n, total in r.get("made_at_counts", [])]
        for g in graph[:3]:
            lines += [f"      its graph's {g['shape']} {g['dtype']} made at {place}  ({n} of {total})"
                      for place, n, total in g.get("made_at_counts", [])]
    if not report.groups:
        lines.append("  (none reachable from Python: the growth is in allocator caches or C++-held memory)")
    if report.snapshot_file:
        lines.append(f"CUDA allocator history of those steps: {report.snapshot_file} (open in https://pytorch.org/memory_viz)")
    return "\n".join(lines) + "\n"
