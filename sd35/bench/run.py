"""``sd35 bench``'s entry point: run what the options ask for, print the tables, write the JSON."""

from __future__ import annotations

from sd35.bench.options import BenchOptions
from sd35.bench.report import Report, step_table, whole_table
from sd35.bench.steps import run_steps
from sd35.bench.whole_image import run_whole_image
from sd35.errors import SD35Error


def run(opts: BenchOptions) -> int:
    """Run what ``opts`` asks for, print the tables, write the JSON; exit code 1 if the equivalence check failed."""
    if opts.diffusers or opts.whole_image:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise SD35Error(
                "the benchmark compares with diffusers, which is not installed: pip install diffusers==0.42.1 "
                "transformers (or pass --diffusers none and leave out --whole-image)."
            ) from None
    report = Report(opts)
    report.save()
    if opts.steps_benchmark:
        run_steps(opts, report)
        print(step_table(report.data))
    if opts.whole_image:
        run_whole_image(opts, report)
        print(whole_table(report.data))
    if opts.json_path is not None:
        print(f"wrote {opts.json_path}")
    return 0 if all(r["ok"] for r in report.data["equivalence"]) else 1
