"""``allcluster report``: result tables, figures and a static HTML report from sweep and scoring Parquet.

``build_report(inputs, out, options)`` reads any mix of sweep experiment folders and scoring output
folders (or their Parquet files) and writes the folder ``out``::

    index.html                      the report; opens offline (relative images, no script, no URL)
    tables/<name>.csv | .md | .html every table (leaderboard, pivots, counts, roll-ups, ...)
    morning_list.csv                every flagged image, most urgent first, with its heatmap path
    plots/*.png                     confusion matrix, ROC, reliability, metric heatmap, curves, F1
    gallery/*.jpg, morning/*.jpg    Grad-CAM overlays shown in the report
    report.yaml, report.json        the resolved options; inputs, counts, files and notes

Modules: :mod:`.inputs` (what each INPUT is), :mod:`.tables` (pure tables), :mod:`.plots` (one PNG
per function), :mod:`.html` (rendering), :mod:`.build` (assembling the folder).
"""
from allcluster.report.build import ReportOptions, build_report

__all__ = ["ReportOptions", "build_report"]
