"""The suite's table and plot from its JSON results: `python -m benchmarks.report DIR` (run.py calls it after
every part, so a run cut short still leaves a table of what it measured).

Writes DIR/benchmarks.md (benchmarks/section_template.md filled with one table per model) and
DIR/benchmarks.png (decode tokens/s per system and budget, the modelled bound as a line)."""
from __future__ import annotations

import argparse
import glob
import json
import os

SYSTEMS = ("hybrid", "layer_split", "accelerate")
LABELS = {"hybrid": "hybrid (this engine)", "layer_split": "layer split (-ngl)", "accelerate": "accelerate offload",
          "dense": "dense, all on GPU", "bound": "modelled bound"}
STRICT = "strict bound (issue #7)"  # the bound row's overlap_decode_tps
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "section_template.md")


def load_results(folder: str) -> list[dict]:
    """Every part's JSON in the folder, in the order the suite runs them."""
    order = ["relu-smollm2-135m", "llama2-7b", "llama2-13b", "llama2-70b-q4_0"]
    parts = []
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            data = json.load(f)
        if data.get("benchmark") == "suite":
            parts.append(data)
    return sorted(parts, key=lambda p: order.index(p["part"]) if p["part"] in order else len(order))


def _cell(row: dict | None, notes: list[str]) -> str:
    """'decode (prompt)' tokens/s, or why there is no number (the reason goes to the notes)."""
    if row is None:
        return "–"
    if row["status"] != "ok":
        notes.append(f"{LABELS[row['system']]} at {row['budget_label']}: {row['status']}: {row['reason']}")
        return f"{row['status']} [{len(notes)}]"
    if row["system"] == "bound":
        return f"{row['decode_tps']:.1f}"
    return f"{row['decode_tps']:.1f} ({row['prompt_tps']:.0f})"


def _ratio(a: dict | None, b: dict | None, key: str = "decode_tps") -> str:
    ok = a and b and a["status"] == b["status"] == "ok" and key in b
    return f"{a['decode_tps'] / b[key]:.2f}x" if ok else "–"


def _strict(bound: dict | None) -> str:
    return f"{bound['overlap_decode_tps']:.1f}" if bound and "overlap_decode_tps" in bound else "–"


def part_table(part: dict) -> str:
    """One model's table: a row per budget, a column per system, the hybrid's speed-ups and share of the bound."""
    rows, notes = part["rows"], list(part.get("notes", []))
    budgets = list(dict.fromkeys(r["budget_label"] for r in rows if r["budget"] is not None))
    has_ppl = any("ppl" in r for r in rows)
    head = ["VRAM budget", "GPU share of FFN neurons"] + [LABELS[s] for s in SYSTEMS] + [
        LABELS["bound"], STRICT, "hybrid / layer split", "hybrid / accelerate", "hybrid / bound",
        "hybrid / strict bound"] + (["hybrid perplexity"] if has_ppl else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in budgets:
        by = {r["system"]: r for r in rows if r["budget_label"] == label}
        h = by.get("hybrid")
        share = f"{h['gpu_neuron_share']:.0%}" if h and "gpu_neuron_share" in h else "–"
        cells = [label, share] + [_cell(by.get(s), notes) for s in SYSTEMS] + [_cell(by.get("bound"), notes),
                                                                                _strict(by.get("bound"))]
        cells += [_ratio(h, by.get("layer_split")), _ratio(h, by.get("accelerate")), _ratio(h, by.get("bound")),
                  _ratio(h, by.get("bound"), "overlap_decode_tps")]
        if has_ppl:
            cells.append(f"{h['ppl']:.3f}" if h and "ppl" in h else "–")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    dense = next((r for r in rows if r["system"] == "dense"), None)
    if dense is not None:
        text += f"\n\n{LABELS['dense']} (the ceiling without offload, no budget): {_cell(dense, notes)} tokens/s"
    if part.get("perplexity"):
        ppl = part["perplexity"]
        text += (f"\n\nPerplexity over {ppl['documents']} held-out documents ({ppl['tokens']} tokens): dense "
                 f"{ppl['dense']:.3f}, dense with the predictors' masks {ppl['dense_predicted']:.3f}.")
    checks = target_checks(part)
    if checks:
        text += "\n\nTargets (issue #9): " + "; ".join(checks) + "."
    if notes:
        text += "\n\n" + "\n".join(f"{i}. {n}" for i, n in enumerate(notes, 1))
    return text


def target_checks(part: dict) -> list[str]:
    """The issue's targets against this part's numbers: speed-ups over the baselines (the Llama-2 parts),
    the share of the modelled bound, and perplexity equal to dense within 1% (when measured)."""
    ok = [r for r in part["rows"] if r["status"] == "ok" and r["budget"] is not None]
    hybrids = [r for r in ok if r["system"] == "hybrid"]

    def check(what, other, goal, llama_only=True, key="decode_tps"):
        if llama_only and not part["part"].startswith("llama2"):
            return None
        ratios = [h["decode_tps"] / o[key] for h in hybrids for o in ok
                  if o["system"] == other and o["budget"] == h["budget"] and key in o]
        if not ratios:
            return None
        met = sum(r >= goal for r in ratios)
        return f"{what}: {'met' if met == len(ratios) else 'not met'} (lowest {min(ratios):.2f}x)"

    checks = [check("hybrid >= 3x layer split", "layer_split", 3.0),
              check("hybrid >= 20x accelerate", "accelerate", 20.0),
              check("hybrid >= 70% of the bound", "bound", 0.7, llama_only=False),
              check("hybrid >= 70% of the strict bound", "bound", 0.7, llama_only=False, key="overlap_decode_tps")]
    ppl = [h["ppl"] for h in hybrids if "ppl" in h]
    for what, key in (("dense", "dense"), ("the same predictors on one device", "dense_predicted")):
        reference = part.get("perplexity", {}).get(key)
        if reference and ppl:
            worst = max(abs(p / reference - 1) for p in ppl)
            checks.append(f"hybrid perplexity within 1% of {what} at every budget: "
                          f"{'met' if worst <= 0.01 else 'not met'} (largest difference {worst:.2%})")
    return [c for c in checks if c]


def part_section(part: dict, first: dict) -> str:
    """The part's table; a part measured in another run than the first (the header's) names its own machine,
    commit and command."""
    model = part["model"]
    head = f"### {part['part']}: {model['weights']}\n\n"
    if (part["machine"], part.get("command")) != (first["machine"], first.get("command")):
        head += f"Machine: {machine_line([part])}.\nCommand: `{part.get('command', 'python -m benchmarks.run')}`\n\n"
    return head + f"{model['description']}\n\n" + part_table(part)


def machine_line(parts: list[dict]) -> str:
    m = parts[0]["machine"]
    bw = parts[0].get("bandwidths", {})
    figures = ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in bw.items() if k in ("gpu_copy", "cpu_read", "pcie"))
    assumed = f" (assumed, not measured: {', '.join(bw['assumed'])})" if bw.get("assumed") else ""
    return (f"{m.get('gpu', 'no GPU')}, {m['cpu_count']} CPU threads ({bw.get('cpu_threads', '?')} used), torch "
            f"{m['torch']}, commit {m['commit']}; measured in the same run: {figures}, hand-off "
            f"{bw.get('handoff_s', 0) * 1e6:.0f} us{assumed}")


def write_markdown(parts: list[dict], path: str) -> None:
    with open(TEMPLATE) as f:
        template = f.read()
    tables = "\n\n".join(part_section(p, parts[0]) for p in parts)
    with open(path, "w") as f:
        f.write(template.format(machine=machine_line(parts), tables=tables,
                                command=parts[0].get("command", "python -m benchmarks.run")))


def write_plot(parts: list[dict], path: str) -> bool:
    """Grouped bars of decode tokens/s (log scale) per budget and system, the bound as a line over each
    group, the dense ceiling as a dashed line. False if matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    parts = [p for p in parts if any(r["status"] == "ok" for r in p["rows"])]
    if not parts:
        return False
    colors = {"hybrid": "tab:blue", "layer_split": "tab:orange", "accelerate": "tab:green"}
    fig, axes = plt.subplots(1, len(parts), figsize=(4.5 * len(parts), 4.4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        ok = [r for r in part["rows"] if r["status"] == "ok"]
        budgets = list(dict.fromkeys(r["budget_label"] for r in ok if r["budget"] is not None))
        width = 0.8 / len(SYSTEMS)
        for j, system in enumerate(SYSTEMS):
            xs, ys = [], []
            for i, label in enumerate(budgets):
                r = next((r for r in ok if r["system"] == system and r["budget_label"] == label), None)
                if r:
                    xs.append(i + (j - 1) * width)
                    ys.append(r["decode_tps"])
            if xs:
                ax.bar(xs, ys, width, color=colors[system], label=LABELS[system])
        for i, label in enumerate(budgets):
            r = next((r for r in ok if r["system"] == "bound" and r["budget_label"] == label), None)
            if r:
                ax.hlines(r["decode_tps"], i - 0.45, i + 0.45, colors="black", label=LABELS["bound"])
        dense = next((r for r in ok if r["system"] == "dense"), None)
        if dense:
            ax.axhline(dense["decode_tps"], color="gray", linestyle="--", label=LABELS["dense"])
        ax.set_xticks(range(len(budgets)), [b.replace(" (", "\n(").replace(", ", ",\n") for b in budgets], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{part['part']}: {part['model']['weights']}", fontsize=9)
        ax.set_xlabel("VRAM budget")
        ax.set_ylabel("decode tokens/s")
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(folder: str) -> list[str]:
    """Table and plot of every result in `folder`; returns the paths written."""
    parts = load_results(folder)
    if not parts:
        return []
    md, png = os.path.join(folder, "benchmarks.md"), os.path.join(folder, "benchmarks.png")
    write_markdown(parts, md)
    return [md] + ([png] if write_plot(parts, png) else [])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", help="the --out folder of benchmarks.run")
    for path in write_report(ap.parse_args(argv).folder):
        print(path)


if __name__ == "__main__":
    main()
