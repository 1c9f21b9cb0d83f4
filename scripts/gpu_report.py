"""One JSON for scripts/gpu_check.sh: the card and versions, every CUDA check's outcome and figures, the
bench figures, and how long each part took. Reads what the parts wrote; imports nothing beyond the standard
library, so it runs even when torch is what broke.

    python scripts/gpu_report.py --tests T.json --figures F.json --part tests=0:123.4 --out OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Figures worth a column in the printed summary, in the order they are looked for.
SUMMARY_KEYS = ("rel_max", "rel_l2", "psnr_db", "video_psnr_db", "peak_over_predicted", "max_abs_diff_vs_cpu",
                "first_call_s")


def read_json(path: Path | None) -> tuple[dict | None, str | None]:
    """(the data, None), or (None, why not); (None, None) when the part was not asked for."""
    if path is None:
        return None, None
    if not path.exists():
        return None, f"{path.name} was not written (the part did not run, or was stopped before its first result)"
    try:
        return json.loads(path.read_text()), None
    except json.JSONDecodeError as e:
        return None, f"{path.name} is not valid JSON ({e}): the part was probably stopped while writing it"


def parse_part(text: str) -> tuple[str, dict]:
    """``name=rc:seconds`` -> (name, {"exit_status": rc, "seconds": s}); rc 124/137 means stopped by its limit."""
    name, _, rest = text.partition("=")
    rc, _, seconds = rest.partition(":")
    part = {"exit_status": int(rc), "seconds": float(seconds or 0)}
    if part["exit_status"] in (124, 137):
        part["stopped"] = "time limit"
    return name, part


def build(tests: dict | None, tests_error: str | None, figures: dict | None, figures_error: str | None,
          parts: dict, dry_run: bool, log_name: str | None) -> dict:
    env = dict((tests or {}).get("environment") or {})
    if not env and figures:  # the tests did not report: the figures know the card and torch too
        env = {"device": figures.get("device"), "torch": figures.get("torch"), "cuda": figures.get("cuda")}
    checks = (tests or {}).get("tests", [])
    counts: dict[str, int] = {}
    for check in checks:
        counts[check["outcome"]] = counts.get(check["outcome"], 0) + 1
    failed = [c["test"] for c in checks if c["outcome"] in ("failed", "error")]
    figure_errors = [s for s in (figures or {}).get("sections", []) if "error" in s]
    problems = [f"{name} stopped by its time limit" for name, p in parts.items() if p.get("stopped")]
    problems += [f"check failed: {t}" for t in failed]
    if tests_error:
        problems.append(f"tests: {tests_error}")
    elif tests is not None and not tests.get("finished"):
        problems.append("tests: the run ended before pytest finished")
    if figures_error:
        problems.append(f"figures: {figures_error}")
    problems += [f"figure section {s['section']} failed: {s['error']}" for s in figure_errors]
    return {
        "report": "stepvideo gpu check",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dry_run": dry_run,
        "card": env.get("device"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "environment": env,
        "parts": parts,
        "seconds": round(sum(p["seconds"] for p in parts.values()), 1),
        "counts": counts,
        "ok": not problems,
        "problems": problems,
        "checks": checks,
        "bench": figures if figures is not None else {"missing": figures_error or "not run (--checks-only)"},
        "log": log_name,
    }


def summary(report: dict) -> str:
    """A table of every check for the log (the device tool returns the log's tail)."""
    driver = report["environment"].get("driver")
    lines = [f"card: {report['card']}{f' (driver {driver})' if driver else ''}  torch {report['torch']}  "
             f"CUDA {report['cuda']}  "
             f"({'dry run' if report['dry_run'] else 'measured'}, {report['seconds']} s)",
             f"checks: {report['counts']}"]
    skipped: dict[str, int] = {}
    for check in report["checks"]:
        message = (check.get("message") or "").strip()
        if check["outcome"] == "skipped":  # one line per reason: on a CPU every check skips for the same one
            skipped[message] = skipped.get(message, 0) + 1
            continue
        figs = check.get("figures") or {}
        shown = ", ".join(f"{k} {_fmt(figs[k])}" for k in SUMMARY_KEYS if k in figs)
        name = check["test"].split("::", 1)[-1]
        lines.append(f"  {check['outcome']:7} {name}" + (f"  [{shown}]" if shown else "")
                     + (f"  -- {message.splitlines()[-1]}" if message else ""))
    lines += [f"  skipped {n} x: {reason}" for reason, n in skipped.items()]
    for section in report["bench"].get("sections", []) if isinstance(report["bench"], dict) else []:
        status = section.get("error") or section.get("skipped") or (
            f"{section['seconds']} s" if "seconds" in section else "done")
        label = {k: section[k] for k in ("weights", "attention", "frames") if k in section}
        lines.append(f"  bench {section['section']} {label}: {status}")
    lines.append("OK" if report["ok"] else "PROBLEMS:\n  " + "\n  ".join(report["problems"]))
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tests", type=Path, help="the JSON the CUDA checks wrote (STEPVIDEO_GPU_REPORT)")
    p.add_argument("--figures", type=Path, help="the JSON bench/gpu_figures.py wrote")
    p.add_argument("--part", action="append", default=[], help="name=exit_status:seconds, once per part")
    p.add_argument("--log", type=Path, help="the run's log (named in the report)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    tests, tests_error = read_json(args.tests)
    figures, figures_error = read_json(args.figures)
    parts = dict(parse_part(text) for text in args.part)
    report = build(tests, tests_error, figures, figures_error, parts, args.dry_run, args.log.name if args.log else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
