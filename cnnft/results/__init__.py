"""Results out: the run folder's layout, metrics files, tables, plots, report data and pages,
and trackers. Imports data and files only, never training or the run builder."""
