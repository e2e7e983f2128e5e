"""``python -m jobs.report <run, pipeline or sweep folder>``: one HTML page of plots and tables,
``<folder>/report/index.html`` (jobs/runtime/tracking/report_page.py)."""

import argparse

from jobs.runtime.tracking.report_page import write_report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="HTML report of a run, pipeline or sweep folder")
    ap.add_argument("folder")
    print(write_report(ap.parse_args(argv).folder))


if __name__ == "__main__":
    main()
