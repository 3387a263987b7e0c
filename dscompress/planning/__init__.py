"""The planner: latency tables of the units' options measured on the runtime, and the search for the
most accurate plan under a latency budget. (Named ``planning`` so that ``dscompress.plan`` stays the
function.)"""
