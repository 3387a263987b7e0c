"""The command line (click) and what it prints (rich): commands generated from the step configs,
renderers of records, reports."""
