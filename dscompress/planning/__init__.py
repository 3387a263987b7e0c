"""The planner: units (a layer or a pruning pair) and their options, latency tables measured on the
runtime, and the search for the most accurate plan under a latency budget. (Named ``planning``
so that ``dscompress.plan`` stays the function.)"""
